"""Request latency through llmtap with tracing off, to a live collector, to a dead one and to
a hanging one — side by side, in one run, against one synthetic upstream.

    .venv/bin/python -m benchmarks.tracing.run [--requests 400] [--concurrency 8]

Writes benchmarks/tracing/results.md. Each configuration gets a fresh llmtap process in front
of the same simulator; the load generator is this process (asyncio, closed loop at the given
concurrency), measuring TTFT and total time per streamed /api/chat request as the client
sees them, plus llmtap's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import Llmtap, Simulator, running
from tests.otlp import HTTPReceiver

RESULTS = Path(__file__).with_name("results.md")
BODY = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_predict": 16}}


async def one(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    start = time.perf_counter()
    first = 0.0
    async with session.post(url + "/api/chat", json=BODY) as resp:
        async for _ in resp.content.iter_any():
            if not first:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start


async def load(url: str, requests: int, concurrency: int) -> list[tuple[float, float]]:
    results: list[tuple[float, float]] = []
    queue = list(range(requests))
    async with aiohttp.ClientSession() as session:
        for _ in range(50):  # warm-up: connections, caches, the exporter
            await one(session, url)

        async def worker() -> None:
            while queue:
                queue.pop()
                results.append(await one(session, url))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # peak resident set
            return int(line.split()[1]) / 1024
    return float("nan")


async def main(requests: int, concurrency: int) -> str:
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(512)  # accepts, never answers
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # never listens: connections refused
    rows: list[Any] = []
    with running(Simulator("--ttft", "0.005", "--tokens-per-second", "2000",
                           "--parallel", "64")) as sim:
        async with HTTPReceiver() as receiver:
            configs = {
                "tracing off": None,
                "collector up": receiver.port,
                "collector down (refused)": refused.getsockname()[1],
                "collector hanging": hanging.getsockname()[1],
            }
            # Two rounds in rotation; the table is the second, so no configuration pays for
            # warming up the simulator or the machine.
            for round_ in range(2):
                rows = []
                for name, port in configs.items():
                    env = {} if port is None else {
                        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                        "OTEL_EXPORTER_OTLP_TIMEOUT": "2"}
                    with running(Llmtap(sim.url, "--access-log", "false", env=env)) as tap:
                        results = await load(tap.url, requests, concurrency)
                        dropped = tap.metrics().value("llmtap_spans_dropped_total")
                        rows.append((name, [r[0] for r in results], [r[1] for r in results],
                                     rss_mb(tap.proc.pid), dropped))
                print(f"round {round_ + 1} done")
            received = len(receiver.spans)
    hanging.close()
    refused.close()
    base_ttft = statistics.median(rows[0][1])
    lines = [f"Requests: {requests} streamed /api/chat (16 tokens) at concurrency "
             f"{concurrency}, after 50 warm-up; {platform.machine()}, "
             f"{platform.python_version()}. Command: `.venv/bin/python -m "
             f"benchmarks.tracing.run --requests {requests} --concurrency {concurrency}`",
             "",
             "| configuration | TTFT p50 ms | TTFT p99 ms | total p50 ms | total p99 ms | "
             "TTFT p50 vs off | peak RSS MB | spans dropped |",
             "|---|---|---|---|---|---|---|---|"]
    for name, ttfts, totals, rss, dropped in rows:
        lines.append(f"| {name} | {pct(ttfts, 0.5):.2f} | {pct(ttfts, 0.99):.2f} | "
                     f"{pct(totals, 0.5):.2f} | {pct(totals, 0.99):.2f} | "
                     f"{statistics.median(ttfts) / base_ttft:.2f}x | {rss:.0f} | "
                     f"{dropped:.0f} |")
    lines += ["", f"The live collector received {received} spans over both rounds. Spans to a "
              "dead collector are dropped only once the exporter gives up on a batch (a 5 s "
              "batch delay plus OTEL_EXPORTER_OTLP_TIMEOUT), mostly after the timed run; "
              "tests/test_tracing.py counts them."]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    table = asyncio.run(main(args.requests, args.concurrency))
    RESULTS.write_text("# Tracing cost, side by side\n\n" + table + "\n")
    print(table)
