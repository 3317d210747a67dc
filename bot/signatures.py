"""Webhook signatures: Standard Webhooks, a provider's HMAC of the body in a header
(GitHub, Shopify, Paddle, …) and Stripe's `t=…,v1=…`. Checked inside the database job, once
the block (and so the scheme) is known; the answer never names our environment variables."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bot.errors import Unauthorized
from bot.webhook_config import SignatureScheme, WebhooksConfig

log = logging.getLogger(__name__)

STANDARD_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
STRIPE_HEADER = "stripe-signature"
UNSIGNED = ""  # the scheme name of a block that takes unsigned calls


def signature_headers(webhooks: WebhooksConfig) -> frozenset[str]:
    """The (lower-case) headers any scheme of this config reads: what a SignedBody keeps."""
    names = set(STANDARD_HEADERS) | {STRIPE_HEADER}
    for scheme in webhooks.providers.values():
        names.update(h.lower() for h in (scheme.header, scheme.id_header) if h)
    return frozenset(names)


class _Refused(Exception):
    """One scheme does not accept the call; `why` is safe to show the sender."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass(frozen=True)
class SignedBody:
    """A webhook's raw body and the headers its signature may be in. Plain data: it crosses
    to the database process, where `verify` runs inside the job that knows the block."""

    body: bytes
    headers: Mapping[str, str]

    @classmethod
    def of(cls, body: bytes, headers: Mapping[str, str],
           wanted: Iterable[str] = (*STANDARD_HEADERS, STRIPE_HEADER)) -> SignedBody:
        keep = set(wanted)
        return cls(body, {k.lower(): v for k, v in headers.items() if k.lower() in keep})

    def verify(self, scheme: SignatureScheme | None, now: float) -> str | None:
        """The provider's message id, when the scheme has one (replays are applied once);
        None for an unsigned block. Raises Unauthorized (401) when the call fails `scheme`."""
        if scheme is None:
            return None
        try:
            return self._check(scheme, now)
        except _Refused as exc:
            raise Unauthorized("bad_signature", f"The webhook signature is missing or wrong: "
                               f"{exc.why}") from None

    def verify_any(self, schemes: Sequence[SignatureScheme | None], now: float
                   ) -> tuple[list[str], str | None]:
        """For a call no block is waiting for yet: the names of the schemes it passes
        (UNSIGNED when an unsigned block would take it) and its message id. Raises 401 when
        it passes none."""
        passed: list[str] = []
        message_id: str | None = None
        reasons: list[str] = []
        for scheme in schemes:
            if scheme is None:
                passed.append(UNSIGNED)
                continue
            try:
                found = self._check(scheme, now)
            except _Refused as exc:
                reasons.append(exc.why)
                continue
            passed.append(scheme.name)
            message_id = message_id or found
        if not passed:
            raise Unauthorized("bad_signature", "The webhook signature is missing or wrong: "
                               + " / ".join(dict.fromkeys(reasons)))
        return passed, message_id

    # -- the schemes ----------------------------------------------------------------------

    def _check(self, scheme: SignatureScheme, now: float) -> str | None:
        secret = os.environ.get(scheme.secret_env, "")
        if not secret:
            # `check` and `serve` refuse this config; the variable was emptied since
            log.error("webhook signature scheme %s: the environment variable %s is empty; "
                      "calls are refused", scheme.name, scheme.secret_env)
            raise _Refused("the server has no secret to check it with (its operator must "
                           "set one).")
        if scheme.kind == "standard":
            return self._standard(secret)
        if scheme.kind == "stripe":
            return self._stripe(secret, scheme.tolerance, now)
        return self._hmac(secret, scheme)

    def _standard(self, secret: str) -> str:
        try:
            Webhook(secret).verify(self.body, dict(self.headers), json_parse=False)
        except (WebhookVerificationError, ValueError) as exc:
            raise _Refused(f"{exc}; sign as Standard Webhooks describes (webhook-id, "
                           "webhook-timestamp, webhook-signature).") from None
        return self.headers["webhook-id"]

    def _hmac(self, secret: str, scheme: SignatureScheme) -> str | None:
        header = scheme.header
        sent = self.headers.get(header.lower(), "").strip()
        if not sent.startswith(scheme.prefix) or len(sent) == len(scheme.prefix):
            raise _Refused(f"expected header {header} with "
                           f"{scheme.prefix + '<' + scheme.encoding + '>'!r}.")
        value = sent[len(scheme.prefix):]
        digest = hmac.new(secret.encode(), self.body, scheme.algorithm).digest()
        if scheme.encoding == "hex":
            expected, got = digest.hex().encode(), value.lower().encode("utf-8", "replace")
        else:
            expected, got = base64.b64encode(digest), value.encode("utf-8", "replace")
        if not hmac.compare_digest(expected, got):
            raise _Refused(f"{header} does not match an HMAC-{scheme.algorithm.upper()} of "
                           "the raw body made with the shared secret.")
        return self.headers.get(scheme.id_header.lower()) if scheme.id_header else None

    def _stripe(self, secret: str, tolerance: float, now: float) -> str | None:
        timestamp, signatures = _stripe_header(self.headers.get(STRIPE_HEADER, ""))
        if timestamp is None or not signatures:
            raise _Refused("expected header Stripe-Signature: t=<timestamp>,v1=<signature>.")
        if abs(now - timestamp) > tolerance:
            raise _Refused(f"the Stripe-Signature timestamp is more than {tolerance:g} s "
                           "away from the server's time (a replay, or a clock off).")
        signed = str(timestamp).encode() + b"." + self.body
        expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest().encode()
        if not any(hmac.compare_digest(expected, s.encode("utf-8", "replace"))
                   for s in signatures):
            raise _Refused("no v1 signature in Stripe-Signature matches the body and "
                           "timestamp signed with the endpoint's secret.")
        return _event_id(self.body)


def _stripe_header(value: str) -> tuple[int | None, list[str]]:
    """(t, [v1 signatures]) of `t=1492774577,v1=5257a8…,v0=…`; other schemes ignored."""
    timestamp: int | None = None
    signatures: list[str] = []
    for item in value.split(","):
        name, _, val = item.strip().partition("=")
        if name == "t" and val.isdigit():
            timestamp = int(val)
        elif name == "v1" and val:
            signatures.append(val)
    return timestamp, signatures


def _event_id(body: bytes) -> str | None:
    """A Stripe event's `id` (evt_…): the same event delivered twice is applied once."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    event_id = doc.get("id") if isinstance(doc, dict) else None
    return event_id if isinstance(event_id, str) and event_id else None
