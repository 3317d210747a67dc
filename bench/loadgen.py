"""Which load generator takes less of the 2 cores: wrk, or aiohttp clients in 2 processes?

Both drive the bare handler at the same concurrency; the one that gets more requests/s
out of the same server is the smaller bottleneck, and the benchmarks use it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from pathlib import Path

import aiohttp

from bench.common import bare_server, free_port, log, proc_cpu, run_wrk, table

PROCESSES = 2


async def _client(url: str, conns: int, seconds: float) -> tuple[int, list[float]]:
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    body = b'{"executionId":"bare0000000000000000000","success":true,"data":{"ref":"R-1"}}'
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while time.perf_counter() < end:
                t = time.perf_counter()
                async with session.post(url, data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(worker() for _ in range(conns)))
    return len(latencies), latencies


def _process(url: str, conns: int, seconds: float,
             out: multiprocessing.Queue[tuple[int, list[float]]]) -> None:
    out.put(asyncio.run(_client(url, conns, seconds)))


def aiohttp_load(url: str, concurrency: int, seconds: float) -> tuple[float, float, float]:
    """(requests/s, p99 ms, client CPU seconds per wall second) from PROCESSES clients."""
    queue: multiprocessing.Queue[tuple[int, list[float]]] = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_process,
                                     args=(url, concurrency // PROCESSES, seconds, queue))
             for _ in range(PROCESSES)]
    t = time.perf_counter()
    for p in procs:
        p.start()
    results = [queue.get(timeout=seconds + 60) for _ in procs]
    cpu = 0.0
    for p in procs:
        if p.pid is not None:
            cpu += proc_cpu(p.pid)
        p.join()
    wall = time.perf_counter() - t
    lat = sorted(x for _, lats in results for x in lats)
    total = sum(n for n, _ in results)
    return total / seconds, lat[int(0.99 * len(lat))] * 1000 if lat else 0.0, cpu / wall


def run(args: argparse.Namespace) -> dict[str, object]:
    workdir: Path = args.workdir
    port = free_port()
    rows = []
    with bare_server(port, workdir / "loadgen-bare.log") as bare:
        url = f"http://127.0.0.1:{port}/webview/callback"
        for _ in range(2):
            w = run_wrk(url, mode="bare", concurrency=64, seconds=args.seconds,
                        server_pid=bare.pid)
            rows.append(["wrk -t1", w.rps, w.p99_ms, f"{w.server_cpu:.2f}"])
            cpu0 = proc_cpu(bare.pid)
            t = time.perf_counter()
            rps, p99, _client_cpu = aiohttp_load(url, 64, args.seconds)
            server_cpu = (proc_cpu(bare.pid) - cpu0) / (time.perf_counter() - t)
            rows.append([f"aiohttp client, {PROCESSES} processes", rps, p99, f"{server_cpu:.2f}"])
            log(f"loadgen: wrk {w.rps:,.0f}/s, aiohttp {rps:,.0f}/s")
    print("\n### load generators against the bare handler, c=64\n")
    print(table(["generator", "req/s", "p99 ms", "server CPU"], rows))
    return {"rows": rows}
