"""Connection limits: caps on the web chat's WebSockets (per chat session, per client
address, in total) and a deadline for a connection to send a request's headers, so a
flood of sockets or a slowloris client cannot use up the process's file descriptors and
memory while the health, callback and webhook paths stay reachable."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable

from aiohttp import web

from bot.config import ServerConfig
from bot.errors import TooMany

log = logging.getLogger(__name__)


class TooManyConnections(TooMany):
    """A WebSocket past a cap: 429 for one address's or one session's share, 503 when the
    server as a whole is full. Carries Retry-After."""

    status = 429
    retry_after = 10


class ServerFull(TooManyConnections):
    status = 503


class ConnectionGuard:
    """Counts open WebSockets and watches idle connections of one server.

    `admit(address, session)` reserves a WebSocket slot (raises `TooManyConnections`),
    `release(...)` frees it. `watch(server)` starts dropping connections that have not
    sent a complete request's headers within `header_timeout` seconds of opening (or of
    their previous request ending); `busy(protocol, True/False)` marks a connection whose
    request is being handled (its body has a deadline of its own, see bot/body.py).
    `clock` is monotonic seconds (injectable for tests)."""

    def __init__(self, cfg: ServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_total = cfg.max_websockets
        self.max_per_address = cfg.max_websockets_per_address
        self.max_per_session = cfg.max_websockets_per_session
        self.header_timeout = cfg.header_timeout
        self.clock = clock
        self.sockets = 0
        self.by_address: Counter[str] = Counter()
        self.by_session: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # why: "total", "address", "session"
        self.dropped_slow = 0  # connections closed for not sending headers in time
        # per connection (aiohttp's RequestHandler: no weak references); only while a server
        # is watched, and pruned by each sweep to the connections still open
        self._idle_since: dict[object, float] = {}
        self._busy: set[object] = set()
        self._servers: list[web.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

    # -- WebSockets -------------------------------------------------------------------------

    def admit(self, address: str, session: str) -> None:
        """Reserve a WebSocket slot for a client, or raise `TooManyConnections`."""
        if self.sockets >= self.max_total:
            self._refuse("total")
            raise ServerFull("server_busy", f"The server has its maximum of {self.max_total} "
                             "chat connections open; try again in a few seconds "
                             "(server.max_websockets).")
        if self.by_address[address] >= self.max_per_address:
            self._refuse("address")
            raise TooManyConnections(
                "too_many_connections", f"This address has {self.max_per_address} chat "
                "connections open already; close some tabs (server.max_websockets_per_address).")
        if session and self.by_session[session] >= self.max_per_session:
            self._refuse("session")
            raise TooManyConnections(
                "too_many_connections", f"This chat has {self.max_per_session} connections "
                "open already; close the other copies of this tab "
                "(server.max_websockets_per_session).")
        self.sockets += 1
        self.by_address[address] += 1
        if session:
            self.by_session[session] += 1

    def release(self, address: str, session: str) -> None:
        """Free a slot `admit` reserved."""
        self.sockets -= 1
        for counter, key in ((self.by_address, address), (self.by_session, session)):
            if key:
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]

    def _refuse(self, why: str) -> None:
        self.refused[why] += 1
        if self.refused.total() in (1, 10, 100, 1000) or self.refused.total() % 10000 == 0:
            log.warning("refused chat connections past their caps so far: %s",
                        dict(self.refused))

    # -- slow clients -----------------------------------------------------------------------

    def busy(self, protocol: object, busy: bool) -> None:
        """Mark the connection `protocol` (a request's `request.protocol`) as handling a
        request, or as idle again from now on."""
        if not self._servers:
            return
        if busy:
            self._busy.add(protocol)
        else:
            self._busy.discard(protocol)
            self._idle_since[protocol] = self.clock()

    def watch(self, server: web.Server) -> None:
        """Sweep `server`'s connections from now on (call from a running event loop)."""
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="slow-clients")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep_forever(self) -> None:
        interval = min(1.0, self.header_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    def sweep(self) -> int:
        """Close every connection idle (no request being handled) for longer than the
        header deadline; returns how many were closed."""
        now = self.clock()
        closed = 0
        open_now = {conn for server in self._servers for conn in server.connections}
        self._busy &= open_now
        self._idle_since = {c: t for c, t in self._idle_since.items() if c in open_now}
        for conn in open_now:
            if conn in self._busy:
                continue
            since = self._idle_since.setdefault(conn, now)
            if now - since >= self.header_timeout:
                conn.force_close()
                closed += 1
        self.dropped_slow += closed
        return closed
