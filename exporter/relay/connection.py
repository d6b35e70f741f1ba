"""One client connection on the proxy port: llhttp parses, an exchange answers each request.

The connection owns what belongs to the connection:

- the header deadline (`--header-timeout`): a request head must be complete that long after
  the connection opened or went idle (slowloris), which is also how long an idle keep-alive
  connection stays open;
- bounded reading: at most MAX_HEAD_BYTES of head per request, and at most
  MAX_FRAMING_BYTES read without progress (llhttp copies a header field that spans reads
  whole on each read, so an endless one must be cut on raw bytes, before any callback);
- the stall deadline (`--client-idle-timeout`): a client that sends no byte of a body it
  owes, or reads no byte of what it was sent, for that long is cut;
- flow control: reading pauses while the client is not reading (pipelined requests cannot
  pile up answers), while a pipelined request waits (its body is not read ahead), and while
  the upstream is not taking a streamed body; a client that reads slowly pauses the upstream;
- closing: a connection answered before its request body was read (401, 413) is half-closed
  and drained, never reset, so the client gets the answer; one that will not take its last
  bytes is aborted after the stall deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING, cast

import httptools
import structlog

from exporter.protocols.errors import error_body
from exporter.relay.body import RequestBody
from exporter.relay.deadline import Deadline
from exporter.relay.http1 import Headers, response_head
from exporter.relay.request import IncomingRequest, Reject, fields_of, head_problem, target_path

if TYPE_CHECKING:
    from exporter.relay.server import Exchange, ProxyServer

log = structlog.get_logger("llmtap.proxy")

MAX_HEAD_BYTES = 64 << 10  # request line plus headers (aiohttp allows 8 KiB a line)
MAX_FRAMING_BYTES = 2 * MAX_HEAD_BYTES  # read with no head done and no body byte
LINGER_SECONDS = 5.0  # draining an unread body: at most this long without a byte...
LINGER_TOTAL = 30.0  # ...and this long in all (nginx's lingering_timeout / lingering_time)
REJECT_LINGER = 2.0  # after a request llmtap could not read: no body to drain, only the answer
MAX_PIPELINED = 8  # requests read ahead of the one being answered


class StopParsing(Exception):
    """Raised in a parser callback once the connection is closing: nothing more is read."""


def _too_large(path: str) -> Reject:
    return Reject(431, "request_header_fields_too_large",
                  f"the request head is larger than {MAX_HEAD_BYTES} bytes", path)


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self.local = ""
        self.closed = False  # llmtap is closing it (or has)
        self.lost = False  # the transport is gone
        self.exchange: Exchange | None = None  # the request being answered
        self._queue: deque[IncomingRequest] = deque()  # pipelined requests read ahead
        self._parsing: IncomingRequest | None = None  # whose body the parser is reading
        self._url = b""
        self._headers: Headers = []
        self._head_bytes = 0
        self._framing = 0  # bytes read since the last progress (head done, body byte)
        self._progressed = False
        self._head_deadline: Deadline | None = None
        self._last_progress = 0.0
        self._buffered_at_check = 0
        self._write_paused = False
        self._holds: set[str] = set()  # why reading is paused: client, pipeline, upstream
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
        self._progressed = False
        self._feed(data)
        if self._discarding:
            return
        self._framing = 0 if self._progressed else self._framing + len(data)
        if self._framing > MAX_FRAMING_BYTES:
            self._reject(_too_large(self._parsing.path if self._parsing else ""))
            return
        self._hold("pipeline", bool(self._queue))
        if self.exchange is not None and self._parsing is not None:
            self.server.sweeper.add(self)  # a body still owed: watch for a stall

    def _feed(self, data: bytes) -> None:
        while data:
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as upgrade:
                # An Upgrade request without a body, taken as a plain one (the Upgrade field
                # is hop-by-hop); llhttp stopped after it: what follows is the next request.
                data = data[upgrade.args[0]:]
            except httptools.HttpParserCallbackError as exc:
                self._callback_failed(exc.__context__)
                return
            except httptools.HttpParserError as exc:
                self._reject(Reject(400, "invalid_request", f"malformed HTTP request: {exc}",
                                    self._parsing.path if self._parsing else ""))
                return

    def _callback_failed(self, cause: BaseException | None) -> None:
        if isinstance(cause, Reject):
            self._reject(cause)
        elif isinstance(cause, StopParsing):
            self._discarding = True
        else:
            log.error("request parser callback failed", error=repr(cause))
            self._reject(Reject(500, "internal_error", "llmtap failed to read this request"))

    def eof_received(self) -> bool:
        return False  # a client that half-closes is gone: close, and cancel its exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.lost = True
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
        self._hold("client", True)  # no more requests read while answers are not taken
        self._buffered_at_check = self._buffered()
        self._last_progress = perf_counter()
        self.server.sweeper.add(self)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._last_progress = perf_counter()
        if self.exchange is not None:
            self.exchange.client_paused(False)
        self._hold("client", False)

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
            raise _too_large(target_path(self._url))

    def on_headers_complete(self) -> None:
        if self.closed or self._lingering:
            raise StopParsing  # a request behind one answered with Connection: close
        self._progressed = True
        self._cancel_header_timer()
        request = self._request()
        self._parsing = request
        if self.exchange is None:
            self._begin(request)
            return
        if len(self._queue) >= MAX_PIPELINED:
            raise Reject(503, "overloaded", f"more than {MAX_PIPELINED} pipelined requests",
                         request.path)
        self._queue.append(request)

    def on_body(self, data: bytes) -> None:
        self._progressed = True
        if self._parsing is not None:
            self._parsing.body.piece(data)

    def on_message_complete(self) -> None:
        self._progressed = True
        request, self._parsing = self._parsing, None
        if request is not None:
            request.body.end()
        if self._lingering:
            self._close()

    def _request(self) -> IncomingRequest:
        headers = self._headers
        fields, hosts = fields_of(headers)
        path = target_path(self._url)
        length_text = fields.get(b"content-length")
        length = int(length_text) if length_text is not None else None  # llhttp checked it
        chunked = b"chunked" in fields.get(b"transfer-encoding", b"").lower()
        expected = chunked or bool(length)
        method = self.parser.get_method().decode()
        problem = head_problem(method, self.parser.get_http_version(),
                               self.parser.should_upgrade(), expected, hosts, fields, path)
        if problem is not None:
            raise problem
        body = RequestBody(length, expected, self.server.limits.max_body_bytes,
                           self._upstream_flow, self.loop)
        return IncomingRequest(
            method, self._url, path, headers, fields, self.parser.should_keep_alive(),
            self.parser.get_http_version() == "1.1", perf_counter(), body, self.peer,
            self.local)

    # ------------------------------------------------------------------ exchanges

    def _begin(self, request: IncomingRequest) -> None:
        exchange = self.exchange = self.server.make_exchange(self, request)
        exchange.begin()

    def send(self, data: bytes) -> None:
        if not self.lost:
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
            self._hold("pipeline", bool(self._queue))
            self._begin(request)
        else:
            self._arm_header_timer()

    def abort(self) -> None:
        """Cut the connection (a broken answer, a stalled client)."""
        if self.transport is not None and not self.lost:
            self.closed = True
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

    def _hold(self, reason: str, on: bool) -> None:
        """Reading pauses while any reason holds it."""
        was = bool(self._holds)
        if on:
            self._holds.add(reason)
        else:
            self._holds.discard(reason)
        now = bool(self._holds)
        if now == was or self.transport is None or self.lost:
            return
        if now:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()
            self._last_progress = perf_counter()

    def _upstream_flow(self, reading: bool) -> None:
        """A streamed body: the upstream connection takes it (True) or is full (False)."""
        self._hold("upstream", not reading)

    def _buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def _stalling(self) -> bool:
        """Is the client the one holding things up?"""
        if self._write_paused:
            return True
        request = self._parsing
        return (self.exchange is not None and request is not None
                and not request.body.complete and "upstream" not in self._holds
                and not request.body.too_large)

    def check(self, now: float) -> bool:
        """The stall watch (see Sweeper): True once there is nothing left to watch."""
        if self.lost or not self._stalling():
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
        if self._head_deadline is None:
            self._head_deadline = Deadline(self.server.sweeper, self.server.limits.header_timeout,
                                           self._close)
        else:
            self._head_deadline.rearm(self.server.limits.header_timeout, perf_counter())

    def _cancel_header_timer(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.disarm()

    def _cancel_timers(self) -> None:
        self._cancel_header_timer()
        self.server.sweeper.discard(self)

    # ------------------------------------------------------------------ closing

    def _close(self) -> None:
        """Close once what is buffered has been written; a client that will not take it
        has the stall deadline to, then the connection is aborted."""
        if self.transport is None or self.closed:
            return
        self.closed = True
        self.transport.close()
        self.loop.call_later(self.server.limits.client_idle_timeout, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def _linger(self, total: float = LINGER_TOTAL) -> None:
        """Answered before the body was read: half-close, read and drop the rest of the body
        (never close with unread bytes: the kernel would reset the connection and the
        client could lose the answer), then close, within `total` seconds."""
        if self.transport is None or self.closed or self._lingering:
            return
        self._lingering = True
        self._holds.clear()
        self.transport.resume_reading()
        with contextlib.suppress(OSError, RuntimeError):
            if self.transport.can_write_eof():
                self.transport.write_eof()
        started = self._last_progress = perf_counter()

        def check() -> None:
            if self.closed:
                return
            now = perf_counter()
            if now - self._last_progress >= LINGER_SECONDS or now - started >= total:
                self._close()
            else:
                self.loop.call_later(1.0, check)

        self.loop.call_later(1.0, check)

    def _reject(self, reject: Reject) -> None:
        """Answer a request llmtap will not read, then drain and close the connection."""
        if self.transport is None or self.closed:
            return
        if self.exchange is not None:
            self.exchange.client_gone()
            self.exchange = None
        self._queue.clear()
        body = error_body(reject.path, reject.status, str(reject), reject.kind)
        self.transport.write(error_response(reject.status, body))
        self._parsing = None
        self._discarding = True
        self._linger(REJECT_LINGER)

    def _refuse_connection(self) -> None:
        """Over the connection cap: a 503 and the descriptor back at once. No lingering here:
        under a flood of connections, descriptors held for a clean close would run out."""
        assert self.transport is not None
        body = error_body("", 503, "llmtap is at its connection limit; retry later",
                          "overloaded")
        self.transport.write(error_response(503, body, retry_after=True))
        self.closed = True
        self.transport.abort()


def error_response(status: int, body: bytes, retry_after: bool = False) -> bytes:
    headers: Headers = [(b"Content-Type", b"application/json"),
                        (b"Content-Length", b"%d" % len(body)), (b"Connection", b"close")]
    if retry_after:
        headers.append((b"Retry-After", b"1"))
    return response_head(status, b"", headers) + body

