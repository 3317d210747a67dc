"""What `flowbot serve` checks before it touches anything: secrets, the port, the database.

Each failure is a `StartupError`: one or two lines saying what is wrong and what to do, and
the exit code a supervisor can act on — 2 when the configuration is wrong (restarting will
not help), 1 when the environment is (a busy port, a read-only disk). The checks run before
the database is opened, so a run that fails them leaves no database file behind (the
database's own checks are storage/preflight.py's).
"""

from __future__ import annotations

import errno
import os
import socket

from bot.config import Config
from bot.errors import FlowbotError
from bot.webhook_config import secret_places

CONFIG = 2
ENVIRONMENT = 1


class StartupError(FlowbotError):
    """`flowbot serve` cannot start. `exit_code`: 2 configuration, 1 environment."""

    def __init__(self, message: str, exit_code: int = ENVIRONMENT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def secret_names(config: Config) -> list[str]:
    """Every environment variable the config names for a secret it uses."""
    return [name for _, name in _secrets(config)]


def missing_secrets(config: Config) -> list[str]:
    """The environment variables the config names for secrets that are empty or unset, each
    with the place that names it (`channels.telegram.token_env`)."""
    return [f"{name} (named by {place})" for place, name in _secrets(config)
            if not os.environ.get(name)]


def _secrets(config: Config) -> list[tuple[str, str]]:
    wanted: list[tuple[str, str]] = []
    tg = config.channels.telegram
    if tg.enabled:
        wanted.append(("channels.telegram.token_env", tg.token_env))
        if tg.mode == "webhook":
            wanted.append(("channels.telegram.secret_env", tg.secret_env))
    wa = config.channels.whatsapp
    if wa.enabled:
        wanted.append(("channels.whatsapp.auth_token_env", wa.auth_token_env))
    wanted += secret_places(config.webhooks, config.flows)  # Webhook blocks, providers
    return wanted


def check_secrets(config: Config) -> None:
    """Raise StartupError (exit 2) naming every secret variable that is empty."""
    missing = missing_secrets(config)
    if len(missing) == 1:
        name = missing[0].split(" ", 1)[0]
        raise StartupError(f"the environment variable {missing[0]} is empty — "
                           f"export {name}=… before starting flowbot", CONFIG)
    if missing:
        raise StartupError("these environment variables are empty: " + ", ".join(missing)
                           + " — export them before starting flowbot", CONFIG)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else happens, so a busy port is found
    before the database is opened and "serving" is printed only when it is ours."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host!r}: {exc.strerror} — check server.host "
                           "or --host", CONFIG) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise StartupError(_bind_problem(host, port, exc), ENVIRONMENT) from None
    sock.setblocking(False)
    return sock


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is in use — stop the other process or pass "
                "--port (or set server.port)")
    if exc.errno == errno.EACCES:
        return (f"no permission to listen on port {port} — ports below 1024 need root; "
                "use a higher port behind a reverse proxy (see docs/deploy.md)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{host} is not an address of this machine — set server.host to one "
                "(127.0.0.1, or 0.0.0.0 for every interface)")
    return f"cannot listen on {host}:{port}: {exc.strerror}"
