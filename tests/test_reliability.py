"""Reliability under faults and load: client disconnects, broken upstreams, 10,000 requests,
slow readers. Each test says what was kept (bytes, connections, memory) and what was counted.

Real parts: the simulator as the upstream, llmtap as a subprocess, and `tests/faults.py`
(a TCP fault proxy on its own thread) between them where the upstream side is observed.
Figures are printed (run with -s); timing is asserted only where a bound is stated.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import random
import socket
import statistics
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import aiohttp
import orjson
import pytest

from tests.faults import FaultProxy, Faults
from tests.helpers import Llmtap, Simulator, free_port, running

DURATION = "gen_ai_server_request_duration_seconds_count"
TTFT = "gen_ai_server_time_to_first_token_seconds_count"
CHAT = [{"role": "user", "content": "Why is the sky blue?"}]
MB = 1 << 20


def http_request(port: int, path: str, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> bytes:
    payload = orjson.dumps(body)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n")
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return head.encode() + b"\r\n" + payload


def closed(proxy: FaultProxy, tag: str) -> bool:
    """Has llmtap closed the upstream connection that carried request `tag`?"""
    found = proxy.find("x-test-id", tag)
    return found is not None and found[0].downstream_closed is not None


def rst(sock: socket.socket | None) -> None:
    """Make the next close send RST instead of FIN."""
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def until(predicate: Callable[[], Any], within: float, interval: float = 0.01) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within}s: {predicate}")
        await asyncio.sleep(interval)


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return (f"p50 {statistics.median(ordered) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
            f"max {ordered[-1] * 1000:.1f} ms (n={len(ordered)})")


def assert_no_traceback(tap: Llmtap) -> None:
    """Nothing raised inside llmtap: its log holds no traceback."""
    log = tap.log.read_text(errors="replace")
    first = log.find("Traceback")
    assert first < 0, (f"{log.count('Traceback')} tracebacks in llmtap's log; the first:\n"
                       + log[max(0, first - 200):first + 1500])


async def scrape(tap: Llmtap) -> Any:
    return await asyncio.to_thread(tap.metrics)


async def process(tap: Llmtap) -> dict[str, int]:
    return (await asyncio.to_thread(tap.state))["process"]


async def quiet(tap: Llmtap, within: float = 10.0) -> Any:
    """Wait until llmtap has nothing in flight; returns that scrape."""
    async def idle() -> Any:
        m = await scrape(tap)
        if (m.value("llmtap_requests_in_flight"), m.value("llmtap_requests_waiting")) == (0, 0):
            return m
        return None

    deadline = time.monotonic() + within
    while (m := await idle()) is None:
        assert time.monotonic() < deadline, "llmtap still has requests in flight"
        await asyncio.sleep(0.05)
    return m


# ----------------------------------------------------------------------- client disconnects

# First token 1 s after the request starts, then 20 tokens/s for 100 s: every phase of a
# request lasts long enough to disconnect in it on purpose.
DISCONNECT_SIM = ("--models", "sim-small", "--ttft", "1.0", "--tokens-per-second", "20",
                  "--output-tokens", "2000", "--parallel", "1024", "--max-queue", "4096")
PHASES = ("before_headers", "waiting_first_token", "mid_stream")


async def disconnect_once(port: int, proxy: FaultProxy, phase: str, tag: str,
                          reset: bool) -> float:
    """One request dropped by its client in `phase`; returns time.monotonic() of the drop."""
    if phase == "before_headers":  # a whole answer: no header until it is done
        path, body = "/api/chat", {"model": "sim-small", "messages": CHAT, "stream": False}
    elif phase == "waiting_first_token":  # llama.cpp: headers at once, the token ~1 s later
        path, body = "/completion", {"model": "sim-small", "prompt": "hi", "stream": True}
    else:  # Ollama NDJSON: a token every 50 ms
        path, body = "/api/chat", {"model": "sim-small", "messages": CHAT}
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(http_request(port, path, body, {"X-Test-Id": tag}))
    got = b""
    if phase == "before_headers":
        await until(lambda: proxy.find("x-test-id", tag), 10)  # the upstream has it
        await asyncio.sleep(random.uniform(0.02, 0.2))
    elif phase == "waiting_first_token":
        while b"\r\n\r\n" not in got:
            chunk = await reader.read(65536)
            assert chunk, f"{tag}: stream ended early"
            got += chunk
        await asyncio.sleep(random.uniform(0, 0.15))
    else:
        while got.count(b'"done":false') < 2:
            chunk = await reader.read(65536)
            assert chunk, f"{tag}: stream ended early"
            got += chunk
        await asyncio.sleep(random.uniform(0, 0.05))
    found = proxy.find("x-test-id", tag)
    assert found is not None
    _, exchange = found
    # The phase is real: check what the upstream had sent by the time the client left.
    if phase == "before_headers":
        assert exchange.response_start is None, f"{tag}: the upstream answered already"
    elif phase == "waiting_first_token":
        assert exchange.response_start is not None and b"data: " not in exchange.body, \
            f"{tag}: a token arrived already: {exchange.body[-300:]!r}"
    if reset:
        rst(writer.get_extra_info("socket"))
    dropped = time.monotonic()
    if reset:
        writer.transport.abort()
    else:
        writer.close()
    return dropped


async def disconnect_round(port: int, proxy: FaultProxy, prefix: str, n: int,
                           batch: int) -> dict[str, tuple[str, float]]:
    """n requests (phases in turn, FIN and RST in turn), `batch` at a time."""
    dropped: dict[str, tuple[str, float]] = {}
    for start in range(0, n, batch):
        jobs = {}
        for i in range(start, min(n, start + batch)):
            phase = PHASES[i % 3]
            tag = f"{prefix}-{i}"
            jobs[tag] = (phase, disconnect_once(port, proxy, phase, tag, reset=bool(i // 3 % 2)))
        times = await asyncio.gather(*(job for _, job in jobs.values()))
        for (tag, (phase, _)), at in zip(jobs.items(), times, strict=True):
            dropped[tag] = (phase, at)
    return dropped


def close_delays(proxy: FaultProxy, dropped: dict[str, tuple[str, float]]
                 ) -> dict[str, list[float]]:
    delays: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for tag, (phase, at) in dropped.items():
        found = proxy.find("x-test-id", tag)
        assert found is not None
        conn, _ = found
        assert conn.downstream_closed is not None and conn.closed_by == "llmtap", (tag, conn)
        delays[phase].append(conn.downstream_closed - at)
    return delays


@contextlib.contextmanager
def _no_gc_pauses() -> Iterator[None]:
    """The disconnect and close times are both taken in this (test) process; by the end of a
    full suite its heap is large, and one collection pauses it for ~100 ms, which would be
    charged to llmtap. Collect once, then keep the collector out of the measurement."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


async def test_client_disconnects_close_upstream_and_leak_nothing() -> None:
    total, batch, warm = 1000, 125, 125
    with running(Simulator(*DISCONNECT_SIM)) as sim:
        async with FaultProxy("127.0.0.1", sim.port) as proxy:
            with running(Llmtap(proxy.url, "--upstream-kind", "ollama")) as tap, \
                    _no_gc_pauses():
                started = time.monotonic()
                warm_drops = await disconnect_round(tap.port, proxy, "warm", warm, batch)
                await until(lambda: all(closed(proxy, t) for t in warm_drops), 10)
                await quiet(tap)
                before = await process(tap)

                dropped = await disconnect_round(tap.port, proxy, "run", total, batch)
                spent = time.monotonic() - started
                # Every upstream connection llmtap opened for them is closed ...
                await until(lambda: all(closed(proxy, t) for t in dropped), 10)
                delays = close_delays(proxy, {**warm_drops, **dropped})
                everything = [d for values in delays.values() for d in values]
                print(f"\n{total} client disconnects (+{warm} warm-up) in {spent:.1f} s; upstream "
                      f"connection closed after the client's disconnect: {percentiles(everything)}")
                for phase, values in delays.items():
                    print(f"  {phase:20s} {percentiles(values)}")
                # ... within 100 ms of its client's disconnect.
                assert max(everything) < 0.1, percentiles(everything)
                # (Only llmtap's own poller keeps a keep-alive connection open.)
                assert all(not ex.request.get("x-test-id") for c in proxy.open_connections()
                           for ex in c.exchanges)

                m = await quiet(tap)
                after = await process(tap)
                print(f"  llmtap process after warm-up: {before}\n  after {total} more: {after}")
                print(f"  growth: fds {after['open_fds'] - before['open_fds']:+d}, tasks "
                      f"{after['asyncio_tasks'] - before['asyncio_tasks']:+d}, RSS "
                      f"{(after['rss_bytes'] - before['rss_bytes']) / MB:+.1f} MB")
                # Each request counted exactly once, as cancelled; nothing else counted.
                assert m.value(DURATION, error_type="cancelled") == total + warm
                assert m.value(DURATION) == total + warm
                assert m.value(TTFT) == 0
                stats = sim.stats()
                assert stats["started"] == stats["cancelled"] == total + warm, stats
                assert stats["completed"] == 0 and stats["active"] == 0, stats
                # No growth in what llmtap holds.
                assert after["open_fds"] - before["open_fds"] <= 5
                assert after["asyncio_tasks"] - before["asyncio_tasks"] <= 5
                assert after["rss_bytes"] - before["rss_bytes"] <= 10 * MB
                assert_no_traceback(tap)


# --------------------------------------------------------------------------- broken upstreams

FAULT_SIM = ("--models", "sim-small", "--ttft", "0.01", "--tokens-per-second", "400",
             "--output-tokens", "60", "--parallel", "8")
OLLAMA = ("/api/chat", {"model": "sim-small", "messages": CHAT})
OPENAI = ("/v1/chat/completions", {"model": "sim-small", "messages": CHAT, "stream": True})
GARBAGE = b"\x00\xff\xfe{{not json}}\n\n"


async def faulty_request(tap: Llmtap, proxy: FaultProxy, dialect: tuple[str, dict[str, Any]],
                         faults: Faults, tag: str) -> tuple[bytes, bool, bytes, float]:
    """One streamed request through the fault proxy with `faults` on its response.

    Returns what the client received, whether its HTTP client saw the stream cut, the body
    the fault proxy sent to llmtap, and how long the request took."""
    proxy.faults = faults
    path, body = dialect
    received, cut = b"", False
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession() as session, \
                session.post(tap.url + path, json=body, headers={"X-Test-Id": tag}) as resp:
            assert resp.status == 200
            try:
                async for chunk in resp.content.iter_any():
                    received += chunk
            except aiohttp.ClientPayloadError:
                cut = True
    finally:
        proxy.faults = Faults()
    took = time.monotonic() - started
    found = proxy.find("x-test-id", tag)
    assert found is not None
    return received, cut, found[1].body, took


async def test_fault_proxy_records_bytes_before_they_can_be_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `got == sent` below compares what llmtap relayed with the proxy's recording,
    read as soon as the client has its bytes: the recording must already hold every byte the
    reader can have. The proxy's thread loses the CPU right after each send() here (as it
    can at any time: send() releases the GIL); a proxy that recorded after writing showed
    the reader fewer bytes than it had read (CI: the broken-framing SSE case, 1 run in ~10)."""
    write = asyncio.StreamWriter.write

    def preempted(self: asyncio.StreamWriter, data: Any) -> None:
        write(self, data)
        if threading.current_thread().name == "fault-proxy":
            time.sleep(0.2)

    monkeypatch.setattr(asyncio.StreamWriter, "write", preempted)
    response = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n")

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(response)
        await w.drain()
        await r.read()
        w.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    async with server, FaultProxy("127.0.0.1", server.sockets[0].getsockname()[1]) as proxy:
        r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Test-Id: rec\r\n\r\n")
        got = b""
        found = None
        while len(got) < len(response):
            data = await asyncio.wait_for(r.read(65536), 5)
            assert data
            got += data
            found = proxy.find("x-test-id", "rec")
            assert found is not None
            assert found[1].response.startswith(got), (found[1].response, got)
        assert found is not None and found[1].body == b"hello"
        w.close()


def error_tail(received: bytes, sent: bytes) -> dict[str, Any]:
    """An Ollama stream broken off: everything sent, then one `{"error": ...}` line."""
    assert received.startswith(sent), "what the upstream sent was not relayed unchanged"
    tail = received[len(sent):]
    if not sent.endswith(b"\n"):
        assert tail.startswith(b"\n")  # the error line never glues onto a half line
    assert tail.endswith(b"\n") and tail.strip().count(b"\n") == 0, tail
    error = orjson.loads(tail)
    assert set(error) == {"error"}
    return error


async def test_upstream_faults_end_streams_cleanly_and_are_counted() -> None:
    counted: Counter[str] = Counter()
    with running(Simulator(*FAULT_SIM)) as sim:
        async with FaultProxy("127.0.0.1", sim.port) as proxy:
            with running(Llmtap(proxy.url, "--upstream-kind", "ollama",
                                "--idle-timeout", "0.5")) as tap:
                m0 = await scrape(tap)
                # Slow but healthy: latency per chunk and 20 kB/s change nothing.
                for name, dialect in (("ollama", OLLAMA), ("sse", OPENAI)):
                    got, cut, sent, took = await faulty_request(
                        tap, proxy, dialect, Faults(latency=0.005, bandwidth=20_000),
                        f"slow-{name}")
                    assert (got, cut) == (sent, False) and len(sent) > 5000
                    counted[""] += 1
                    print(f"{chr(10) if name == 'ollama' else ''}slow upstream ({name}): "
                          f"{len(sent)} bytes in {took:.2f} s, relayed unchanged")

                # Reset (RST) mid-stream.
                got, cut, sent, _ = await faulty_request(tap, proxy, OLLAMA,
                                                         Faults(reset_after=900), "reset-ollama")
                assert not cut and len(sent) > 500
                assert "broke off" in error_tail(got, sent)["error"]
                got, cut, sent, _ = await faulty_request(tap, proxy, OPENAI,
                                                         Faults(reset_after=900), "reset-sse")
                assert cut and got == sent and len(sent) > 500
                assert b"[DONE]" not in got
                counted["upstream_reset"] += 2

                # Stall past --idle-timeout 0.5: llmtap gives up and closes the upstream.
                for name, dialect in (("ollama", OLLAMA), ("sse", OPENAI)):
                    got, cut, sent, took = await faulty_request(
                        tap, proxy, dialect, Faults(stall_after=900), f"stall-{name}")
                    if name == "ollama":
                        assert not cut
                        assert "went silent" in error_tail(got, sent)["error"]
                    else:
                        assert cut and got == sent and b"[DONE]" not in got
                    found = proxy.find("x-test-id", f"stall-{name}")
                    assert found is not None
                    conn = found[0]
                    await until(partial(getattr, conn, "downstream_closed"), 5)
                    assert conn.closed_by == "llmtap"
                    print(f"stalled upstream ({name}): stream ended after {took:.2f} s "
                          f"(idle timeout 0.5 s), upstream connection closed by llmtap")
                    counted["timeout"] += 1

                # Garbage inside the body (framing intact): relayed byte for byte, success.
                for name, dialect in (("ollama", OLLAMA), ("sse", OPENAI)):
                    got, cut, sent, _ = await faulty_request(
                        tap, proxy, dialect, Faults(garbage=GARBAGE, garbage_at=700),
                        f"garbage-{name}")
                    assert not cut and got == sent and GARBAGE in got
                    assert got.rstrip().endswith(b"[DONE]" if name == "sse" else b"}")
                    counted[""] += 1

                # Truncated mid-frame (a clean FIN inside a chunk).
                got, cut, sent, _ = await faulty_request(tap, proxy, OLLAMA,
                                                         Faults(truncate_after=777), "cut-ollama")
                assert not cut and not sent.endswith(b"\n")  # cut inside a line
                assert "broke off" in error_tail(got, sent)["error"]
                got, cut, sent, _ = await faulty_request(tap, proxy, OPENAI,
                                                         Faults(truncate_after=777), "cut-sse")
                assert cut and got == sent and not sent.endswith(b"\n\n")
                counted["upstream_reset"] += 2

                # Garbage that breaks the HTTP chunk framing itself.
                raw = Faults(garbage=GARBAGE, garbage_at=700, garbage_framed=False)
                broken: list[str] = []
                for name, dialect in (("ollama", OLLAMA), ("sse", OPENAI)):
                    before = await scrape(tap)
                    got, cut, sent, took = await faulty_request(tap, proxy, dialect, raw,
                                                                f"badframe-{name}")
                    if name == "ollama":
                        error_tail(got, sent)
                    else:
                        assert cut and got == sent
                    after = await scrape(tap)
                    outcome = [e for e in ("upstream_reset", "timeout")
                               if after.value(DURATION, error_type=e)
                               > before.value(DURATION, error_type=e)]
                    assert len(outcome) == 1, outcome
                    counted[outcome[0]] += 1
                    broken.append(f"{name}: {outcome[0]} after {took:.2f} s")
                print("chunk framing broken by the upstream: " + ", ".join(broken))

                m = await quiet(tap)
                for error_type, n in counted.items():
                    assert m.value(DURATION, error_type=error_type) - m0.value(
                        DURATION, error_type=error_type) == n, error_type
                assert m.value(DURATION) - m0.value(DURATION) == sum(counted.values())
                unparseable = (m.value("llmtap_unparseable_frames_total")
                               - m0.value("llmtap_unparseable_frames_total"))
                assert unparseable >= 2  # the garbage frames were seen, counted, relayed
                print(f"counted: {dict(counted)}; unparseable frames: {unparseable:.0f}")
                assert_no_traceback(tap)


# ------------------------------------------------------------------------------------- load

# Success answers ask for 4 tokens; cancelled ones ask for nothing and would run 1 s.
LOAD_SIM = ("--models", "sim-small", "--ttft", "0.001", "--tokens-per-second", "5000",
            "--output-tokens", "5000", "--parallel", "64", "--max-queue", "4096")


def load_request(i: int) -> tuple[str, str, dict[str, Any]]:
    """(expected outcome, path, body) of request i: 7 in 10 succeed, 2 are cancelled by
    their client after the first chunk, 1 asks for a model the upstream does not have."""
    kind = i % 10
    short = {"model": "sim-small", "messages": CHAT}
    if kind <= 2:
        return "ok", "/api/chat", {**short, "options": {"num_predict": 4}}
    if kind == 3:
        return "ok", "/api/generate", {"model": "sim-small", "prompt": "hi", "stream": False,
                                       "options": {"num_predict": 4}}
    if kind <= 5:
        return "ok", "/v1/chat/completions", {**short, "max_tokens": 4, "stream": True,
                                              "stream_options": {"include_usage": True}}
    if kind == 6:
        return "ok", "/v1/chat/completions", {**short, "max_tokens": 4}
    if kind == 7:
        return "cancel", "/api/chat", short
    if kind == 8:
        return "cancel", "/v1/chat/completions", {**short, "stream": True}
    path = "/api/chat" if i // 10 % 2 else "/v1/chat/completions"
    return "404", path, {"model": f"no-such-model-{i}", "messages": CHAT}


def complete(path: str, body: bytes) -> bool:
    if path == "/v1/chat/completions":
        return body.endswith(b"data: [DONE]\n\n") or (
            b'"choices"' in body[:200] and body.rstrip().endswith(b"}"))
    return orjson.loads(body.splitlines()[-1]).get("done") is True


async def test_load_counts_match_the_clients_exactly() -> None:
    n, concurrency = 10_000, 64
    dead_collector = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
                      "OTEL_EXPORTER_OTLP_TIMEOUT": "1", "OTEL_SERVICE_NAME": "llmtap-load"}
    with running(Simulator(*LOAD_SIM)) as sim, \
            running(Llmtap(sim.url, "--access-log", "false", env=dead_collector)) as tap:
        seen: Counter[str] = Counter()
        next_index = itertools.count()
        rss: list[int] = [(await process(tap))["rss_bytes"]]
        progress: list[tuple[int, int]] = [(0, rss[0])]  # (requests done, RSS)

        async def worker(session: aiohttp.ClientSession) -> None:
            while (i := next(next_index)) < n:
                expect, path, body = load_request(i)
                async with session.post(tap.url + path, json=body) as resp:
                    if expect == "cancel":
                        assert resp.status == 200
                        await resp.content.readany()
                        resp.close()  # the client goes away mid-answer
                        seen["cancelled"] += 1
                        continue
                    data = await resp.read()
                    if resp.status == 200 and complete(path, data):
                        seen["ok"] += 1
                    elif resp.status == 404:
                        seen["404"] += 1
                    else:
                        seen[f"unexpected {resp.status}"] += 1

        async def sample_rss() -> None:
            while True:
                await asyncio.sleep(0.5)
                rss.append((await process(tap))["rss_bytes"])
                progress.append((sum(seen.values()), rss[-1]))

        started = time.monotonic()
        async with asyncio.timeout(150):  # nothing hangs
            sampler = asyncio.create_task(sample_rss())
            connector = aiohttp.TCPConnector(limit=concurrency)
            async with aiohttp.ClientSession(connector=connector) as session:
                await asyncio.gather(*(worker(session) for _ in range(concurrency)))
            took = time.monotonic() - started
            sampler.cancel()
            m = await quiet(tap)
        rss.append((await process(tap))["rss_bytes"])
        stats = sim.stats()
        print(f"\n{n} requests at {concurrency} concurrent in {took:.1f} s "
              f"({n / took:.0f} req/s): client saw {dict(seen)}")
        print(f"llmtap counted: ok {m.value(DURATION, error_type=''):.0f}, cancelled "
              f"{m.value(DURATION, error_type='cancelled'):.0f}, 404 "
              f"{m.value(DURATION, error_type='404'):.0f}; spans dropped (dead collector) "
              f"{m.value('llmtap_spans_dropped_total'):.0f}")
        print(f"llmtap RSS: start {rss[0] / MB:.1f} MB, peak {max(rss) / MB:.1f} MB, "
              f"end {rss[-1] / MB:.1f} MB ({len(rss)} samples)")
        by_quarter = [next(r for done, r in [*progress, (n, rss[-1])] if done >= q * n // 4)
                      for q in (1, 2, 3, 4)]
        print("llmtap RSS after 25/50/75/100 % of the requests: "
              + " / ".join(f"{r / MB:.1f}" for r in by_quarter) + " MB")
        assert sum(seen.values()) == n
        assert seen == {"ok": 7 * n // 10, "cancelled": 2 * n // 10, "404": n // 10}
        # Per outcome, llmtap's counts equal the client's, exactly.
        assert m.value(DURATION, error_type="") == seen["ok"]
        assert m.value(DURATION, error_type="cancelled") == seen["cancelled"]
        assert m.value(DURATION, error_type="404") == seen["404"]
        assert m.value(DURATION) == n
        assert m.value(TTFT) == seen["ok"]
        assert stats["completed"] == seen["ok"]
        assert max(rss) - rss[0] < 100 * MB  # bounded (a leak would grow with n)
        assert_no_traceback(tap)


# ------------------------------------------------------------------------------ slow readers

# A model name of 1,500 characters makes every SSE frame ~1.8 kB (the name is in each one):
# 1,500 tokens are a 2.7 MB answer, so 100 long answers cost the simulator little CPU.
FAT_MODEL = "sim-fat-" + "x" * 1500
SLOW_SIM = ("--models", f"sim-small,{FAT_MODEL}", "--ttft", "0.01", "--tokens-per-second",
            "5000", "--output-tokens", "1500", "--parallel", "256")
STALLED_BODY = {"model": FAT_MODEL, "messages": CHAT, "stream": True}
NORMAL_BODY = {"model": "sim-small", "messages": CHAT, "stream": True, "max_tokens": 500}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stalled_reader(port: int) -> socket.socket:
    """A client with a small receive buffer that reads the first chunk, then stops reading
    (and does not close). Its MSS is a real network's: over loopback (64 kB segments) the
    kernel would queue megabytes per socket on llmtap's side before pushing back at all."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, http_request(port, "/v1/chat/completions", STALLED_BODY))
    got = b""
    while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 10:
        chunk = await loop.sock_recv(sock, 1024)
        assert chunk
        got += chunk
    return sock


async def normal_stream(session: aiohttp.ClientSession, url: str) -> float:
    started = time.monotonic()
    async with session.post(url + "/v1/chat/completions", json=NORMAL_BODY) as resp:
        body = await resp.read()
    assert resp.status == 200 and body.endswith(b"data: [DONE]\n\n")
    return time.monotonic() - started


async def test_slow_readers_cost_bounded_memory_and_do_not_slow_others() -> None:
    stalled_n, runs = 100, 7
    with running(Simulator(*SLOW_SIM)) as sim, \
            running(Llmtap(sim.url, "--access-log", "false")) as tap:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):  # warm-up
                await normal_stream(session, tap.url)
            alone = [await normal_stream(session, tap.url) for _ in range(runs)]
            await quiet(tap)
            before = await process(tap)

            opened = time.monotonic()
            socks = await asyncio.gather(*(stalled_reader(tap.port) for _ in range(stalled_n)))
            # Wait until nothing moves: llmtap and the simulator idle, llmtap's memory flat.
            pids = (tap.proc.pid, sim.proc.pid)
            last = [cpu_seconds(pid) for pid in pids]
            rss = [before["rss_bytes"]]
            while True:
                assert time.monotonic() - opened < 30, "the stalled streams never settled"
                await asyncio.sleep(0.5)
                now = [cpu_seconds(pid) for pid in pids]
                rss.append((await process(tap))["rss_bytes"])
                busy = max(b - a for a, b in zip(last, now, strict=True))
                last = now
                if busy < 0.03 and rss[-1] - rss[-2] < MB // 4:
                    break
            settled = time.monotonic() - opened
            m = await scrape(tap)
            assert m.value("llmtap_requests_in_flight") == stalled_n  # all held, none ended

            beside = [await normal_stream(session, tap.url) for _ in range(runs)]
            delta = rss[-1] - before["rss_bytes"]
            print(f"\n{stalled_n} stalled readers (2.7 MB answers): llmtap RSS "
                  f"{before['rss_bytes'] / MB:.1f} -> {rss[-1] / MB:.1f} MB, "
                  f"{delta / stalled_n / 1024:.0f} KiB per stalled stream (settled in "
                  f"{settled:.1f} s)")
            print(f"a normal 500-token stream: median {statistics.median(alone) * 1000:.1f} ms "
                  f"alone, {statistics.median(beside) * 1000:.1f} ms beside {stalled_n} stalled "
                  f"readers (max {max(alone) * 1000:.1f} / {max(beside) * 1000:.1f} ms)")
            # Bounded: far below the 2.7 MB each stalled client leaves unread.
            assert delta / stalled_n < MB
            assert statistics.median(beside) < 3 * statistics.median(alone) + 0.05

            for sock in socks:
                sock.close()
            m = await quiet(tap)
            assert m.value(DURATION, error_type="cancelled") == stalled_n
            assert m.value(DURATION, error_type="") == 2 * runs + 3
            assert m.value(DURATION) == stalled_n + 2 * runs + 3
            assert_no_traceback(tap)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(20240611)
