"""The one aiohttp server: every route, JSON errors, and the background tasks' lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from importlib import resources

import aiohttp
from aiohttp import web

from bot import http_api, signatures
from bot.body import BODY_TIMEOUT
from bot.clock import Clock, SystemClock
from bot.config import Config
from bot.errors import FlowbotError, StorageUnavailable
from bot.ledger import WebViewCheck
from bot.limits import ConnectionGuard
from bot.metrics import Metrics
from bot.middleware import StorageHealth, error_middleware
from bot.outbox import Outbox
from bot.runtime import Runtime, Worker
from bot.timers import Timer
from bot.webhook_config import missing_secrets
from channels.base import Channel
from storage import backends
from storage.process import ProcessWorker

log = logging.getLogger(__name__)

RUNTIME = web.AppKey("runtime", Runtime)
OUTBOX = web.AppKey("outbox", Outbox)
TIMER = web.AppKey("timer", Timer)
CONNECTIONS = web.AppKey("connections", ConnectionGuard)
HEALTH = web.AppKey("health", StorageHealth)

ChannelFactory = Callable[[Config, Runtime], Channel]


def enabled_channels(config: Config) -> dict[str, ChannelFactory]:
    """The channels the config turns on. Imported here, so an unused SDK is never loaded."""
    factories: dict[str, ChannelFactory] = {}
    if config.channels.web.enabled:
        from channels.web import WebChannel

        factories["web"] = WebChannel.create
    if config.channels.file.enabled:
        from channels.file import FileChannel

        factories["file"] = FileChannel.create
    if config.channels.telegram.enabled:
        from channels.telegram import TelegramChannel

        factories["telegram"] = TelegramChannel.create
    if config.channels.whatsapp.enabled:
        from channels.whatsapp import WhatsAppChannel

        factories["whatsapp"] = WhatsAppChannel.create
    return factories


def _cors_headers(config: Config) -> dict[str, str]:
    return {
        "Access-Control-Allow-Origin": config.server.cors_allow_origin,
        "Access-Control-Allow-Methods": "POST, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type",
        "Access-Control-Max-Age": "86400",
        "Vary": "Origin",
    }


async def _healthz(request: web.Request) -> web.Response:
    reason = await _storage_trouble(request)
    if reason is None:
        return web.json_response({"status": "ok"})
    return _unavailable(reason)


async def _storage_trouble(request: web.Request) -> str | None:
    """Why the storage is unavailable (a request met `StorageUnavailable` and a probe
    still fails), or None."""
    runtime = request.app[RUNTIME]
    return await request.app[HEALTH].check(
        lambda: backends.probe(runtime.worker, runtime.config))


def _unavailable(reason: str) -> web.Response:
    return web.json_response(
        {"status": "unavailable", "error": "storage_unavailable",
         "message": f"The database is unavailable: {reason}."},
        status=503, headers={"Retry-After": str(StorageUnavailable.retry_after)})


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus exposition; 503 (DESIGN's contract, like /healthz) while requests find
    the storage unavailable, so the scrape itself fails and `up` says so."""
    runtime = request.app[RUNTIME]
    reason = await _storage_trouble(request)
    if reason is not None:
        return _unavailable(reason)
    # the pending waits, counted now on a thread with a read-only connection of its own
    # (it neither waits for the database worker nor holds it up): exact, whoever ended them
    try:
        runtime.stats.set_pending(await backends.pending_waits(runtime.config))
    except Exception:
        log.warning("could not count the pending waits; flowbot_pending_waits keeps the "
                    "last count", exc_info=True)
    return web.Response(body=runtime.stats.exposition(),
                        content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


async def _openapi(request: web.Request) -> web.Response:
    doc = json.loads(resources.files("bot").joinpath("openapi.json").read_text("utf-8"))
    cfg = request.app[RUNTIME].config.server
    doc["servers"] = [{"url": cfg.public_url + cfg.path_prefix}]
    return web.json_response(doc)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop `flowbot serve` runs on: uvloop's (a dependency outside Windows; measured
    +10 % callbacks per second, see bench/README.md), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def build_app(
    config: Config,
    *,
    channel_factories: Mapping[str, ChannelFactory] | None = None,
    clock: Clock | None = None,
    run_background: bool = True,
) -> web.Application:
    """The app for `config`. `run_background=False` leaves the timer and outbox loops off,
    for tests that drive them by hand (`fire_due()`, `drain()`)."""
    clock = clock or SystemClock()
    checks: dict[str, WebViewCheck] = {}  # the channels add theirs before the worker opens
    # the database process keeps the deadlines itself, on the system clock; with a test's
    # clock, or with the background loops off, the Timer task (or the test) fires them
    db_timer = (config.storage.worker == "process" and run_background
                and isinstance(clock, SystemClock))
    worker: Worker = backends.open_worker(config, checks, db_timer=db_timer,
                                          caller_clock=not isinstance(clock, SystemClock))
    stats = Metrics(db_pid=lambda: getattr(worker, "pid", None))
    runtime = Runtime(config, worker, clock, checks, stats)
    stats.count_events(runtime.metrics)
    if isinstance(worker, ProcessWorker):
        worker.on_timer = runtime.timer_pass_done
    channels = {name: make(config, runtime)
                for name, make in (channel_factories or {}).items()}
    outbox = Outbox(worker, channels, clock, stats=stats)
    runtime.on_messages = outbox.notify
    timer = Timer(runtime, clock)

    guard = ConnectionGuard(config.server)
    health = StorageHealth()
    app = web.Application(middlewares=[error_middleware(_cors_headers(config), guard, health)],
                          client_max_size=config.server.max_body_bytes + 1024)
    app[RUNTIME] = runtime
    app[CONNECTIONS] = guard
    app[HEALTH] = health
    app[BODY_TIMEOUT] = config.server.body_timeout
    app[OUTBOX] = outbox
    app[TIMER] = timer
    prefix = config.server.path_prefix

    async def callback(request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            return await http_api.webview_callback(request, runtime)
        finally:
            stats.callback_seconds.observe(time.perf_counter() - started)

    async def preflight(request: web.Request) -> web.Response:
        return web.Response(status=204)

    signature_headers = signatures.signature_headers(config.webhooks)

    async def webhook(request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            return await http_api.webhook(request, runtime, signature_headers)
        finally:
            stats.webhook_seconds.observe(time.perf_counter() - started)

    app.router.add_get(f"{prefix}/healthz", _healthz)
    app.router.add_get(f"{prefix}/metrics", _metrics)
    app.router.add_get(f"{prefix}/openapi.json", _openapi)
    app.router.add_post(f"{prefix}/webview/callback", callback)
    app.router.add_route("OPTIONS", f"{prefix}/webview/callback", preflight)
    app.router.add_post(f"{prefix}/webhook", webhook)
    app.router.add_post(f"{prefix}/webhook/{{conversation_key}}", webhook)
    for channel in channels.values():
        for route in channel.routes():
            app.router.add_route(route.method, f"{prefix}{route.path}", route.handler)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        missing = missing_secrets(config.webhooks, config.flows)
        if missing:  # as a channel without its token: refuse to start rather than 401 all
            raise FlowbotError("webhook secrets are missing: " + "; ".join(missing))
        await worker.open()
        runtime.http = aiohttp.ClientSession()
        started: list[Channel] = []
        loops: list[asyncio.Task[None]] = []
        try:
            for channel in channels.values():
                await channel.start()
                started.append(channel)
            # stranded conversations (a config edit) are moved in the background: each
            # event moves its own first, so none has to wait for the scan
            runtime.check_stranded()
            if run_background:
                loops = [asyncio.create_task(outbox.run(), name="outbox"),
                         asyncio.create_task(runtime.run_pruning(), name="retention")]
                if not db_timer:
                    loops.append(asyncio.create_task(timer.run(), name="timer"))
            yield
        finally:
            for task in loops:
                task.cancel()
            for task in loops:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await guard.stop()
            await outbox.close()
            await runtime.close()
            for channel in reversed(started):
                await channel.stop()
            await runtime.http.close()
            await worker.stop()
            backends.close_worker(worker)

    app.cleanup_ctx.append(lifecycle)

    async def end_long_requests(app: web.Application) -> None:
        # aiohttp waits for running handlers before cleanup; open chat sockets never end alone.
        for channel in channels.values():
            close = getattr(channel, "close_connections", None)
            if close is not None:
                await close()

    app.on_shutdown.append(end_long_requests)
    return app


# Options of the server's aiohttp request handler. auto_decompress off: bodies reach
# bot.body.read_body as sent, which decodes gzip/deflate within the endpoint's size limit
# and answers any other Content-Encoding as JSON (aiohttp's own decoder answers br/zstd
# without their libraries as text/plain before the app sees the request).
RUNNER_OPTIONS: dict[str, object] = {"auto_decompress": False}


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server's connections are watched by the app's `ConnectionGuard`
    (slow clients dropped). aiohttp has no deadline for a request's headers of its own.
    Runs with `RUNNER_OPTIONS` unless told otherwise."""

    def __init__(self, app: web.Application, **kwargs: object) -> None:
        super().__init__(app, **{**RUNNER_OPTIONS, **kwargs})  # type: ignore[arg-type]

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        self.app[CONNECTIONS].watch(server)
        return server


def serve(app: web.Application, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
    """Run `app` on the bound `sock` until SIGINT/SIGTERM, as `web.run_app` does, with its
    connections watched (see `GuardedRunner`). Start-up errors propagate."""

    async def main() -> None:
        runner = GuardedRunner(app, access_log=None, handle_signals=True,
                               keepalive_timeout=75.0, shutdown_timeout=60.0)
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
            await asyncio.Event().wait()  # until a signal raises GracefulExit
        finally:
            await runner.cleanup()

    asyncio.set_event_loop(loop)
    task = loop.create_task(main())
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, web.GracefulExit):
            loop.run_until_complete(task)
        rest = asyncio.all_tasks(loop)
        for t in rest:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
