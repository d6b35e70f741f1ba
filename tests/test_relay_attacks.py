"""The attacks an adversarial review of the new relay found (2026-12-01), each reproduced.

Every test here sends what the attacker sent and asserts the fixed behaviour: bounded memory
and a responsive admin port under endless heads and trailers, backpressure on pipelined
answers, no smuggling through Upgrade, no response desync from a hostile upstream, no
observation bypass through encoded paths. Real parts: the simulator, llmtap as a
subprocess, raw sockets, and hand-written upstreams.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from exporter.auth import key_file_line, new_key
from tests.helpers import Llmtap, Simulator, running
from tests.loopback import LoopbackServer, read_request
from tests.test_relay_hostile import RecordingUpstream, raw_exchange, split_response

DURATION = "gen_ai_server_request_duration_seconds_count"
MB = 1 << 20


class Pump:
    """Sends `first`, then `fill` over and over from a thread until stopped or refused."""

    def __init__(self, port: int, first: bytes, fill: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(first)
        self.fill = fill
        self.sent = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                self.sock.sendall(self.fill)
                self.sent += len(self.fill)
        except OSError:
            pass

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()
        self.thread.join(5)


async def admin_latency(tap: Llmtap) -> tuple[float, int]:
    """How long the admin port takes to answer, and llmtap's RSS it reports."""
    started = time.monotonic()
    state = await asyncio.to_thread(tap.state)
    return time.monotonic() - started, state["process"]["rss_bytes"]


@pytest.mark.parametrize("where", ["header value", "trailer"])
async def test_an_endless_header_is_cut_and_the_loop_keeps_running(sim: Simulator,
                                                                   where: str) -> None:
    """One connection sending a header (or a trailer) that never ends: before, the admin port
    stopped answering for the whole run and RSS grew ~45 MiB/s, since llhttp copies a field
    spanning reads whole on each read and llmtap's limit looked only at complete fields."""
    first = (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " if where == "header value" else
             b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"1\r\na\r\n0\r\nX-T: ")
    with running(Llmtap(sim.url)) as tap:
        _, rss_before = await admin_latency(tap)
        pump = Pump(tap.port, first, b"a" * 65536)
        try:
            latencies = []
            for _ in range(6):
                await asyncio.sleep(0.25)
                latency, rss = await admin_latency(tap)
                latencies.append(latency)
            answer = pump.sock.recv(300) if pump.sent else b""
        finally:
            pump.stop()
        print(f"\nendless {where}: {pump.sent >> 20} MiB sent; admin answered in at most "
              f"{max(latencies) * 1000:.0f} ms; RSS {rss_before >> 20} -> {rss >> 20} MiB; "
              f"answer {answer[:40]!r}")
        assert answer.startswith(b"HTTP/1.1 431")
        assert max(latencies) < 1.0
        assert rss - rss_before < 50 * MB


async def test_pipelined_refusals_wait_for_the_client_to_read(tmp_path: Path) -> None:
    """Requests pipelined forever and never read, each refused (401): before, every answer
    was queued in memory (47 -> 484 MB in 10 s, the admin port starved). Now reading stops
    while the client does not take its answers, and it is cut after --client-idle-timeout."""
    keys = tmp_path / "keys"
    keys.write_text(key_file_line("app", new_key()) + "\n")
    with running(Simulator()) as sim, \
            running(Llmtap(sim.url, "--api-key-file", str(keys),
                           "--client-idle-timeout", "2")) as tap:
        _, rss_before = await admin_latency(tap)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", tap.port))
        sock.setblocking(False)
        request = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n"
        sent, started, cut = 0, time.monotonic(), None
        while time.monotonic() - started < 6:
            try:
                sent += sock.send(request * 256)
            except BlockingIOError:
                await asyncio.sleep(0.05)  # llmtap stopped reading: the client's buffer is full
            except OSError:
                cut = time.monotonic() - started
                break
        latency, rss = await admin_latency(tap)
        sock.close()
        print(f"\npipelined 401s never read: {sent >> 10} KiB sent, cut after "
              f"{cut if cut is None else round(cut, 2)} s; RSS {rss_before >> 20} -> "
              f"{rss >> 20} MiB, admin {latency * 1000:.0f} ms")
        assert sent < 16 * MB  # reading stopped long before (it was unbounded)
        assert rss - rss_before < 50 * MB and latency < 1.0
        assert cut is not None and cut < 5  # the stalled client was cut


async def test_an_upgrade_request_cannot_smuggle_its_body_as_requests() -> None:
    """`Connection: Upgrade` with a body: llhttp skips such a body, so its bytes were parsed
    as further requests and relayed (a DELETE hidden in a POST's body passed a real nginx's
    path rules). Now it gets 501 and nothing of it is read as a request."""
    inner = b"DELETE /api/delete HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    body = b"\r\n" * 100 + inner
    async with RecordingUpstream() as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "ollama", ready=False)) as tap:
            raw = await raw_exchange(tap.port, b"POST /api/chat HTTP/1.1\r\nHost: x\r\n"
                                     b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
                                     b"Content-Length: %d\r\n\r\n" % len(body) + body, 1.0)
            status, _, _ = split_response(raw)
            assert status == 501
            assert raw.count(b"HTTP/1.1 ") == 1  # one answer, not one per smuggled request
            assert not any(c.first_line.startswith(b"DELETE") for c in upstream.connections)
            assert not upstream.posts()
            # Without a body, the Upgrade field is just dropped and the request relayed.
            raw = await raw_exchange(tap.port, b"GET /api/version HTTP/1.1\r\nHost: x\r\n"
                                     b"Connection: Upgrade\r\nUpgrade: h2c\r\n\r\n", 0.5)
            assert not raw.startswith(b"HTTP/1.1 501")


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /api/tags HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /api/tags HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n", 417),
    (b"POST /api/%63hat HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}", 400),
    (b"POST /api/chat#frag HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}", 400),
    (b"POST /v1/./chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}", 400),
])
async def test_heads_the_rfc_or_the_observers_cannot_take_are_refused(
        sim: Simulator, sim_tap: Llmtap, head: bytes, status: int) -> None:
    """Two Host fields, an unknown Expect, and observed endpoints in disguise (the model
    servers decode and normalise the path, so `/api/%63hat` reached the chat handler
    unobserved, unlimited by --max-waiting-per-model)."""
    raw = await raw_exchange(sim_tap.port, head, 1.0)
    answered, headers, body = split_response(raw)
    assert answered == status, raw[:120]
    assert orjson.loads(body[:int(headers["content-length"])])["error"]


async def test_a_repeated_key_header_is_refused(tmp_path: Path) -> None:
    """`x-api-key: K` twice beside a valid Authorization: the repeated values joined to
    "K, K", matched nothing, and both went upstream with the key in them."""
    key = new_key()
    keys = tmp_path / "keys"
    keys.write_text(key_file_line("app", key) + "\n")
    async with RecordingUpstream() as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "openai",
                            "--api-key-file", str(keys), ready=False)) as tap:
            raw = await raw_exchange(tap.port, (
                f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                f"x-api-key: {key}\r\nx-api-key: {key}\r\nContent-Length: 2\r\n\r\n{{}}"
            ).encode(), 1.0)
            assert split_response(raw)[0] == 400
            assert not upstream.posts()


async def test_requests_behind_a_refusal_are_neither_read_nor_started(tmp_path: Path) -> None:
    """A 401 with a body, then a keyed request in the same packet: the second one used to be
    parsed and its exchange started on a connection already closing, never counted."""
    key = new_key()
    keys = tmp_path / "keys"
    keys.write_text(key_file_line("app", key) + "\n")
    body = b'{"model":"sim-small","prompt":"x","stream":false}'
    second = (b"POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
              + key.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    with running(Simulator()) as sim, running(Llmtap(sim.url, "--api-key-file",
                                                     str(keys))) as tap:
        started = sim.stats()["started"]
        raw = await raw_exchange(tap.port, b"POST /api/generate HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(body) + body + second,
                                 1.0)
        assert raw.startswith(b"HTTP/1.1 401") and raw.count(b"HTTP/1.1 ") == 1
        await asyncio.sleep(0.3)
        assert sim.stats()["started"] == started
        assert tap.metrics().value(DURATION) == 0  # nothing started, nothing half-counted
        assert "Traceback" not in tap.log.read_text()


async def test_pipelined_bodies_are_not_read_ahead() -> None:
    """A slow request, then large bodies pipelined behind it: they were buffered whole while
    the first was answered (47 -> 408 MB in a second). Reading now waits for them."""
    async with RecordingUpstream() as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "openai", ready=False)) as tap:
            _, rss_before = await admin_latency(tap)
            big = 60 * MB
            pump = Pump(tap.port, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: 2\r\n\r\n{}"  # never answered: the upstream is mute
                        + b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: %d\r\n\r\n" % big, b"y" * 65536)
            try:
                await asyncio.sleep(1.5)
                _, rss = await admin_latency(tap)
            finally:
                pump.stop()
            print(f"\npipelined 60 MiB body behind an unanswered request: {pump.sent >> 20} "
                  f"MiB sent, RSS {rss_before >> 20} -> {rss >> 20} MiB")
            assert pump.sent < 16 * MB  # llmtap stopped reading it
            assert rss - rss_before < 50 * MB


class HostileUpstream(LoopbackServer):
    """An upstream that answers each POST with `reply(served)` raw bytes, then waits."""

    def __init__(self, reply: bytes | None, endless_headers: bool = False) -> None:
        self.reply = reply
        self.endless_headers = endless_headers

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head, _ = await read_request(reader)
            if not head.startswith(b"POST"):
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            elif self.endless_headers:
                writer.write(b"HTTP/1.1 200 OK\r\n")
                for i in range(100_000):
                    writer.write(b"X-H%d: %s\r\n" % (i, b"v" * 1000))
                    await writer.drain()
            elif self.reply is not None:
                writer.write(self.reply)
            await writer.drain()
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def post(tap: Llmtap) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.post(
            tap.url + "/api/generate", json={"model": "m", "prompt": "x"}) as resp:
        try:
            return resp.status, await resp.read()
        except aiohttp.ClientPayloadError:
            return resp.status, b"<cut>"


async def test_an_upstream_sending_endless_headers_gets_a_502_not_our_memory() -> None:
    async with HostileUpstream(None, endless_headers=True) as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "ollama", ready=False)) as tap:
            _, rss_before = await admin_latency(tap)
            status, body = await post(tap)
            _, rss = await admin_latency(tap)
            print(f"\nendless upstream headers: {status}; RSS {rss_before >> 20} -> "
                  f"{rss >> 20} MiB")
            assert status == 502 and b"closed the connection" in body
            assert rss - rss_before < 50 * MB  # it reached 3.7 GB before the bound


@pytest.mark.parametrize(("reply", "want"), [
    # A complete answer, then bytes nobody asked for: the answer stands, the connection goes.
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
     b'{"done":true}GARBAGE', (200, b'{"done":true}', "")),
    # A 204 with a body: the head goes out without its length, the body never.
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", (204, b"", "")),
    # Switching protocols, unasked: broken, not a success.
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
     (502, None, "upstream_reset")),
    # A reason phrase of 8 KB is not relayed into the client's status line.
    (b"HTTP/1.1 200 " + b"A" * 8000 + b"\r\nContent-Length: 2\r\n\r\n{}", (200, b"{}", "")),
])
async def test_hostile_upstream_answers(reply: bytes, want: tuple[int, bytes | None, str]
                                        ) -> None:
    status, body, error_type = want
    async with HostileUpstream(reply) as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "ollama", ready=False)) as tap:
            raw = await raw_exchange(tap.port, b"POST /api/generate HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Length: 2\r\n\r\n{}", 1.0)
            got_status, headers, got_body = split_response(raw)
            assert got_status == status, raw[:200]
            assert len(raw.split(b"\r\n", 1)[0]) < 100  # status line of sane length
            if body is not None:
                assert got_body == body
            if status == 204:
                assert "content-length" not in headers
            for _ in range(50):
                m = tap.metrics()
                if m.value(DURATION):
                    break
                await asyncio.sleep(0.02)
            assert m.value(DURATION, error_type=error_type) == 1
            assert "Traceback" not in tap.log.read_text()
