"""The proxy port's HTTP/1.1 server: asyncio transports and llhttp (httptools), nothing else.

One `ClientConnection` per accepted connection parses requests with llhttp, the C parser
aiohttp and uvicorn use, and hands each complete request head to an exchange (relay/exchange
.py), which answers through `send`. The connection owns what belongs to the connection:

- the header deadline (`--header-timeout`): a request head must be complete that long after
  the connection opened or went idle (slowloris), which is also how long an idle keep-alive
  connection stays open;
- the stall deadline (`--client-idle-timeout`): a client that sends no byte of a body it
  owes, or reads no byte of its answer, for that long is cut;
- flow control: a client that reads slowly pauses the upstream (through its exchange), an
  upstream that reads slowly pauses the client's body;
- lingering close: a connection answered before its request body was read (401, 413) is
  half-closed and drained, never reset, so the client always gets the answer;
- a connection cap derived from the file-descriptor limit, so the admin port and the
  upstream connections always have descriptors left.

Absolute-form targets, malformed heads and oversized heads are answered here, in the dialect
the path implies, without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Protocol, cast

import httptools
import structlog

from exporter.protocols.errors import error_body
from exporter.relay.body import RequestBody
from exporter.relay.deadline import Deadline, Sweeper
from exporter.relay.http1 import Headers, response_head

log = structlog.get_logger("llmtap.proxy")

MAX_HEAD_BYTES = 64 << 10  # request line plus headers (aiohttp allows 8 KiB a line)
LINGER_SECONDS = 5.0  # draining an unread body: at most this long without a byte...
LINGER_TOTAL = 30.0  # ...and this long in all (nginx's lingering_timeout / lingering_time)
MAX_PIPELINED = 8  # requests read ahead of the one being answered, before reading pauses


@dataclass(slots=True)
class IncomingRequest:
    """A request head as the client sent it."""

    method: str
    target: bytes  # the request target, raw
    path: str  # its path without the query ("" when the target is not origin-form)
    headers: Headers  # in wire order, names as sent
    fields: dict[bytes, bytes]  # lower-case name → value (repeated fields joined by ", ")
    keep_alive: bool
    http11: bool
    arrival: float  # perf_counter() when the head was complete
    body: RequestBody
    peer: str
    local: str  # host:port the client connected to

    @property
    def origin_form(self) -> bool:
        return self.target.startswith(b"/")


class Exchange(Protocol):
    """What the connection needs of the exchange it hands a request to."""

    def begin(self) -> None: ...

    def client_gone(self) -> None: ...

    def client_stalled(self) -> None: ...

    def client_paused(self, paused: bool) -> None: ...

    def stop(self) -> None: ...

    @property
    def task(self) -> asyncio.Task[None] | None: ...


ExchangeFactory = Callable[["ClientConnection", IncomingRequest], Exchange]


class HeadTooLarge(Exception):
    pass


@dataclass
class ServerLimits:
    header_timeout: float = 15.0
    client_idle_timeout: float = 60.0
    max_body_bytes: int = 64 << 20


def connection_cap() -> int:
    """Client connections to accept at most: each relayed one needs a second descriptor for
    its upstream, and a reserve stays free for the admin port, pollers and logs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft - 128) // 2)


def raise_fd_limit() -> None:
    """Use the hard limit of open files, not the soft default (often 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ProxyServer:
    def __init__(self, make_exchange: ExchangeFactory, limits: ServerLimits,
                 sweeper: Sweeper) -> None:
        self.make_exchange = make_exchange
        self.limits = limits
        self.sweeper = sweeper
        self.connections: set[ClientConnection] = set()
        self.max_connections = connection_cap()
        self.draining = False
        self._server: asyncio.AbstractServer | None = None
        # Looked up once, by start(): asyncio.get_running_loop() costs a getpid() system
        # call every time in CPython 3.11 (9% of the CPU per request when the relay called
        # it three times a request).
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "start() first"
        return self._loop

    async def start(self, host: str, port: int) -> int:
        """Listen; the port really bound (port 0 becomes the kernel's)."""
        loop = self._loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self), host, port, reuse_address=True, backlog=1024)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float) -> None:
        """Stop accepting, close idle connections, give exchanges `grace` seconds to end,
        then stop the rest."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.drain()
        running = [task for c in self.connections if (task := c.task) is not None]
        if running:
            await asyncio.wait(running, timeout=grace)
        for connection in list(self.connections):
            connection.stop()
        for _ in range(50):  # stopped exchanges conclude (counted, logged) on their tasks
            if not self.connections:
                break
            await asyncio.sleep(0.01)


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self.local = ""
        self.closed = False
        self.exchange: Exchange | None = None  # the request being answered
        self._queue: deque[IncomingRequest] = deque()  # pipelined requests read ahead
        self._parsing: IncomingRequest | None = None  # whose body the parser is reading
        self._url = b""
        self._headers: Headers = []
        self._head_bytes = 0
        self._head_deadline: Deadline | None = None
        self._last_progress = 0.0
        self._buffered_at_check = 0
        self._write_paused = False
        self._read_paused = False
        self._lingering = False
        self._discarding = False

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.connections.add(self)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.local = f"{local[0]}:{local[1]}" if isinstance(local, tuple) else ""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self.server.connections) > self.server.max_connections or self.server.draining:
            self._refuse_connection()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        self._last_progress = perf_counter()
        if self._discarding:
            return  # after a request llmtap could not read: drained, never parsed
        try:
            self.parser.feed_data(data)
            if self.exchange is not None and self._parsing is not None:
                self.server.sweeper.add(self)  # a body still owed: watch for a stall
        except httptools.HttpParserUpgrade:
            pass  # Upgrade is hop-by-hop: the request is relayed as a plain one
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HeadTooLarge):
                self._reject(431, "request_header_fields_too_large",
                             f"the request head is larger than {MAX_HEAD_BYTES} bytes")
            else:
                log.error("request parser callback failed", error=repr(exc.__context__))
                self._reject(500, "internal_error", "llmtap failed to read this request")
        except httptools.HttpParserError as exc:
            self._reject(400, "invalid_request", f"malformed HTTP request: {exc}")

    def eof_received(self) -> bool:
        return False  # a client that half-closes is gone: close, and cancel its exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._cancel_timers()
        if self._parsing is not None and not self._parsing.body.complete:
            self._parsing.body.lost()
        if self.exchange is not None:
            self.exchange.client_gone()
        self._queue.clear()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.exchange is not None:
            self.exchange.client_paused(True)
        self._buffered_at_check = self._buffered()
        self._last_progress = perf_counter()
        self.server.sweeper.add(self)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._last_progress = perf_counter()
        if self.exchange is not None:
            self.exchange.client_paused(False)

    # ------------------------------------------------------------------ llhttp callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._parsing is not None and self._parsing.headers is self._headers:
            return  # a trailer of a chunked body: llmtap does not forward trailers
        self._headers.append((name, value))
        self._count_head(len(name) + len(value) + 4)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        request = self._request()
        self._parsing = request
        if self.exchange is None:
            self._begin(request)
            return
        self._queue.append(request)
        if len(self._queue) >= MAX_PIPELINED:
            self.flow(False)

    def on_body(self, data: bytes) -> None:
        if self._parsing is not None:
            self._parsing.body.piece(data)

    def on_message_complete(self) -> None:
        request, self._parsing = self._parsing, None
        if request is not None:
            request.body.end()
        if self._lingering:
            self._close()

    def _request(self) -> IncomingRequest:
        headers = self._headers
        fields: dict[bytes, bytes] = {}
        for name, value in headers:
            lower = name.lower()
            prior = fields.get(lower)
            fields[lower] = value if prior is None else prior + b", " + value
        target = self._url
        path = ""
        if target.startswith(b"/"):
            path = target.partition(b"?")[0].decode("latin-1")
        elif b"://" in target:  # absolute-form: its path still picks the error's dialect
            path = "/" + target.split(b"://", 1)[1].partition(b"/")[2].partition(
                b"?")[0].decode("latin-1")
        length_text = fields.get(b"content-length")
        length = int(length_text) if length_text is not None else None  # llhttp checked it
        chunked = b"chunked" in fields.get(b"transfer-encoding", b"").lower()
        expected = chunked or bool(length)
        body = RequestBody(length, expected, self.server.limits.max_body_bytes, self.flow,
                           self.loop)
        return IncomingRequest(
            self.parser.get_method().decode(), target, path, headers, fields,
            self.parser.should_keep_alive(), self.parser.get_http_version() == "1.1",
            perf_counter(), body, self.peer, self.local)

    # ------------------------------------------------------------------ exchanges

    def _begin(self, request: IncomingRequest) -> None:
        exchange = self.exchange = self.server.make_exchange(self, request)
        exchange.begin()

    def send(self, data: bytes) -> None:
        if not self.closed:
            assert self.transport is not None
            self.transport.write(data)

    def exchange_done(self, reuse: bool, body_complete: bool) -> None:
        """The answer went out whole (reuse: the connection may carry another request)."""
        self.exchange = None
        if self.closed:
            return
        if not body_complete:
            self._linger()
        elif not reuse or self.server.draining:
            self._close()
        elif self._queue:
            request = self._queue.popleft()
            if self._read_paused and len(self._queue) < MAX_PIPELINED:
                self.flow(True)
            self._begin(request)
        else:
            self._arm_header_timer()

    def abort(self) -> None:
        """Cut the connection (a broken answer, a stalled client)."""
        if self.transport is not None and not self.closed:
            self.transport.abort()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task of the exchange being answered, if any."""
        return self.exchange.task if self.exchange is not None else None

    def drain(self) -> None:
        """Shutdown begins: an idle connection closes now, a busy one after its answer."""
        if self.exchange is None:
            self._close()

    def stop(self) -> None:
        """Shutdown's grace is over."""
        if self.exchange is not None:
            self.exchange.stop()
        self.abort()

    # ------------------------------------------------------------------ flow and timers

    def flow(self, reading: bool) -> None:
        """Pause (False) or resume (True) reading from the client."""
        if self.transport is None or self.closed or reading != self._read_paused:
            return
        self._read_paused = not reading
        if reading:
            self.transport.resume_reading()
            self._last_progress = perf_counter()
        else:
            self.transport.pause_reading()

    def _buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def _stalling(self) -> bool:
        """Is the client the one holding this exchange up?"""
        if self.exchange is None:
            return False
        if self._write_paused:
            return True
        request = self._parsing
        return (request is not None and not request.body.complete and not self._read_paused
                and not request.body.too_large)

    def check(self, now: float) -> bool:
        """The stall watch (see Sweeper): True once there is nothing left to watch."""
        if not self._stalling():
            return True
        buffered = self._buffered()
        if self._write_paused and buffered < self._buffered_at_check:
            self._last_progress = now  # the client is reading, if slowly
        self._buffered_at_check = buffered
        if now - self._last_progress < self.server.limits.client_idle_timeout:
            return False
        if self.exchange is not None:
            self.exchange.client_stalled()
        self.abort()
        return True

    def _arm_header_timer(self) -> None:
        now = perf_counter()
        if self._head_deadline is None:
            self._head_deadline = Deadline(self.server.sweeper, self.server.limits.header_timeout,
                                           self._close)
        else:
            self._head_deadline.rearm(self.server.limits.header_timeout, now)

    def _cancel_header_timer(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.disarm()

    def _cancel_timers(self) -> None:
        self._cancel_header_timer()
        self.server.sweeper.discard(self)

    # ------------------------------------------------------------------ closing

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()  # after what is buffered has been written

    def _linger(self) -> None:
        """Answered before the body was read: half-close, read and drop the rest of the body
        (never close with unread bytes: the kernel would reset the connection and the
        client could lose the answer), then close."""
        if self.transport is None or self.closed or self._lingering:
            return
        self._lingering = True
        self.flow(True)
        with contextlib.suppress(OSError, RuntimeError):
            if self.transport.can_write_eof():
                self.transport.write_eof()
        started = perf_counter()

        def check() -> None:
            if self.closed:
                return
            now = perf_counter()
            if now - self._last_progress >= LINGER_SECONDS or now - started >= LINGER_TOTAL:
                self._close()
            else:
                self.loop.call_later(1.0, check)

        self._last_progress = started
        self.loop.call_later(1.0, check)

    def _reject(self, status: int, kind: str, message: str) -> None:
        """Answer a request llmtap could not read, then close the connection."""
        path = self._parsing.path if self._parsing is not None else ""
        self._answer_and_close(status, error_body(path, status, message, kind))

    def _refuse_connection(self) -> None:
        """Over the connection cap: a 503 and the descriptor back at once. No lingering here:
        under a flood of connections, descriptors held for a clean close would run out."""
        assert self.transport is not None
        body = error_body("", 503, "llmtap is at its connection limit; retry later",
                          "overloaded")
        self.transport.write(_error_response(503, body, retry_after=True))
        self.closed = True
        self.transport.abort()

    def _answer_and_close(self, status: int, body: bytes) -> None:
        if self.transport is None or self.closed:
            return
        if self.exchange is not None:
            self.exchange.client_gone()
            self.exchange = None
        self.transport.write(_error_response(status, body))
        self._parsing = None
        self._discarding = True
        self._linger()


def _error_response(status: int, body: bytes, retry_after: bool = False) -> bytes:
    headers: Headers = [(b"Content-Type", b"application/json"),
                        (b"Content-Length", b"%d" % len(body)), (b"Connection", b"close")]
    if retry_after:
        headers.append((b"Retry-After", b"1"))
    return response_head(status, b"", headers) + body
