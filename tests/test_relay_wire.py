"""HTTP-level behaviour of the relay against hand-written upstreams that control every byte:
hop-by-hop headers, X-Forwarded-*, Content-Encoding, unparseable bodies, dead keep-alives."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
import pytest
from yarl import URL

from tests.helpers import Llmtap, running
from tests.loopback import LoopbackServer

# A handler answers with the whole response, None (drop the connection unanswered), or
# (bytes, "hang" | "close"): send a first part, then go silent or drop the connection.
Reply = bytes | tuple[bytes, str] | None
Handler = Callable[[str, str, dict[str, str], bytes, int], Reply]


class RawUpstream(LoopbackServer):
    """A tiny HTTP/1.1 server on loopback; `handler` returns the raw response bytes, or None
    to close the connection without answering (what a server that dropped a keep-alive
    connection looks like to the client that reuses it)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = b""
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding") == "chunked":
                    body = await _read_chunked(reader)
                self.requests.append((method, path, headers, body))
                reply = self.handler(method, path, headers, body, served)
                if reply is None:
                    break
                if isinstance(reply, tuple):
                    part, then = reply
                    writer.write(part)
                    await writer.drain()
                    if then == "hang":
                        await reader.read()  # silent until the peer goes away
                    break
                writer.write(reply)
                await writer.drain()
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readline()).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return body
        body += chunk[:-2]


def response(body: bytes, content_type: str = "application/json",
             extra: str = "Keep-Alive: timeout=5, max=100\r\n") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


async def get_raw(url: str | URL, method: str = "GET",
                  **kwargs: object) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as session, \
            session.request(method, url, **kwargs) as resp:  # type: ignore[arg-type]
        return resp.status, dict(resp.headers), await resp.read()


@pytest.fixture
async def echo() -> AsyncIterator[RawUpstream]:
    def handle(method: str, path: str, headers: dict[str, str], body: bytes,
               served: int) -> bytes:
        if path == "/gzip":
            payload = gzip.compress(b'{"message":"compressed"}')
            return response(payload, extra="Content-Encoding: gzip\r\nConnection: X-Hop\r\n"
                                           "X-Hop: secret\r\nKeep-Alive: timeout=5\r\n"
                                           "X-End-To-End: kept\r\n")
        return response(orjson.dumps({"method": method, "path": path, "headers": headers,
                                      "body_length": len(body)}))

    async with RawUpstream(handle) as upstream:
        yield upstream


async def test_hop_by_hop_headers_are_not_forwarded(echo: RawUpstream) -> None:
    with running(Llmtap(echo.url, "--upstream-kind", "openai", ready=False)) as tap:
        status, _, body = await get_raw(
            URL(tap.url + "/v1/models?limit=2&x=%2F", encoded=True), headers={
                "Connection": "keep-alive, X-Private",
                "X-Private": "hop", "Keep-Alive": "timeout=1", "TE": "trailers",
                "Proxy-Authorization": "Basic c2VjcmV0", "Authorization": "Bearer end-to-end",
                "Accept-Encoding": "gzip"},
            skip_auto_headers=["User-Agent"])
        assert status == 200
        seen = orjson.loads(body)
        headers = seen["headers"]
        assert seen["path"] == "/v1/models?limit=2&x=%2F"  # path and query untouched
        for hop in ("x-private", "keep-alive", "te", "proxy-authorization"):
            assert hop not in headers
        assert headers["authorization"] == "Bearer end-to-end"
        assert headers["accept-encoding"] == "gzip"
        assert headers["host"] == echo.url.removeprefix("http://")
        assert "user-agent" not in headers  # llmtap adds nothing the client did not send


SPOOFED = {"X-Forwarded-For": "10.1.1.1", "X-Forwarded-Proto": "https",
           "X-Forwarded-Host": "bank.example", "Forwarded": "for=10.1.1.1;proto=https"}


@pytest.mark.parametrize("trusted", [False, True])
async def test_forwarded_headers_come_from_the_connection_unless_the_peer_is_trusted(
        echo: RawUpstream, trusted: bool) -> None:
    """Any client can write X-Forwarded-*: only a peer in --trusted-proxies is believed."""
    flags = ("--trusted-proxies", "127.0.0.0/8") if trusted else ()
    with running(Llmtap(echo.url, "--upstream-kind", "openai", *flags, ready=False)) as tap:
        _, _, body = await get_raw(tap.url + "/v1/models", headers=SPOOFED)
        headers = orjson.loads(body)["headers"]
        if trusted:
            assert headers["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"
            assert headers["x-forwarded-proto"] == "https"
            assert headers["x-forwarded-host"] == "bank.example"
            assert headers["forwarded"] == SPOOFED["Forwarded"]
        else:
            assert headers["x-forwarded-for"] == "127.0.0.1"
            assert headers["x-forwarded-proto"] == "http"
            assert headers["x-forwarded-host"] == f"127.0.0.1:{tap.port}"
            assert "forwarded" not in headers


async def test_request_body_is_forwarded_whole_and_streamed(echo: RawUpstream) -> None:
    with running(Llmtap(echo.url, "--upstream-kind", "openai", ready=False)) as tap:
        small = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]})
        status, _, body = await get_raw(tap.url + "/v1/chat/completions", "POST", data=small,
                                        headers={"Content-Type": "application/json"})
        assert status == 200 and orjson.loads(body)["body_length"] == len(small)

        async def big_body() -> AsyncIterator[bytes]:  # chunked, larger than is read whole
            for _ in range(40):
                yield b"x" * 65536

        status, _, body = await get_raw(tap.url + "/upload", "POST", data=big_body())
        assert status == 200 and orjson.loads(body)["body_length"] == 40 * 65536


async def test_content_encoding_passes_through_untouched(echo: RawUpstream) -> None:
    with running(Llmtap(echo.url, "--upstream-kind", "openai", ready=False)) as tap:
        status, headers, body = await get_raw(tap.url + "/gzip")
        assert status == 200
        assert headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(body) == b'{"message":"compressed"}'  # still compressed
        assert headers["X-End-To-End"] == "kept"
        assert "X-Hop" not in headers and "Keep-Alive" not in headers


GARBAGE_SSE = (b"data: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}]}\n\n"
               b"data: {broken json\n\ndata: \xff\xfe\x00binary\n\n: comment\n\n"
               b"data: [DONE]\n\n")
GARBAGE_NDJSON = b'{"message":{"content":"a"},"done":false}\nnot json at all\n\x00\x01\x02\n{"done'


async def test_unparseable_upstream_bytes_are_relayed_unchanged() -> None:
    def handle(method: str, path: str, headers: dict[str, str], body: bytes,
               served: int) -> bytes:
        if path == "/v1/chat/completions":
            return response(GARBAGE_SSE, "text/event-stream")
        return response(GARBAGE_NDJSON, "application/x-ndjson")

    async with RawUpstream(handle) as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "ollama", ready=False)) as tap:
            for path, want in (("/v1/chat/completions", GARBAGE_SSE),
                               ("/api/chat", GARBAGE_NDJSON)):
                status, _, body = await get_raw(tap.url + path, "POST",
                                                json={"model": "m", "stream": True})
                assert (status, body) == (200, want)
            m = tap.metrics()
            # SSE: broken json + binary; NDJSON: "not json", the binary line, the cut-off tail
            assert m.value("llmtap_unparseable_frames_total") == 5
            # The SSE stream ends with [DONE]: answered. The NDJSON one never had its done
            # line (its tail is cut off): a stream that stopped short, an upstream error.
            assert m.value("gen_ai_server_request_duration_seconds_count", error_type="") == 1
            assert m.value("gen_ai_server_request_duration_seconds_count",
                           error_type="upstream_error") == 1
            assert m.value("gen_ai_server_time_to_first_token_seconds_count") == 1  # answered
            assert "Traceback" not in tap.log.read_text()


async def test_dead_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    """The upstream answers the first request of each connection with keep-alive, then drops
    the connection when the next request arrives on it (llama-server's behaviour)."""

    def handle(method: str, path: str, headers: dict[str, str], body: bytes,
               served: int) -> bytes | None:
        if served:
            return None
        return response(b'{"choices":[{"message":{"content":"hi"}}],"usage":'
                        b'{"prompt_tokens":3,"completion_tokens":1}}')

    async with RawUpstream(handle) as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "openai", ready=False)) as tap:
            statuses = []
            for _ in range(6):
                status, _, _ = await get_raw(tap.url + "/v1/chat/completions", "POST",
                                             json={"model": "m", "messages": []})
                statuses.append(status)
                await asyncio.sleep(0.01)
            assert statuses == [200] * 6
            m = tap.metrics()
            assert m.value("llmtap_upstream_retries_total") >= 1
            assert m.value("gen_ai_server_request_duration_seconds_count", error_type="") == 6


CHUNKED_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
FIRST_EVENT = b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
FIRST_CHUNK = f"{len(FIRST_EVENT):x}\r\n".encode() + FIRST_EVENT + b"\r\n"


def failing_upstream(method: str, path: str, headers: dict[str, str], body: bytes,
                     served: int) -> Reply:
    behaviour = headers.get("x-behaviour", "hang-before-headers")
    if behaviour == "hang-before-headers":
        return (b"", "hang")
    if behaviour == "hang-mid-stream":
        return (CHUNKED_HEAD + FIRST_CHUNK, "hang")
    return (CHUNKED_HEAD + FIRST_CHUNK, "close")  # dies mid-stream


async def test_first_byte_timeout_answers_504_in_dialect() -> None:
    async with RawUpstream(failing_upstream) as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "ollama",
                            "--first-byte-timeout", "0.3", ready=False)) as tap:
            status, _, body = await get_raw(tap.url + "/api/chat", "POST",
                                            json={"model": "m", "messages": []})
            assert status == 504
            assert "did not answer in time" in orjson.loads(body)["error"]  # Ollama's shape
            assert "127.0.0.1" not in body.decode()  # what failed, never where
            status, _, body = await get_raw(tap.url + "/v1/chat/completions", "POST",
                                            json={"model": "m", "messages": []})
            assert status == 504 and orjson.loads(body)["error"]["type"] == "timeout"
            m = tap.metrics()
            assert m.value("gen_ai_server_request_duration_seconds_count",
                           error_type="timeout") == 2
            assert (m.value("llmtap_requests_in_flight"), m.value("llmtap_requests_waiting")) \
                == (0, 0)


@pytest.mark.parametrize(("behaviour", "error_type", "flags"), [
    ("hang-mid-stream", "timeout", ("--idle-timeout", "0.3")),
    ("dies-mid-stream", "upstream_reset", ()),
])
async def test_broken_stream_ends_the_clients_stream_and_is_counted(
        behaviour: str, error_type: str, flags: tuple[str, ...]) -> None:
    async with RawUpstream(failing_upstream) as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "openai", *flags,
                            ready=False)) as tap:
            received = b""
            async with aiohttp.ClientSession() as session, \
                    session.post(tap.url + "/v1/chat/completions",
                                 json={"model": "m", "stream": True},
                                 headers={"X-Behaviour": behaviour}) as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    async for chunk in resp.content.iter_any():
                        received += chunk
            assert received == FIRST_EVENT  # what did arrive was relayed, then a clean cut
            for _ in range(50):
                m = tap.metrics()
                if m.value("gen_ai_server_request_duration_seconds_count"):
                    break
                await asyncio.sleep(0.02)
            assert m.value("gen_ai_server_request_duration_seconds_count",
                           error_type=error_type) == 1
            assert m.value("gen_ai_server_request_duration_seconds_count") == 1
            assert m.value("llmtap_requests_in_flight") == 0
