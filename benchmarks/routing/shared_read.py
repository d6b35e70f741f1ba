"""What the shared in-flight counts cost a routing decision: one read of the other replicas'
counts (exporter/routing/shared_counts.py) against the real redis-server on loopback.

16 replicas, each with one request in flight on every one of 32 backends for one model: the
herd table's fleet, fully busy. The read a decision makes (that model's fields, summed over
the other 15 replicas in the Lua script) is timed 2,000 times after 200 to warm up, beside a
PING on the same connection pool (the floor: one round trip).

    .venv/bin/python -m benchmarks.routing.shared_read
"""

from __future__ import annotations

import asyncio
import time

from exporter.routing.shared import RedisLedger
from exporter.routing.shared_counts import SharedInFlight
from tests.helpers import RedisServer

REPLICAS, BACKENDS, MODEL = 16, 32, "llama3.1:8b"
WARMUP, SAMPLES = 200, 2000


def _percentiles(seconds: list[float]) -> str:
    seconds.sort()
    n = len(seconds)
    return " ".join(f"p{p} {seconds[min(n - 1, n * p // 100)] * 1000:.3f} ms"
                    for p in (50, 90, 99))


async def _timed(call: object, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await call()  # type: ignore[operator]
        out.append(time.perf_counter() - started)
    return out


async def main() -> None:
    redis = RedisServer()
    replicas: list[SharedInFlight] = []
    try:
        for i in range(REPLICAS):
            ledger = RedisLedger(redis.url, "bench")
            await ledger.start()
            counts = SharedInFlight(ledger, dict, replica=f"r{i}")
            for b in range(BACKENDS):
                counts.add(f"b{b}", MODEL, 1)
            replicas.append(counts)
        await asyncio.sleep(0.5)  # the background writes land
        me = replicas[0]
        seen = await me.others(MODEL)
        assert seen is not None and len(seen) == BACKENDS, seen
        for name, call in (("read", lambda: me.others(MODEL)),
                           ("ping", me.shared.redis.ping)):
            await _timed(call, WARMUP)
            print(f"{name}: {_percentiles(await _timed(call, SAMPLES))}")
        try:
            import hiredis  # noqa: F401

            print("parser: hiredis")
        except ImportError:
            print("parser: redis-py's own (pure Python)")
    finally:
        for counts in replicas:
            await counts.shared.close()
        redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
