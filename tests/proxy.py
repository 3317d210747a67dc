"""A TCP proxy on 127.0.0.1 that forwards what a client sends in small segments with delays,
the way a real network delivers a body (MSS-sized or smaller pieces, gaps between them).
It runs on a thread of its own, so sync clients (requests, schemathesis) and the tests'
own event loop can both use it. Answers come back unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
from collections.abc import Iterator


class SegmentingProxy:
    """Forwards 127.0.0.1:`port` → 127.0.0.1:`target`. Client bytes go on in segments of
    `sizes` bytes (random, seeded), each followed by `delay` seconds; after the request's
    headers (the first CRLF CRLF) and right after each `cut_after` marker there is a
    boundary and a longer `pause`. TCP_NODELAY upstream keeps the segments apart."""

    def __init__(self, target: int, *, sizes: tuple[int, int] = (7, 1448),
                 delay: float = 0.001, pause: float = 0.05, cut_after: tuple[bytes, ...] = (),
                 seed: int = 12) -> None:
        self.target = target
        self.sizes = sizes
        self.delay = delay
        self.pause = pause
        self.cut_after = cut_after
        self.rng = random.Random(seed)
        self.port = 0
        self.segments = 0  # how many segments went upstream (to prove the split happened)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SegmentingProxy:
        self._thread = threading.Thread(target=self._run, name="segmenting-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    async def _client(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            down_w.close()
            return
        sock = up_w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = asyncio.create_task(self._copy(up_r, down_w))
        try:
            await self._segment(down_r, up_w)
            await back
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            back.cancel()
            for w in (up_w, down_w):
                with contextlib.suppress(Exception):
                    w.close()

    async def _segment(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = bytearray()  # the whole stream so far, to place the cuts
        sent = 0
        cuts: set[int] = set()
        while data := await reader.read(65536):
            seen += data
            start = max(0, len(seen) - len(data) - 64)
            for marker in (b"\r\n\r\n", *self.cut_after):
                at = seen.find(marker, start)
                while at >= 0:
                    cuts.add(at + len(marker))
                    at = seen.find(marker, at + 1)
            while sent < len(seen):
                size = self.rng.randint(*self.sizes)
                nearest = min((c for c in cuts if c > sent), default=None)
                end = min(len(seen), sent + size)
                if nearest is not None and nearest < end:
                    end = nearest
                writer.write(bytes(seen[sent:end]))
                await writer.drain()
                self.segments += 1
                sent = end
                await asyncio.sleep(self.pause if sent in cuts else self.delay)
        if writer.can_write_eof():
            writer.write_eof()

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()


@contextlib.contextmanager
def segmenting_proxy(target: int, *, cut_after: tuple[bytes, ...] = (),
                     sizes: tuple[int, int] = (7, 1448),
                     pause: float = 0.05) -> Iterator[SegmentingProxy]:
    """A started `SegmentingProxy` to 127.0.0.1:`target`, stopped afterwards."""
    proxy = SegmentingProxy(target, cut_after=cut_after, sizes=sizes, pause=pause)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
