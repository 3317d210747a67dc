"""The `flowbot` command: check, graph, serve, telegram webhook-info."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import signal
import sys
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from bot import heap, logs, startup
from bot.config import Config, default_public_url, load_config, read_config
from bot.errors import ConfigError, DatabaseInUse, FlowbotError
from bot.graph import dot, mermaid
from bot.webhook_config import missing_secrets

log = logging.getLogger("flowbot")


def _count(items: Sequence[str], word: str) -> str:
    return f"{len(items)} {word}" + ("" if len(items) == 1 else "s")


def _report(path: str, errors: Sequence[str], warnings: Sequence[str]) -> None:
    """Every problem, errors first, under a header that counts what it lists."""
    print(f"{path}: {_count(errors, 'error')}"
          + (f", {_count(warnings, 'warning')}" if warnings else "") + ":", file=sys.stderr)
    for line in errors:
        print(f"  error: {line}", file=sys.stderr)
    for line in warnings:
        print(f"  warning: {line}", file=sys.stderr)


def _load(path: str) -> Config:
    try:
        config = load_config(path)
    except ConfigError as exc:
        _report(path, exc.errors, exc.warnings)
        raise SystemExit(2) from None
    for line in config.warnings:
        print(f"warning: {line}", file=sys.stderr)
    return config


def _secrets_set(path: str, config: Config) -> bool:
    """Every secret variable the webhooks need is set; else print which and where (`serve`
    refuses to start then too: bot/startup.py)."""
    missing = missing_secrets(config.webhooks, config.flows)
    if missing:
        print(f"{path}: {len(missing)} problem(s):", file=sys.stderr)
        for line in missing:
            print(f"  error: {line}", file=sys.stderr)
    return not missing


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if not _secrets_set(args.config, config):
        return 2
    blocks = sum(len(f.blocks) for f in config.flows.values())
    print(f"{args.config}: ok ({len(config.flows)} flow(s), {blocks} block(s))")
    from bot.cli_data import stranded_report

    for line in stranded_report(config):
        print(line)
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    """Draws the flow even when the config has errors (broken edges in red), so an admin
    sees what they broke; the problems go to stderr and the exit code is then 2."""
    config, problems = read_config(args.config)
    if config is None:
        _report(args.config, problems.errors, problems.warnings)
        return 2
    if problems.errors:
        _report(args.config, problems.errors, problems.warnings)
    name = args.flow or config.bot.start_flow
    flow = config.flows.get(name)
    if flow is None:
        print(f"no flow named {name!r}; flows: {', '.join(config.flows)}", file=sys.stderr)
        return 2
    unreadable = {b.split(".", 1)[1] for b in problems.unreadable
                  if b.split(".", 1)[0] == name}
    draw = dot if args.format == "dot" else mermaid
    sys.stdout.write(draw(flow, unreadable, config.flows))
    return 2 if problems.errors else 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    # the database process reads these too
    os.environ["FLOWBOT_LOG_LEVEL"] = args.log_level
    os.environ["FLOWBOT_LOG_FORMAT"] = args.log_format
    logs.setup(args.log_level, args.log_format, secrets=_secret_values(config))
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    if port != config.server.port and config.server.public_url == default_public_url(
            config.server.port):
        # public_url was derived from the port; links must follow the port actually used
        server = replace(config.server, port=port, public_url=default_public_url(port))
        config = replace(config, server=server)
    # Checks first, in an order that touches nothing: a run that fails them leaves no
    # database file and prints no "serving" line.
    startup.check_secrets(config)
    sqlite = config.storage.backend == "sqlite"
    db_path = Path(config.storage.path)
    from storage import preflight

    if sqlite:
        preflight.check_database(db_path)
        preflight.check_single_writer(db_path)  # before the slow imports: refused in ~1 s
        return _serve(args, config, host, port)
    # one server per PostgreSQL database: refused here, before the slow imports; held (on
    # a connection of its own) until serving ends, and dropped by the server with the
    # connection however this process ends
    server_lock = preflight.hold_server_lock(config)

    def lost(sentence: str) -> None:  # another server took the database: stop this one
        log.error("%s; stopping", sentence)
        os.kill(os.getpid(), signal.SIGTERM)

    server_lock.watch(lost)
    try:
        return _serve(args, config, host, port)
    finally:
        server_lock.release()


def _serve(args: argparse.Namespace, config: Config, host: str, port: int) -> int:
    """`serve` once its checks passed: bind, open the database, serve until stopped."""
    from storage import preflight

    sqlite = config.storage.backend == "sqlite"
    db_path = Path(config.storage.path)
    db_name = preflight.where(config)
    import aiohttp
    from aiohttp import web

    from bot.server import RUNTIME, build_app, enabled_channels, new_event_loop, serve
    from storage.process import DatabaseProcessError

    sock = startup.bind(host, port)
    fresh_db = sqlite and not db_path.exists()
    app = build_app(config, channel_factories=enabled_channels(config))
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104 - display only
    where = f"http://{shown}:{port}{config.server.path_prefix}/"

    version = _version()
    config_path = Path(args.config).resolve()

    async def announce(app: web.Application) -> None:
        # after the database and the channels started; the port is already ours
        log.info("flowbot %s started: config %s, listening on %s:%d, database %s (%s), "
                 "channels %s; Python %s, aiohttp %s, %s", version,
                 config_path, host, port, db_name, config.storage.worker,
                 ", ".join(enabled_channels(config)) or "none", platform.python_version(),
                 aiohttp.__version__, preflight.software(config))
        print(f"flowbot: serving {args.config} — open {where} to chat", flush=True)

    async def stopping(app: web.Application) -> None:
        log.info("flowbot %s stopping", version)

    app.on_startup.append(announce)
    app.on_shutdown.append(stopping)
    heap.settle()
    try:
        serve(app, sock, new_event_loop())
    except BaseException as exc:
        if fresh_db:  # this run created it and never served: leave no trace
            for suffix in ("", "-wal", "-shm", ".lock"):
                Path(f"{db_path}{suffix}").unlink(missing_ok=True)
        if isinstance(exc, DatabaseInUse):  # it started between the check and now
            raise startup.StartupError(str(exc), startup.ENVIRONMENT) from exc
        if isinstance(exc, DatabaseProcessError):
            raise startup.StartupError(
                f"cannot open the database {db_name}: {exc.reason} — see docs/operations.md",
                startup.ENVIRONMENT) from exc
        if preflight.is_database_error(exc) or isinstance(exc, OSError):
            raise startup.StartupError(f"cannot open the database {db_name}: {exc}",
                                       startup.ENVIRONMENT) from exc
        raise
    finally:
        sock.close()
    if getattr(app[RUNTIME].worker, "died", False):
        print("flowbot: stopped because the database process exited (see the log above)",
              file=sys.stderr)
        return 1  # a supervisor's Restart=on-failure restarts both
    return 0


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("flowbot")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _secret_values(config: Config) -> list[str]:
    """The values of the secret variables the config names, for the log's redaction."""
    from bot.startup import secret_names

    values = [v for name in secret_names(config) if (v := os.environ.get(name, ""))]
    if config.storage.backend == "postgresql":  # the URL's password, should a line carry it
        from storage.preflight import url_passwords

        url = config.storage.url or os.environ.get(config.storage.url_env, "")
        values += url_passwords(url)
    return values


def cmd_migrate_storage(args: argparse.Namespace) -> int:
    from storage.migrate import copy_sqlite_to_postgres

    source: str = args.source
    if not source.startswith("sqlite:"):
        print("flowbot: --from must be sqlite:PATH (the SQLite file of a stopped server)",
              file=sys.stderr)
        return 2
    target: str = args.target
    if target.startswith("env:"):  # keeps a password out of the process list
        target = os.environ.get(target[4:], "")
        if not target:
            print(f"flowbot: --to names the environment variable {args.target[4:]}, "
                  "which is not set", file=sys.stderr)
            return 2
    if not target.startswith(("postgresql://", "postgres://")):
        print("flowbot: --to must be a postgresql:// URL (or env:VARIABLE holding one)",
              file=sys.stderr)
        return 2
    from storage.preflight import checked_url

    copied = copy_sqlite_to_postgres(source.removeprefix("sqlite:"),
                                     checked_url(target, "--to"))
    rows = ", ".join(f"{n} {table}" for table, n in copied.rows.items())
    print(f"flowbot: copied {rows}; {copied.pending_waits} pending wait(s) and "
          f"{copied.pending_outbox} undelivered message(s); counts verified. Now set "
          "[storage] url_env (or url) and start the server.")
    return 0


def cmd_telegram(args: argparse.Namespace) -> int:
    from channels.telegram import webhook_info

    config = _load(args.config)
    print(asyncio.run(webhook_info(config)))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowbot", description="Chat flows that wait for the "
                                "outside world: Telegram, WhatsApp (Twilio) and web chat.")
    sub = p.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate a config and list every problem")
    check.add_argument("--config", required=True, help="the TOML config file")
    check.set_defaults(func=cmd_check)

    graph = sub.add_parser("graph", help="draw a flow as Mermaid or Graphviz dot")
    graph.add_argument("--config", required=True, help="the TOML config file")
    graph.add_argument("--flow", help="which flow (default: bot.start_flow)")
    graph.add_argument("--format", choices=("mermaid", "dot"), default="mermaid")
    graph.set_defaults(func=cmd_graph)

    serve = sub.add_parser("serve", help="run the server, the timer and the outbox")
    serve.add_argument("--config", required=True, help="the TOML config file")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--debug", action="store_true",
                       help="show the traceback of a start-up failure")
    serve.add_argument("--log-level", choices=logs.LEVELS, default="info",
                       help="info (default): a line per event; warning: problems only")
    serve.add_argument("--log-format", choices=logs.FORMATS, default="text",
                       help="text (default) or json: one object per line, for log shippers")
    serve.set_defaults(func=cmd_serve)

    from bot.cli_data import add_commands

    add_commands(sub, _load)

    move = sub.add_parser(
        "migrate-storage", help="copy a stopped SQLite database into an empty PostgreSQL one")
    move.add_argument("--from", dest="source", required=True, metavar="sqlite:PATH",
                      help="the SQLite file (stop the server first)")
    move.add_argument("--to", dest="target", required=True, metavar="postgresql://…",
                      help="the empty PostgreSQL database (or env:VARIABLE holding its URL)")
    move.set_defaults(func=cmd_migrate_storage)

    tg = sub.add_parser("telegram", help="Telegram helpers")
    tg_sub = tg.add_subparsers(dest="telegram_command", required=True)
    info = tg_sub.add_parser("webhook-info", help="show what Telegram has as our webhook")
    info.add_argument("--config", required=True, help="the TOML config file")
    info.set_defaults(func=cmd_telegram)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command != "serve":
        logging.basicConfig(level=logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except FlowbotError as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"flowbot: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
