"""The one middleware every request passes: every error becomes `{"error", "message"}` JSON
(our own, the router's 404/405, database trouble as 503 with Retry-After, bugs as 500),
repeated errors are logged once per interval, WebSockets are counted against their caps,
and a connection handling a request is kept from the slow-client sweep. Also /healthz,
which answers 503 with the reason while the storage is unavailable."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from bot.errorlog import ErrorLog, kind
from bot.errors import ApiError, RequestTimeout, StorageUnavailable
from bot.limits import ConnectionGuard, TooManyConnections

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StorageHealth:
    """What the requests saw of the storage: the reason of the last `StorageUnavailable`,
    until a probe (see `check`) succeeds again. `clock`: monotonic seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.reason: str | None = None
        self.since = 0.0

    def failed(self, reason: str) -> None:
        if self.reason is None:
            self.since = self.clock()
            log.error("storage unavailable: %s; /healthz answers 503 until it works again",
                      reason)
        self.reason = reason

    def recovered(self) -> None:
        if self.reason is not None:
            log.warning("storage works again after %.0f s (%s)", self.clock() - self.since,
                        self.reason)
        self.reason = None

    async def check(self, probe: Callable[[], Awaitable[None]]) -> str | None:
        """While in trouble, run `probe` (raises `StorageUnavailable` while it lasts);
        returns the reason storage is unavailable, or None."""
        if self.reason is None:
            return None
        try:
            await probe()
        except StorageUnavailable as exc:
            self.failed(str(exc.extra.get("reason") or exc.message))
            return self.reason
        self.recovered()
        return None


def client_address(request: web.Request) -> str:
    """The client's address for the per-address cap: the peer's, or, when the peer is a
    reverse proxy on this host (loopback), the last X-Forwarded-For entry, which the proxy
    appended (nginx's $proxy_add_x_forwarded_for, Caddy's default)."""
    peer = request.remote or ""
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded and (peer.startswith("127.") or peer == "::1"):
        last = forwarded.rsplit(",", 1)[-1].strip()
        if last:
            return last
    return peer


def _error_json(code: str, message: str, status: int,
                headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status,
                             headers=headers)


def _reason_code(reason: str) -> str:
    return reason.lower().replace(" ", "_").replace("-", "_")


def error_middleware(cors: Mapping[str, str], guard: ConnectionGuard, health: StorageHealth,
                     errors: ErrorLog | None = None) -> Any:
    """The middleware (see the module docstring). `cors` headers go on callback answers."""
    errors = errors or ErrorLog(log)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        is_callback = request.path.endswith("/webview/callback")
        socket: tuple[str, str] | None = None
        protocol = request.protocol
        guard.busy(protocol, True)
        try:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                socket = (client_address(request), request.query.get("session", ""))
                guard.admit(*socket)
            response = await handler(request)
        except TooManyConnections as exc:
            socket = None  # not admitted: nothing to release
            response = web.json_response(exc.body(), status=exc.status,
                                         headers={"Retry-After": str(exc.retry_after)})
        except StorageUnavailable as exc:
            reason = str(exc.extra.get("reason") or exc.message)
            health.failed(reason)
            errors.error(kind(exc), f"{request.method} {request.path}: {exc.message}")
            body = {"error": exc.code, "message": exc.message}
            response = web.json_response(body, status=503,
                                         headers={"Retry-After": str(exc.retry_after)})
        except ApiError as exc:
            response = web.json_response(exc.body(), status=exc.status)
            if isinstance(exc, RequestTimeout):
                # answer, then close at once: aiohttp would otherwise linger reading the
                # rest of the slow body for up to 10 s (sent here, so CORS goes on first)
                if is_callback:
                    response.headers.update(cors)
                response.force_close()
                await response.prepare(request)
                await response.write_eof()
                protocol.force_close()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _error_json(
                _reason_code(exc.reason), f"{exc.reason}: {request.method} {request.path}",
                exc.status,
                headers={"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None)
        except (asyncio.CancelledError, ConnectionError):
            raise  # the client went away: nobody to answer
        except Exception as exc:
            errors.error(kind(exc), f"{request.method} {request.path} failed", exc)
            response = _error_json(
                "internal_error", "The server failed to handle this request (a bug; it is "
                "in the server's log). Retrying will not help until it is fixed.", 500)
        finally:
            guard.busy(protocol, False)
            if socket is not None:
                guard.release(*socket)
        if is_callback:
            response.headers.update(cors)
        return response

    return middleware
