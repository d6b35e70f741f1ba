"""The relay against clients that do what real clients rarely do, on purpose.

Each test here failed on the aiohttp-based relay it replaced (main before 2026-12-01):
compressed bodies mangled, absolute-form targets answered with a traceback, 100 Continue
sent before the 401, and connections held forever by clients that stop sending or reading.
Real parts: the simulator, hand-written upstreams that record every byte, raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import socket
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest

from exporter.auth import key_file_line, new_key
from tests.helpers import Llmtap, Simulator, running
from tests.loopback import LoopbackServer, read_request
from tests.test_relay_wire import RawUpstream, Reply, response

DURATION = "gen_ai_server_request_duration_seconds_count"


def recording_echo(method: str, path: str, headers: dict[str, str], body: bytes,
                   served: int) -> Reply:
    """Answers with what it received: headers, body length and digest."""
    return response(orjson.dumps({"path": path, "headers": headers, "length": len(body),
                                  "sha256": hashlib.sha256(body).hexdigest()}))


async def raw_exchange(port: int, data: bytes, read_for: float = 2.0) -> bytes:
    """Send raw bytes, read what comes back until the server closes or `read_for` passes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    received = b""
    deadline = time.monotonic() + read_for
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
    finally:
        writer.close()
    return received


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":")
                                                            for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_request_bodies_pass_byte_for_byte(encoding: str) -> None:
    plain = orjson.dumps({"model": "zipped-model", "messages": [{"role": "user",
                                                                 "content": "hi " * 500}]})
    packed = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    async with RawUpstream(recording_echo) as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "openai", ready=False)) as tap:
            async with aiohttp.ClientSession(auto_decompress=False) as session, session.post(
                    tap.url + "/v1/chat/completions", data=packed,
                    headers={"Content-Encoding": encoding,
                             "Content-Type": "application/json"}) as resp:
                assert resp.status == 200
                seen = orjson.loads(await resp.read())
            assert seen["length"] == len(packed)
            assert seen["sha256"] == hashlib.sha256(packed).hexdigest()
            assert seen["headers"]["content-encoding"] == encoding
            assert seen["headers"]["content-length"] == str(len(packed))
            # Inflated (bounded) to read it, relayed as it came: the model is known.
            for _ in range(50):
                logged = tap.json_lines("request")
                if logged:
                    break
                await asyncio.sleep(0.02)
            assert logged[-1]["model"] == "zipped-model"


@pytest.mark.parametrize(("target", "dialect", "status"), [
    (b"http://127.0.0.1:1/api/chat", "ollama", 400),
    (b"http://attacker.example/v1/chat/completions", "openai", 400),
    (b"127.0.0.1:443", "openai", 501),  # authority-form: CONNECT, a tunnel llmtap won't open
    (b"*", "openai", 400),  # asterisk-form
])
async def test_targets_that_are_not_origin_form_get_400_in_dialect(
        target: bytes, dialect: str, status: int) -> None:
    async with RawUpstream(recording_echo) as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "ollama", ready=False)) as tap:
            method = b"CONNECT" if not target.startswith((b"http", b"*")) else b"POST"
            raw = await raw_exchange(tap.port, method + b" " + target + b" HTTP/1.1\r\n"
                                     b"Host: x\r\nContent-Length: 2\r\n\r\n{}")
            answered, headers, body = split_response(raw)
            assert answered == status
            error = orjson.loads(body[:int(headers["content-length"])])["error"]
            if dialect == "ollama":
                assert "origin-form" in error
            elif status == 501:
                assert error["type"] == "not_implemented" and "CONNECT" in error["message"]
            else:
                assert error["type"] == "invalid_request" and "origin-form" in error["message"]
            assert [r for r in upstream.requests if r[0] != "GET"] == []  # only polls came
            assert "Traceback" not in tap.log.read_text()


async def test_the_401_comes_before_any_100_continue(tmp_path: Path) -> None:
    key = new_key()
    keys = tmp_path / "keys"
    keys.write_text(key_file_line("app", key) + "\n")
    body = orjson.dumps({"model": "sim-small", "prompt": "x", "stream": False})
    head = (b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n" % len(body))
    with running(Simulator()) as sim, running(Llmtap(sim.url, "--api-key-file",
                                                     str(keys))) as tap:
        # No key: the first thing back is the 401, and the body was never asked for.
        raw = await raw_exchange(tap.port, head + b"\r\n", read_for=1.0)
        assert raw.startswith(b"HTTP/1.1 401"), raw[:60]
        assert b"100 Continue" not in raw
        # The right key: 100 Continue, then the answer once the body is sent.
        reader, writer = await asyncio.open_connection("127.0.0.1", tap.port)
        writer.write(head + b"Authorization: Bearer " + key.encode() + b"\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert answer.startswith(b"HTTP/1.1 200")
        writer.close()


@dataclass
class Received:
    opened: float
    first_line: bytes = b""
    length: int = 0  # bytes received
    closed: float | None = None


class RecordingUpstream(LoopbackServer):
    """Accepts connections and reads whatever comes, never answering; remembers for each
    connection when it opened, its request line, how much came and when llmtap closed it."""

    def __init__(self) -> None:
        self.connections: list[Received] = []

    def posts(self) -> list[Received]:
        return [c for c in self.connections if c.first_line.startswith(b"POST")]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = Received(time.monotonic())
        self.connections.append(received)
        try:
            while data := await reader.read(65536):
                if not received.first_line:
                    received.first_line = data.partition(b"\r\n")[0]
                received.length += len(data)
        except ConnectionError:
            pass
        received.closed = time.monotonic()
        writer.close()


async def test_a_client_that_stops_sending_its_body_is_cut() -> None:
    """A streamed body (over 1 MiB) that stops arriving: after --client-idle-timeout the
    client is disconnected, the upstream request closed, and it counts as client_timeout."""
    async with RecordingUpstream() as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "openai",
                            "--client-idle-timeout", "1", ready=False)) as tap:
            reader, writer = await asyncio.open_connection("127.0.0.1", tap.port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 4000000\r\n\r\n" + b"x" * (2 << 20))
            await writer.drain()
            stalled = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # llmtap closed it
            cut_after = time.monotonic() - stalled
            writer.close()
            for _ in range(100):
                if upstream.posts() and upstream.posts()[0].closed:
                    break
                await asyncio.sleep(0.02)
            relayed = upstream.posts()[0]
            assert relayed.closed is not None  # the upstream request was closed
            print(f"\nstalled body: cut after {cut_after:.2f} s, upstream closed "
                  f"{relayed.closed - stalled:.2f} s after the stall")
            assert 0.9 < cut_after < 3
            m = tap.metrics()
            assert m.value(DURATION, error_type="client_timeout") == 1
            assert m.value("llmtap_requests_in_flight") == 0


class BlastingUpstream(LoopbackServer):
    """Answers each POST with an endless NDJSON stream of 16 KiB lines, as fast as the
    connection takes them (a poll gets a 404); remembers when llmtap closed a stream."""

    LINE = orjson.dumps({"model": "m", "response": "x" * 16384, "done": False}) + b"\n"

    def __init__(self) -> None:
        self.closed: list[float] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head, _ = await read_request(reader)
            if not head.startswith(b"POST"):
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            piece = b"%x\r\n%s\r\n" % (len(self.LINE), self.LINE)
            while True:
                writer.write(piece)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed.append(time.monotonic())
        finally:
            writer.close()


async def test_a_client_that_stops_reading_is_cut() -> None:
    """An answer the client never reads: once every buffer on the way is full, llmtap
    pauses the upstream; after --client-idle-timeout without progress the client is cut,
    the upstream request closed, and it counts as client_timeout."""
    async with BlastingUpstream() as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "ollama",
                            "--client-idle-timeout", "1", ready=False)) as tap:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", tap.port))
            body = orjson.dumps({"model": "m", "prompt": "x"})
            sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            started = time.monotonic()
            try:
                for _ in range(200):  # never read: wait for llmtap to give up on us
                    await asyncio.sleep(0.05)
                    if upstream.closed:
                        break
            finally:
                sock.close()
            assert upstream.closed, "the upstream was never closed"
            cut_after = upstream.closed[0] - started
            print(f"\nnon-reading client cut, upstream closed {cut_after:.2f} s after the "
                  "request")
            assert 0.9 < cut_after < 5
            m = tap.metrics()
            assert m.value(DURATION, error_type="client_timeout") == 1
            assert m.value("llmtap_requests_in_flight") == 0
            state = tap.state()["process"]
            assert state["rss_bytes"] < 150 * 2**20  # the never-read answer was not kept


async def test_stalled_connections_cannot_starve_the_admin_port(sim: Simulator) -> None:
    """1,000 connections that stop mid-body, against a 256-descriptor limit: the admin port
    keeps answering, the excess is refused with a 503, and once the stalled ones are cut the
    proxy serves again (before, 1,000 such connections stopped both ports for good)."""
    with running(Llmtap(sim.url, "--client-idle-timeout", "2", nofile=256)) as tap:
        held: list[socket.socket] = []
        refused = 0
        for _ in range(1000):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", tap.port))
            held.append(sock)
        await asyncio.sleep(0.3)
        for sock in held:
            try:
                sock.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            except OSError:
                refused += 1
        await asyncio.sleep(0.5)
        m = await asyncio.to_thread(tap.metrics)  # the admin port answers meanwhile
        assert m.value("llmtap_build_info") == 1
        answers = 0
        for sock in held:
            try:
                if sock.recv(64).startswith(b"HTTP/1.1 503"):
                    answers += 1
            except OSError:
                pass
        print(f"\n1000 stalled connections: {answers} refused with 503, {refused} failed to "
              "send")
        assert answers >= 1000 - 128  # at most (256 - 128) / 2 are held
        await asyncio.sleep(2.5)  # the held ones pass --client-idle-timeout
        for sock in held:
            sock.close()
        async with aiohttp.ClientSession() as session, session.post(
                tap.url + "/api/chat", json={"model": "sim-small", "stream": False,
                                             "messages": [{"role": "user", "content": "x"}]}
        ) as resp:
            assert resp.status == 200
        assert (await asyncio.to_thread(tap.metrics)).value(
            DURATION, error_type="client_timeout") >= 1


async def test_trailers_of_a_chunked_body_are_not_forwarded() -> None:
    """Trailer fields come after the body (where llmtap already sent the head): they are
    dropped, never appended to what the upstream gets as headers."""
    async with RawUpstream(recording_echo) as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "openai", ready=False)) as tap:
            raw = await raw_exchange(tap.port, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
                                     b"X-Trailer: smuggled\r\n\r\n", read_for=1.0)
            status, headers, body = split_response(raw)
            assert status == 200
            seen = orjson.loads(body[:int(headers["content-length"])])
            assert seen["length"] == 2 and "x-trailer" not in seen["headers"]


async def test_bytes_after_an_answer_never_reach_the_next_client() -> None:
    """An upstream that sends a second response nobody asked for, right behind the first:
    the connection is not reused, so the next client gets its own answer, not that one."""
    def doubled(method: str, path: str, headers: dict[str, str], body: bytes,
                served: int) -> Reply:
        if method != "POST":
            return response(b'{"data":[]}')
        own = response(orjson.dumps({"served": served, "body": body.decode()}))
        return own + b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"evil\":true}"

    async with RawUpstream(doubled) as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "openai", ready=False)) as tap:
            async with aiohttp.ClientSession() as session:
                for i in range(4):
                    async with session.post(tap.url + "/v1/embeddings",
                                            data=f'{{"i":{i}}}') as resp:
                        answer = orjson.loads(await resp.read())
                    assert answer == {"served": 0, "body": f'{{"i":{i}}}'}  # a fresh one
