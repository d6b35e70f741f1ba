"""The upstream side: a keep-alive connection pool speaking HTTP/1.1 over asyncio transports,
responses parsed by llhttp (httptools).

A response is delivered by push: its body pieces go straight from the connection's
`data_received` to the exchange's sink (no task, no await per chunk), and the exchange's flow
control pauses the connection's reading when the client reads slowly. Bytes that arrive
with the response head, before the exchange has started reading, are held until it does.

A pooled keep-alive connection the upstream has closed (llama-server closes them after every
streamed answer, though it advertised keep-alive) shows up as a connection that ends before
any byte of the response: the request is then sent once more on a fresh connection, when its
body can be sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from exporter.relay.body import RequestBody
from exporter.relay.http1 import LAST_CHUNK, Headers, chunk, request_head
from exporter.relay.outcome import UpstreamConnectError, UpstreamResetError

IDLE_SECONDS = 30.0  # a pooled connection idle longer than this is not reused
MAX_IDLE_PER_ORIGIN = 256
EARLY_LIMIT = 1 << 20  # bytes held for an exchange that has not started reading yet
# Response bytes that are not body (status line, headers, 1xx answers, chunk-size lines)
# read since the last body byte: an upstream that sends endless headers is cut here (it grew
# llmtap to 3.7 GB before this bound).
MAX_FRAMING_BYTES = 256 << 10
MAX_REASON = 64  # a reason phrase longer than this is replaced by the standard one
COPY_LIMIT = 64 << 10  # request bodies up to this size go out in one buffer with the head


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: scheme, host, port, and the URL's path prefix."""

    host: str
    port: int
    tls: bool
    prefix: bytes  # the URL's path without a trailing slash ("" for most)

    @classmethod
    def from_url(cls, url: str) -> Origin:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        if parts.hostname is None:
            raise ValueError(f"no host in {url!r}")
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls,
                   parts.path.rstrip("/").encode())

    @property
    def host_header(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return (host if self.port == default else f"{host}:{self.port}").encode()

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


@dataclass(slots=True)
class OutgoingRequest:
    method: bytes
    target: bytes  # origin-form path and query, before the origin's prefix
    headers: Headers  # end to end: no Host, Content-Length or Transfer-Encoding
    body: bytes | RequestBody | None  # whole, streamed, or none

    @property
    def replayable(self) -> bool:
        return not isinstance(self.body, RequestBody)


class ResponseSink(Protocol):
    """Where a response's body goes (the exchange)."""

    def body(self, data: bytes) -> None: ...

    def end(self) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class PooledResponse:
    """One response read from a pooled connection. Detached from its connection once it is
    complete, so a late `abandon` can never touch a connection serving someone else."""

    __slots__ = ("_conn", "_early", "_ended", "_error", "_held", "_paused", "_sink",
                 "delimited", "headers", "reason", "status")

    def __init__(self, conn: UpstreamConnection) -> None:
        self._conn: UpstreamConnection | None = conn
        self.status = 0
        self.reason = b""
        self.headers: Headers = []
        self.delimited = True  # framed by Content-Length or chunks (else: until close)
        self._sink: ResponseSink | None = None
        self._early: list[bytes] = []
        self._ended = False
        self._error: BaseException | None = None
        self._held = False  # reading stopped: too much came before the exchange started
        self._paused = False  # reading stopped by the exchange (its client reads slowly)

    def start(self, sink: ResponseSink) -> None:
        """Deliver the body to `sink`: what arrived already now, the rest as it comes."""
        self._sink = sink
        early, self._early = self._early, []
        for piece in early:
            sink.body(piece)
        if self._error is not None:
            sink.fail(self._error)
        elif self._ended:
            sink.end()
        elif self._held:
            self._held = False
            self._reading()

    def pause(self) -> None:
        self._paused = True
        self._reading()

    def resume(self) -> None:
        self._paused = False
        self._reading()

    def _reading(self) -> None:
        if self._conn is not None:
            self._conn.reading(not (self._held or self._paused))

    def abandon(self) -> None:
        """The exchange ended before the body did: the connection is spent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # ------------------------------------------------------------------ from the connection

    def _body(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink.body(data)
            return
        self._early.append(data)
        if not self._held and sum(map(len, self._early)) > EARLY_LIMIT:
            self._held = True
            self._reading()

    def _end(self) -> None:
        self._conn = None
        sink, self._sink = self._sink, None  # no cycle left through the exchange
        if sink is not None:
            sink.end()
        else:
            self._ended = True

    def _fail(self, error: BaseException) -> None:
        self._conn = None
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.fail(error)
        else:
            self._error = error


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = monotonic()
        # One parser for the connection's life: llhttp starts over after each message.
        self._parser = httptools.HttpResponseParser(self)
        self._response: PooledResponse | None = None
        self._head: asyncio.Future[PooledResponse] | None = None
        self._head_only = False  # a HEAD request: the response has no body
        self._got_bytes = False  # any byte of the current response
        self._body: RequestBody | None = None  # a request body being streamed
        self._body_sent = True
        self._chunked_body = False
        self._pieces: list[bytes] = []  # body pieces of the read being parsed
        self._complete: bool | None = None  # the response ended in this read (reusable?)
        self._trailing = False  # ...and more bytes came after its end
        self._framing = 0  # bytes read since the last body byte (a bound on heads)

    # ------------------------------------------------------------------ sending

    async def send(self, request: OutgoingRequest) -> PooledResponse:
        assert self.transport is not None
        self._response = PooledResponse(self)
        self._head = self.pool.loop.create_future()
        self._head_only = request.method == b"HEAD"
        self._got_bytes = False
        self._framing = 0
        body = request.body
        headers: Headers = [(b"Host", self.origin.host_header), *request.headers]
        if isinstance(body, bytes):
            headers.append((b"Content-Length", b"%d" % len(body)))
        elif body is not None:
            self._chunked_body = body.length is None
            headers.append((b"Transfer-Encoding", b"chunked") if body.length is None
                           else (b"Content-Length", b"%d" % body.length))
        head = request_head(request.method, self.origin.prefix + request.target, headers)
        if isinstance(body, RequestBody):
            self._body_sent = False
            self._body = body
            self.transport.write(head)
            body.stream(self._body_piece, self._body_end)
        else:
            self._body_sent = True
            # One write: a small body is cheaper copied than sent as a second buffer.
            if body and len(body) > COPY_LIMIT:
                self.transport.writelines((head, body))
            else:
                self.transport.write(head + body if body else head)
        return await self._head

    def _body_piece(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(chunk(data) if self._chunked_body else data)

    def _body_end(self) -> None:
        self._body_sent = True
        self._body = None
        if self._chunked_body and self.transport is not None and not self.closed:
            self.transport.write(LAST_CHUNK)

    def reading(self, on: bool) -> None:
        if self.transport is None or self.closed:
            return
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._response is None:  # bytes nobody asked for, on an idle connection
            self.close()
            return
        pieces = self._pieces
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._deliver(pieces)  # what was valid before the bad bytes still goes on
            if self._complete is not None:  # bytes after a complete answer: it stands
                self._trailing = True
            else:
                self._lost(UpstreamResetError(f"malformed response from {self.origin}: "
                                              f"{exc!r}"))
                self.close()
                return
        self._framing = 0 if pieces or self._complete is not None else \
            self._framing + len(data)
        self._deliver(pieces)
        if self._framing > MAX_FRAMING_BYTES:
            self._lost(UpstreamResetError(f"{self.origin} sent more than "
                                          f"{MAX_FRAMING_BYTES} bytes of response head"))
            self.close()
            return
        if self._complete is not None:
            # Bytes after the end of the answer (a second response nobody asked for) would
            # be read as the start of the next client's answer: such a connection is spent.
            reusable = self._complete and not self._trailing
            self._complete, self._trailing = None, False
            self._finish(reusable)

    def _deliver(self, pieces: list[bytes]) -> None:
        """One read, one write: the pieces of body this read held (a chunked body gives one
        per chunk) go on together, the way nginx forwards a read. At saturation a read holds
        dozens of chunks; writing each on its own cost a system call apiece."""
        if not pieces:
            return
        body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        if self._response is not None:
            self._response._body(body)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        response = self._response
        if response is not None and not response.delimited and self._head is not None \
                and self._head.done():
            self._finish(reusable=False)  # a body that runs until the connection closes
            return
        reason = f": {exc}" if exc else ""
        self._lost(UpstreamResetError(f"{self.origin} closed the connection{reason}",
                                      before_response=not self._got_bytes))

    def _lost(self, error: UpstreamResetError) -> None:
        head, response = self._head, self._response
        self._response = None
        if head is not None and not head.done():
            head.set_exception(error)
        elif response is not None:
            response._fail(error)
        if self._body is not None:
            self._body.resume()  # nothing reads the rest of it now; let the client finish

    def pause_writing(self) -> None:
        if self._body is not None:
            self._body.pause()

    def resume_writing(self) -> None:
        if self._body is not None:
            self._body.resume()

    # ------------------------------------------------------------------ llhttp callbacks

    def on_message_begin(self) -> None:
        if self._complete is not None:
            self._trailing = True

    def on_status(self, reason: bytes) -> None:
        response = self._response
        if response is not None and self._complete is None and \
                len(response.reason) < MAX_REASON:
            response.reason = (response.reason + reason)[:MAX_REASON + 1]

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None and self._complete is None:
            self._response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self._response
        if response is None or self._complete is not None:
            return
        status = self._parser.get_status_code()
        if status == 101:  # llmtap asked for no upgrade: an upstream switching is broken
            self._lost(UpstreamResetError(f"{self.origin} switched protocols (101)"))
            self.close()
            return
        if 100 <= status < 200:
            response.headers, response.reason = [], b""  # informational: the real one follows
            return
        if len(response.reason) > MAX_REASON:
            response.reason = b""  # the standard phrase is sent instead
        response.status = status
        response.delimited = self._delimited(response)
        if self._head is not None and not self._head.done():
            self._head.set_result(response)
        if self._head_only:
            self._finish(reusable=False)

    @staticmethod
    def _delimited(response: PooledResponse) -> bool:
        if response.status in (204, 304):
            return True
        for name, value in response.headers:
            lower = name.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding"
                                              and b"chunked" in value.lower()):
                return True
        return False

    def on_body(self, data: bytes) -> None:
        if self._complete is None:
            self._pieces.append(data)

    def on_message_complete(self) -> None:
        response = self._response
        if response is None or response.status < 200 or self._complete is not None:
            return
        self._complete = self._parser.should_keep_alive()  # finished after this read's body

    def _finish(self, reusable: bool) -> None:
        response = self._response
        self._response = None
        self._head = None
        if reusable and self._body_sent and not self.closed:
            self.idle_since = monotonic()
            self.reading(True)
            self.pool.release(self)
        else:
            self.close()
        if response is not None:
            response._end()


class UpstreamPool:
    def __init__(self, connect_timeout: float = 5.0,
                 on_retry: Callable[[], None] | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.on_retry = on_retry
        self._idle: dict[Origin, list[UpstreamConnection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, looked up once (each lookup is a getpid() in CPython 3.11)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def request(self, origin: Origin, request: OutgoingRequest) -> PooledResponse:
        """Send `request` and return the response once its head is in (body unread)."""
        conn = self._take(origin)
        reused = conn is not None
        if conn is None:
            conn = await self.connect(origin)
        try:
            return await self._send(conn, request)
        except UpstreamResetError as exc:
            if not (reused and exc.before_response and request.replayable):
                raise
        if self.on_retry is not None:
            self.on_retry()
        return await self._send(await self.connect(origin), request)

    @staticmethod
    async def _send(conn: UpstreamConnection, request: OutgoingRequest) -> PooledResponse:
        try:
            return await conn.send(request)
        except BaseException:  # cancelled (client gone, deadline) or failed: spent
            conn.close()
            raise

    async def connect(self, origin: Origin) -> UpstreamConnection:
        loop = self.loop
        tls = self._tls_context() if origin.tls else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self, origin), origin.host, origin.port,
                    ssl=tls, server_hostname=origin.host if tls else None)
        except TimeoutError:
            raise UpstreamConnectError(f"connecting to {origin} timed out after "
                                       f"{self.connect_timeout:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(f"cannot connect to {origin}: "
                                       f"{exc.strerror or exc}" if isinstance(exc, OSError)
                                       else f"TLS with {origin} failed: {exc}") from None
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _take(self, origin: Origin) -> UpstreamConnection | None:
        idle = self._idle.get(origin)
        now = monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.close()
        return None

    def release(self, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= MAX_IDLE_PER_ORIGIN:
            conn.close()
            return
        idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)
