"""`python -m bench flood`: WebSocket floods and slowloris clients against `flowbot serve`
while callbacks run. Prints callback latency with and without the flood, what the caps
refused, how long slow clients were held, /healthz during the flood, and RSS before,
at the peak and after.

One client address opens `--ws-attempts` WebSockets (many at a time, each kept open if
admitted), `--slowloris` connections send one header line every `--slow-interval`
seconds and never finish, and `--callback-concurrency` clients POST callbacks the whole
time. The server runs with its default [server] limits."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import statistics
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import (
    copy_db,
    flowbot_server,
    free_port,
    log,
    read_ids,
    rss_mb,
    table,
    template_db,
    write_config,
)


@dataclass
class Latencies:
    ms: list[float] = field(default_factory=list)
    errors: int = 0

    def row(self, label: str) -> list[object]:
        if not self.ms:
            return [label, 0, "-", "-", "-", self.errors]
        q = statistics.quantiles(self.ms, n=100) if len(self.ms) > 1 else self.ms * 99
        return [label, len(self.ms), f"{statistics.median(self.ms):.1f}", f"{q[98]:.1f}",
                f"{max(self.ms):.1f}", self.errors]


def _callbacks_elsewhere(base: str, ids: list[str], concurrency: int, seconds: float,
                         out: Latencies) -> asyncio.Future[None]:
    """`_callbacks` in a process of its own, so the flood generator's CPU use does not
    show up as callback latency."""

    def done(result: tuple[list[float], int]) -> None:
        out.ms.extend(result[0])
        out.errors += result[1]

    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ProcessPoolExecutor(1)
    fut = loop.run_in_executor(pool, _callbacks_process, base, ids, concurrency, seconds)
    fut.add_done_callback(lambda f: (done(f.result()), pool.shutdown(wait=False)))
    return fut


def _callbacks_process(base: str, ids: list[str], concurrency: int,
                       seconds: float) -> tuple[list[float], int]:
    out = Latencies()
    asyncio.run(_callbacks(base, ids, concurrency, time.monotonic() + seconds, out))
    return out.ms, out.errors


async def _callbacks(base: str, ids: list[str], concurrency: int, until: float,
                     out: Latencies) -> None:
    async with aiohttp.ClientSession() as session:
        async def one_client() -> None:
            while time.monotonic() < until and ids:
                eid = ids.pop()
                t = time.perf_counter()
                try:
                    async with session.post(f"{base}/webview/callback", json={
                            "executionId": eid, "success": True, "data": {"ref": "R"}}) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    out.ms.append((time.perf_counter() - t) * 1000)
                else:
                    out.errors += 1

        await asyncio.gather(*(one_client() for _ in range(concurrency)))


@dataclass
class Flood:
    admitted: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    failed: int = 0
    slow_held_s: list[float] = field(default_factory=list)
    health_ok: int = 0
    health_bad: int = 0
    health_slowest: float = 0.0


async def _ws_flood(base: str, attempts: int, parallel: int, flood: Flood,
                    opened: list[aiohttp.ClientWebSocketResponse],
                    session: aiohttp.ClientSession) -> None:
    sem = asyncio.Semaphore(parallel)
    url = base.replace("http://", "ws://")

    async def attempt(i: int) -> None:
        async with sem:
            try:
                ws = await session.ws_connect(f"{url}/ws?session=flood{i:016d}&after=0",
                                              heartbeat=None, timeout=aiohttp.ClientWSTimeout(
                                                  ws_receive=None, ws_close=5))
            except aiohttp.WSServerHandshakeError as exc:
                flood.refused[exc.status] = flood.refused.get(exc.status, 0) + 1
            except (TimeoutError, aiohttp.ClientError, OSError):
                flood.failed += 1
            else:
                flood.admitted += 1
                opened.append(ws)

    await asyncio.gather(*(attempt(i) for i in range(attempts)))


async def _slowloris(port: int, interval: float, flood: Flood) -> None:
    t = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        flood.failed += 1
        return
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        n = 0
        while True:
            try:
                data = await asyncio.wait_for(reader.read(1), interval)
            except TimeoutError:
                n += 1
                writer.write(f"X-Slow-{n}: 1\r\n".encode())
                await writer.drain()
                continue
            if not data:  # the server closed it
                break
    except (ConnectionError, OSError):
        pass
    finally:
        flood.slow_held_s.append(time.monotonic() - t)
        writer.close()


def _health_process(base: str, seconds: float) -> tuple[int, int, float]:
    """GET /healthz every 0.5 s from a process of its own (the flood generator's busy
    event loop would delay it): (ok, not ok, slowest seconds)."""
    ok = bad = 0
    slowest = 0.0
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=5) as resp:
                ok += resp.status == 200
                bad += resp.status != 200
        except OSError:
            bad += 1
        slowest = max(slowest, time.perf_counter() - t)
        time.sleep(0.5)
    return ok, bad, slowest


async def _health(base: str, seconds: float, flood: Flood) -> None:
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(1) as pool:
        flood.health_ok, flood.health_bad, flood.health_slowest = await loop.run_in_executor(
            pool, _health_process, base, seconds)


async def _run(args: argparse.Namespace, base: str, port: int, pid: int,
               ids: list[str]) -> None:
    seconds = args.flood_seconds
    baseline = Latencies()
    log(f"baseline: callbacks at concurrency {args.callback_concurrency} for {seconds:.0f} s")
    third = len(ids) // 3
    await _callbacks_elsewhere(base, ids[:third], args.callback_concurrency, seconds, baseline)
    rss_before = rss_mb(pid)

    log(f"flood: {args.ws_attempts:,} WebSocket attempts, {args.slowloris:,} slowloris, "
        f"callbacks, for {seconds:.0f} s or until the attempts are done")
    flood, during = Flood(), Latencies()
    opened: list[aiohttp.ClientWebSocketResponse] = []
    started = time.monotonic()
    until = started + seconds
    peak = [rss_before]

    async def watch_rss() -> None:
        while time.monotonic() < until + 5:
            peak[0] = max(peak[0], rss_mb(pid))
            await asyncio.sleep(0.25)

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        slow = [asyncio.create_task(_slowloris(port, args.slow_interval, flood))
                for _ in range(args.slowloris)]
        watcher = asyncio.create_task(watch_rss())
        await asyncio.gather(
            _ws_flood(base, args.ws_attempts, args.ws_parallel, flood, opened, session),
            _callbacks_elsewhere(base, ids[third:2 * third], args.callback_concurrency,
                                 seconds, during),
            _health(base, seconds, flood))
        flood_s = time.monotonic() - started
        await asyncio.wait_for(asyncio.gather(*slow), 120)
        for ws in opened:
            await ws.close()
        await watcher
    await asyncio.sleep(5)  # let the server notice every close
    after = Latencies()
    await _callbacks_elsewhere(base, ids[2 * third:], args.callback_concurrency, 3, after)
    rss_after = rss_mb(pid)

    print(f"\n## Flood: {args.ws_attempts:,} WebSocket attempts and {args.slowloris:,} "
          f"slowloris clients while callbacks run ({flood_s:.0f} s)\n")
    print(table(["callbacks", "count", "p50 ms", "p99 ms", "max ms", "errors"],
                [baseline.row("normal (no flood)"), during.row("during the flood"),
                 after.row("after the flood")]))
    held = sorted(flood.slow_held_s)
    print()
    print(table(["what", "figure"], [
        ["WebSockets admitted (kept open)", flood.admitted],
        ["WebSockets refused, by status", json.dumps(flood.refused, sort_keys=True)],
        ["attempts that failed otherwise", flood.failed],
        ["slowloris held, median / max s",
         f"{statistics.median(held):.1f} / {held[-1]:.1f}" if held else "-"],
        ["/healthz during the flood, ok / not / slowest s",
         f"{flood.health_ok} / {flood.health_bad} / {flood.health_slowest:.2f}"],
        ["RSS before / peak / 5 s after, MB",
         f"{rss_before:.0f} / {peak[0]:.0f} / {rss_after:.0f}"],
    ]))


def run(args: argparse.Namespace) -> None:
    workdir: Path = args.workdir
    src, seeded = template_db(workdir, args.flood_waits)
    db = copy_db(src, workdir / "flood.db")
    port = free_port()
    config = write_config(workdir, db, port, "flood")
    config.write_text(config.read_text().replace(
        "[channels.web]\nenabled = false", "[channels.web]\nenabled = true"))
    ids = read_ids(seeded.ids_file, 0, seeded.count)
    with flowbot_server(config, port, workdir / "flood.log") as server:
        asyncio.run(_run(args, f"http://127.0.0.1:{port}", port, server.pid, ids))
