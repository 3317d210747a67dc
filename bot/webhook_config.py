"""The `[webhooks]` table: where a provider puts the conversation key, how long an early
call is kept, and named provider profiles (how a provider signs its calls)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from bot.flow import Flow, WebhookBlock
from bot.toml_reader import Problems, Reader, did_you_mean

SIGNATURE_KINDS = ("standard", "hmac", "stripe")
ALGORITHMS = ("sha256", "sha1")
ENCODINGS = ("hex", "base64")
MAX_KEY_PATHS = 10


@dataclass(frozen=True)
class SignatureScheme:
    """How calls to a Webhook block prove who sent them.

    kind "standard": Standard Webhooks (webhook-id/-timestamp/-signature headers, `whsec_…`
    secret; the library's 5-minute tolerance). "hmac": an HMAC (`algorithm` sha256 or sha1)
    of the raw body, in header `header`, `encoding` hex or base64, after an optional `prefix`
    (GitHub: X-Hub-Signature-256 = "sha256=<hex>"; Shopify: X-Shopify-Hmac-Sha256 =
    "<base64>"). "stripe": Stripe-Signature `t=<unix s>,v1=<hex>` = HMAC-SHA256 of
    "<t>.<body>", refused when t is more than `tolerance` seconds away from now.
    `id_header` names a header with the provider's delivery id (replays of one id are
    applied once); Standard Webhooks uses webhook-id, Stripe the event's `id`.
    `name` identifies the scheme: the profile's name, or `secret_env:VAR` for a block's own
    Standard Webhooks secret."""

    name: str
    kind: str
    secret_env: str
    header: str = ""
    algorithm: str = "sha256"
    encoding: str = "hex"
    prefix: str = ""
    tolerance: float = 300.0
    id_header: str = ""
    place: str = ""  # where the config defines it, for `check` messages


@dataclass(frozen=True)
class WebhooksConfig:
    """`early_window`: seconds a call for a conversation that is not (yet) at a Webhook
    block is kept for the next one (0: refuse such calls with 409). `early_max`: calls kept
    per conversation. `key_paths`: dotted paths in the payload tried, in order, after the
    query string and a top-level `conversation_key`, by `POST /webhook`."""

    early_window: float = 60.0
    early_max: int = 5
    key_paths: tuple[str, ...] = ()
    providers: Mapping[str, SignatureScheme] = field(default_factory=dict)


def _scheme(name: str, table: Any, problems: Problems) -> SignatureScheme | None:
    place = f"webhooks.providers.{name}"
    if not isinstance(table, dict):
        problems.error(place, "must be a table with `signature` and `secret_env`")
        return None
    r = Reader(table, place, problems)
    kind = r.text("signature", choices=SIGNATURE_KINDS)
    secret_env: str = r.text("secret_env")
    if secret_env and not secret_env.replace("_", "").isalnum():
        problems.error(r.at("secret_env"), f"must name an environment variable, not "
                       f"{secret_env!r}")
    if r.has("secret"):
        r.raw("secret")
        problems.error(r.at("secret"), "secrets are not written in the config; put it in an "
                       "environment variable and name it with `secret_env`")
    header: str = r.text("header", "") if kind == "hmac" else ""
    if kind == "hmac" and not header:
        problems.error(r.at("header"), "is required for signature = 'hmac' (the header "
                       "the provider puts its signature in, e.g. 'X-Hub-Signature-256')")
    scheme = SignatureScheme(
        name=name, kind=kind, secret_env=secret_env, header=header,
        algorithm=r.text("algorithm", "sha256", choices=ALGORITHMS) if kind == "hmac"
        else "sha256",
        encoding=r.text("encoding", "hex", choices=ENCODINGS) if kind == "hmac" else "hex",
        prefix=r.text("prefix", "") if kind == "hmac" else "",
        tolerance=r.number("tolerance", 300.0, lo=1, hi=86400) if kind == "stripe" else 300.0,
        id_header=r.text("id_header", "") if kind == "hmac" else "",
        place=place,
    )
    r.done()  # keys of another kind (e.g. `prefix` with "stripe") are reported as unknown
    return scheme


def _key_paths(r: Reader) -> tuple[str, ...]:
    paths: tuple[str, ...] = r.str_list("key_paths", ())
    if len(paths) > MAX_KEY_PATHS:
        r.problems.error(r.at("key_paths"), f"has {len(paths)} paths; at most "
                         f"{MAX_KEY_PATHS} are allowed")
    for i, path in enumerate(paths):
        if not path or any(not part for part in path.split(".")):
            r.problems.error(f"{r.at('key_paths')}.{i}", f"{path!r} is not a dotted path "
                             "like 'metadata.conversation_key'")
    return paths


def parse_webhooks(table: dict[str, Any], problems: Problems) -> WebhooksConfig:
    r = Reader(table, "webhooks", problems)
    providers: dict[str, SignatureScheme] = {}
    for name, sub in r.table_("providers").items():
        scheme = _scheme(name, sub, problems)
        if scheme is not None:
            providers[name] = scheme
    cfg = WebhooksConfig(
        early_window=r.number("early_window", 60.0, lo=0, hi=3600),
        early_max=r.integer("early_max", 5, lo=1, hi=100),
        key_paths=_key_paths(r),
        providers=providers,
    )
    r.done()
    return cfg


def webhook_blocks(flows: Mapping[str, Flow]) -> Iterator[tuple[str, WebhookBlock]]:
    """(config place, block) of every Webhook block."""
    for flow in flows.values():
        for block in flow.blocks.values():
            if isinstance(block, WebhookBlock):
                yield f"flows.{flow.name}.blocks.{block.id}", block


def check_providers(webhooks: WebhooksConfig, flows: Mapping[str, Flow],
                    problems: Problems) -> None:
    """Every block's `provider` names a profile."""
    for place, block in webhook_blocks(flows):
        if block.provider and block.provider not in webhooks.providers:
            problems.error(f"{place}.provider", f"no provider profile named "
                           f"{block.provider!r}{did_you_mean(block.provider, webhooks.providers)}"
                           f"; define it as [webhooks.providers.{block.provider}]")


def block_scheme(webhooks: WebhooksConfig, block: WebhookBlock) -> SignatureScheme | None:
    """The signature a block requires (None: it takes unsigned calls)."""
    if block.provider:
        return webhooks.providers.get(block.provider)
    if block.secret_env:
        return SignatureScheme(f"secret_env:{block.secret_env}", "standard", block.secret_env)
    return None


def secret_places(webhooks: WebhooksConfig, flows: Mapping[str, Flow]
                  ) -> list[tuple[str, str]]:
    """(config place, environment variable) of every secret the webhooks need: each
    provider profile's and each Webhook block's own `secret_env`."""
    places = [(f"webhooks.providers.{name}.secret_env", scheme.secret_env)
              for name, scheme in webhooks.providers.items()]
    places += [(f"{place}.secret_env", block.secret_env)
               for place, block in webhook_blocks(flows) if block.secret_env]
    return places


def missing_secrets(webhooks: WebhooksConfig, flows: Mapping[str, Flow],
                    environ: Mapping[str, str] | None = None) -> list[str]:
    """Problems (place: text) for every Webhook block and provider profile whose secret
    variable is unset or empty: `check` reports them and `serve` refuses to start."""
    env = os.environ if environ is None else environ
    return [f"{place}: the environment variable {name} is not set or empty; put the "
            "signing secret the provider gave you in it"
            for place, name in secret_places(webhooks, flows) if not env.get(name)]
