"""Router replicas that share their in-flight counts through the real Redis (Debian's
redis-server, started by the test session on a loopback port).

Between two polls a replica alone knows only its own sends; sharing the counts, every replica
ranks with all of them (the simulator's many-replica table shows what that is worth). The end
to end test runs two `llmtap route` processes whose polls are too rare to show anything, so
only the shared counts can tell one replica where the other sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from exporter.routing import shared_counts
from exporter.routing.breaker import Breaker
from exporter.routing.config import BreakerSpec
from exporter.routing.registry import Sidecar
from exporter.routing.shared import RedisLedger
from exporter.routing.shared_counts import Counts, SharedInFlight, per_backend
from tests.helpers import Llmtap, LlmtapRouter, RedisServer, Simulator, free_port, running

_prefixes = itertools.count()


async def _pair(url: str, mine: list[Counts], rewrite_every: float) -> list[SharedInFlight]:
    """Two replicas' counts; `mine` stands for their own (what the rewrite writes)."""
    prefix = f"replicas{next(_prefixes)}"
    out = []
    for i in range(2):
        ledger = RedisLedger(url, prefix, refresh_interval=rewrite_every)
        await ledger.start()
        counts = SharedInFlight(ledger, lambda i=i: mine[i], replica=f"r{i}")  # type: ignore[misc]
        await counts.start()
        out.append(counts)
    return out


async def _close(replicas: list[SharedInFlight]) -> None:
    for r in replicas:
        await r.close()
        await r.shared.close()


async def _settled() -> None:
    await asyncio.sleep(0.05)  # background writes land


async def test_each_replica_reads_the_others_counts_not_its_own(
        redis_server: RedisServer) -> None:
    mine: list[Counts] = [{}, {}]
    a, b = await _pair(redis_server.url, mine, rewrite_every=60)  # the writes alone
    try:
        a.add("x", "llama3", 1)
        a.add("x", "llama3", 1)
        a.add("y", 'odd "name" \x1f', 1)  # any model name a client sends is only data
        b.add("x", "llama3", 1)
        await _settled()
        assert await b.others() == {("x", "llama3"): 2, ("y", 'odd "name" \x1f'): 1}
        assert await a.others() == {("x", "llama3"): 1}
        assert await b.others("llama3") == {("x", "llama3"): 2}  # one model's only
        assert await b.others("llama") == {}  # a name's prefix is another name
        assert await b.others(backend="y") == {("y", 'odd "name" \x1f'): 1}  # one backend's
        assert await b.others(backend='"') == {}  # a quote in a name is escaped: no match
        assert await b.others("llama3", "x") == {("x", "llama3"): 2}
        a.add("x", "llama3", -1)
        a.add("y", 'odd "name" \x1f', -1)
        await _settled()
        assert await b.others() == {("x", "llama3"): 1}
        # A field at 0 is deleted: the hash holds only what is in flight.
        fields = await a.shared.redis.hgetall(a.shared.key("inflight", "r0"))
        assert list(fields.values()) == [b"1"]
    finally:
        await _close([a, b])


async def test_the_periodic_rewrite_corrects_lost_writes_and_a_dead_replica_expires(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_counts, "COUNTS_TTL", 0.5)
    mine: list[Counts] = [{("x", "m"): 3}, {}]
    a, b = await _pair(redis_server.url, mine, rewrite_every=0.1)
    try:
        a.add("x", "m", 1)  # the live count says 3: this write is "lost" or stale
        await asyncio.sleep(0.3)  # a rewrite (every 0.1 s) puts the truth back
        assert await b.others() == {("x", "m"): 3}
        assert a._task is not None
        a._task.cancel()  # a dies without a word: no more rewrites, no delete
        with contextlib.suppress(asyncio.CancelledError):
            await a._task
        a._task = None
        await asyncio.sleep(0.7)
        assert await b.others() == {}  # its counts expired with it
        members = await b.shared.redis.smembers(b.shared.key("replicas", "inflight"))
        assert b"r0" not in members  # and the readers forgot it
    finally:
        await _close([a, b])


async def test_a_redis_that_does_not_answer_costs_a_decision_at_most_the_deadline() -> None:
    """A Redis that accepts and never answers: others() gives up after READ_DEADLINE and
    says "unknown" (None), so the router ranks with its own counts and the estimate."""
    silent_port = free_port()
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", silent_port)
    ledger = RedisLedger(f"redis://127.0.0.1:{silent_port}/0", "silent")
    counts = SharedInFlight(ledger, dict)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await counts.others() is None
        assert loop.time() - started < shared_counts.READ_DEADLINE + 0.2
    finally:
        server.close()
        for w in held:
            w.close()
        await ledger.redis.aclose()


def test_a_sidecar_candidate_counts_every_replica_only_with_both_readings() -> None:
    """With shared counts, "this router" is all the replicas: its in flight now and at the
    poll both include the others'. Without both readings, it is the replica alone (and the
    estimate of the others' sends takes over)."""
    sidecar = Sidecar("x", "http://x", "http://x:9464", None, Breaker(BreakerSpec()))
    state = {"upstream": {"kind": "ollama", "up": True, "models": ["m:latest"]},
             "models": {"m:latest": {"in_flight": 5, "installed": True, "loaded": True}}}
    sidecar.started("m")
    sidecar.polled(state, 100.0)
    polled = per_backend({("x", "m"): 3, ("y", "m"): 7, ("x", "n"): 1})
    assert polled == {"x": {"m": 3, "n": 1}, "y": {"m": 7}}
    sidecar.saw_others(polled["x"])  # at the poll
    sidecar.started("m")
    c = sidecar.candidate("m", 100.2, 1.5)
    assert (c.router_in_flight, c.router_in_flight_at_poll) == (2 + 3, 1 + 3)
    sidecar.saw_others({"m": 6}, "m")  # the others sent three more since the poll
    c = sidecar.candidate("m", 100.3, 1.5)
    assert (c.router_in_flight, c.router_in_flight_at_poll) == (2 + 6, 1 + 3)
    assert sidecar.others == {"m": 6, "n": 1}  # another model's figure kept as last read
    sidecar.saw_others(None, "m")  # this decision's read failed
    c = sidecar.candidate("m", 100.4, 1.5)
    assert (c.router_in_flight, c.router_in_flight_at_poll) == (2, 1)


# --------------------------------------------------------------------------- end to end


async def _stream(session: aiohttp.ClientSession, base: str, i: int,
                  opened: asyncio.Event) -> bytes:
    body = {"model": "m1", "messages": [{"role": "user", "content": f"tell me {i}"}]}
    async with session.post(base + "/api/chat", data=orjson.dumps(body)) as resp:
        assert resp.status == 200, await resp.read()
        first = await resp.content.readline()  # the first token: it is being served
        opened.set()
        return first + await resp.read()


BACKENDS = 6


async def _until_loaded(tap: Llmtap) -> None:
    for _ in range(100):
        if tap.state()["models"].get("m1:latest", {}).get("loaded"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"m1 never shown loaded: {tap.state()}")


@pytest.fixture
async def fleet() -> AsyncIterator[list[Llmtap]]:
    # One simulator serving many at once behind six sidecars: six backends of parallel 1
    # (an Ollama sidecar's default), each answer about 3 s long.
    sim = Simulator("--models", "m1", "--ttft", "0.02", "--tokens-per-second", "10",
                    "--output-tokens", "30", "--parallel", "16")
    with running(sim):
        # Loaded first: an idle backend that would have to load the model looks worse than
        # a busy one already loading it, which is not what this test is about.
        warm = {"model": "m1", "prompt": "hi", "stream": False, "options": {"num_predict": 1}}
        async with aiohttp.ClientSession() as session, \
                session.post(sim.url + "/api/generate", data=orjson.dumps(warm)) as resp:
            assert resp.status == 200, await resp.read()
        taps = [Llmtap(sim.url, "--health-interval", "0.2", "--inventory-interval", "0.2")
                for _ in range(BACKENDS)]
        try:
            for tap in taps:
                await _until_loaded(tap)
            yield taps
        finally:
            for tap in taps:
                tap.stop()


async def test_two_replicas_sharing_counts_never_send_two_requests_to_one_backend(
        redis_server: RedisServer, fleet: list[Llmtap]) -> None:
    """Six requests, one after the other, alternately to two replicas whose polls (every
    30 s) cannot show what the other sent: each lands on a backend of its own, because each
    replica reads the other's in-flight counts before it decides. (Knowing only its own, a
    replica picks one the other is using with odds that make all six apart about 1 in 20.)
    Afterwards nothing is left in Redis."""
    prefix = f"replicas{next(_prefixes)}"
    config = ("poll_interval: 30\nstale_after: 120\nbackends:\n"
              + "".join(f'  - {{name: b{i}, proxy_url: "{t.url}", admin_url: "{t.admin}"}}\n'
                        for i, t in enumerate(fleet))
              + f"shared_state: {{redis_url: '{redis_server.url}', prefix: {prefix}}}\n")
    replicas = [LlmtapRouter(config) for _ in range(2)]
    try:
        async with aiohttp.ClientSession() as session:
            streams = []
            for i in range(BACKENDS):
                opened = asyncio.Event()
                streams.append(asyncio.create_task(
                    _stream(session, replicas[i % 2].url, i, opened)))
                await asyncio.wait_for(opened.wait(), 10)
            answers = await asyncio.gather(*streams)
        assert all(b'"done":true' in a for a in answers)
        served = {f"b{i}": t.metrics().value("gen_ai_server_request_duration_seconds_count")
                  for i, t in enumerate(fleet)}
        assert sorted(served.values()) == [1] * BACKENDS, served
        for replica in replicas:
            made = replica.metrics().value("llmtap_router_decisions_total")
            assert made == BACKENDS // 2
        import redis

        client = redis.Redis.from_url(redis_server.url)
        keys = [k for k in client.scan_iter(f"{prefix}:inflight:*")]
        assert all(client.hlen(k) == 0 for k in keys), keys
        client.close()
    finally:
        for replica in replicas:
            replica.stop()
