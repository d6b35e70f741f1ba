"""A TCP fault proxy for reliability tests: put it between llmtap and its upstream.

    async with FaultProxy("127.0.0.1", sim.port) as proxy:
        tap = Llmtap(proxy.url, ...)
        proxy.faults = Faults(reset_after=800)   # every response from now on

It forwards bytes both ways unchanged, except on the response side where the current
`Faults` apply: latency per chunk, a bandwidth limit, a reset (RST) / stall / clean close
after N bytes of the response, and garbage injected into it. Faults are counted per response
(HTTP/1.1, no pipelining): a keep-alive connection llmtap reuses starts each answer at byte
0, and `choose(request_headers)` may pick faults per request from the headers llmtap forwarded.

The proxy runs its own event loop on a thread, so a test that blocks its loop (a urllib
scrape, say) neither stalls the relay nor skews the timestamps recorded here. Every
timestamp is `time.monotonic()`, comparable with the test's own and across processes.

Per upstream-side connection (`proxy.connections`), a `Conn` records when it opened, when
llmtap's side closed it (`downstream_closed`) and who closed first, every request head llmtap
sent on it and the response bytes the proxy wrote back (`Exchange.response`), so a test can
compare what llmtap relayed with what it was sent (`http_body` decodes the framing).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Conn", "Exchange", "FaultProxy", "Faults", "HttpFraming", "http_body"]


@dataclass(frozen=True)
class Faults:
    """What to do to each response. Byte positions count raw response bytes (head included)
    from the start of that response."""

    latency: float = 0.0  # seconds slept before forwarding each chunk read from the upstream
    bandwidth: float = 0.0  # bytes per second towards llmtap (0: unlimited)
    reset_after: int | None = None  # RST (SO_LINGER 0) once this many bytes went out
    stall_after: int | None = None  # stop forwarding (connection kept open) after N bytes
    truncate_after: int | None = None  # close cleanly (FIN) after N bytes
    garbage: bytes = b""  # injected once, at garbage_at
    garbage_at: int = 0
    # framed: inject the garbage as a chunk of its own at the first chunk boundary at or
    # after garbage_at, so the HTTP framing stays valid and the garbage is payload (only for
    # chunked responses). Unframed: the bytes go in raw, breaking the framing.
    garbage_framed: bool = True


NO_FAULTS = Faults()


@dataclass(eq=False)
class Exchange:
    """One request llmtap sent on a connection and the response the proxy sent back."""

    request: dict[str, str]  # lower-case header names, plus ":method" and ":path"
    response_start: int | None = None  # offset into Conn.sent
    response_end: int | None = None  # offset into Conn.sent (None: not complete)
    faults: Faults = NO_FAULTS
    fault: str = ""  # the fault that fired during this response: reset|stall|truncate|garbage
    fault_time: float | None = None
    _conn: Conn | None = field(default=None, repr=False)

    @property
    def response(self) -> bytes:
        """The raw response bytes the proxy wrote to llmtap (as far as they went)."""
        assert self._conn is not None
        if self.response_start is None:
            return b""
        end = self.response_end if self.response_end is not None else len(self._conn.sent)
        return bytes(self._conn.sent[self.response_start:end])

    @property
    def body(self) -> bytes:
        """The response body as llmtap's HTTP client decodes it (chunk framing removed)."""
        return http_body(self.response)


@dataclass(eq=False)
class Conn:
    id: int
    opened: float
    downstream_closed: float | None = None  # llmtap's side closed (EOF, RST, failed write)
    upstream_closed: float | None = None  # the upstream's side closed
    closed_by: str = ""  # "llmtap" | "upstream" | "proxy" (a fault) | "shutdown": who went first
    exchanges: list[Exchange] = field(default_factory=list)
    sent: bytearray = field(default_factory=bytearray)  # proxy → llmtap (when recording)
    sent_total: int = 0  # bytes written to llmtap, recorded or not
    received_total: int = 0  # bytes read from the upstream

    def tagged(self, name: str, value: str) -> Exchange | None:
        """The exchange whose request carried header `name: value` (the last one)."""
        name = name.lower()
        for ex in reversed(self.exchanges):
            if ex.request.get(name) == value:
                return ex
        return None


# ------------------------------------------------------------------------- HTTP/1.1 framing


class HttpFraming:
    """Follows HTTP/1.1 message framing in a byte stream, incrementally (sans-IO).

    `feed(data)` returns events as (offset in data, kind, headers): "message" where a new
    message's head begins, "head" where its head ends (with its headers), "chunk" where a
    chunk-size line begins (a place where a whole chunk can be inserted), "end" where the
    message ends. Requests without Content-Length or chunked coding have no body; responses
    without them run until the connection closes; 1xx, 204 and 304 responses have no body.
    """

    HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILER, CLOSE = range(7)

    def __init__(self, response: bool) -> None:
        self.response = response
        self.state = self.HEAD
        self.buf = bytearray()  # the head, a chunk-size line or trailer lines so far
        self.left = 0  # bytes of body / chunk data (or chunk CRLF) still to come
        self.in_message = False

    def feed(self, data: bytes) -> list[tuple[int, str, dict[str, str] | None]]:
        events: list[tuple[int, str, dict[str, str] | None]] = []
        i, n = 0, len(data)
        while i < n:
            if self.state == self.HEAD:
                if not self.in_message:
                    self.in_message = True
                    self.buf.clear()
                    events.append((i, "message", None))
                start = len(self.buf)
                self.buf += data[i:]
                end = self.buf.find(b"\r\n\r\n", max(0, start - 3))
                if end < 0:
                    return events
                consumed = end + 4 - start
                i += consumed
                headers = _parse_head(bytes(self.buf[:end]))
                self.buf.clear()
                events.append((i, "head", headers))
                self._after_head(headers, i, events)
            elif self.state == self.LENGTH:
                take = min(self.left, n - i)
                i += take
                self.left -= take
                if not self.left:
                    self._end(i, events)
            elif self.state == self.CHUNK_SIZE:
                if not self.buf:
                    events.append((i, "chunk", None))
                nl = data.find(b"\n", i)
                if nl < 0:
                    self.buf += data[i:]
                    return events
                self.buf += data[i:nl + 1]
                i = nl + 1
                line = bytes(self.buf).split(b";", 1)[0].strip()
                self.buf.clear()
                try:
                    size = int(line, 16)
                except ValueError:
                    self.state = self.CLOSE  # broken framing: nothing more to follow
                    continue
                if size == 0:
                    self.state = self.TRAILER
                else:
                    self.state, self.left = self.CHUNK_DATA, size
            elif self.state == self.CHUNK_DATA:
                take = min(self.left, n - i)
                i += take
                self.left -= take
                if not self.left:
                    self.state, self.left = self.CHUNK_CRLF, 2
            elif self.state == self.CHUNK_CRLF:
                take = min(self.left, n - i)
                i += take
                self.left -= take
                if not self.left:
                    self.state = self.CHUNK_SIZE
            elif self.state == self.TRAILER:
                nl = data.find(b"\n", i)
                if nl < 0:
                    self.buf += data[i:]
                    return events
                self.buf += data[i:nl + 1]
                i = nl + 1
                if bytes(self.buf).strip() == b"":
                    self._end(i, events)
                self.buf.clear()
            else:  # CLOSE: everything to the end of the connection is body
                return events
        return events

    def _after_head(self, headers: dict[str, str], at: int,
                    events: list[tuple[int, str, dict[str, str] | None]]) -> None:
        status = headers.get(":status", "")
        if self.response and (status.startswith("1") or status in ("204", "304")):
            self._end(at, events)
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = self.CHUNK_SIZE
        elif "content-length" in headers:
            self.left = int(headers["content-length"])
            self.state = self.LENGTH
            if not self.left:
                self._end(at, events)
        elif self.response:
            self.state = self.CLOSE
        else:
            self._end(at, events)

    def _end(self, at: int, events: list[tuple[int, str, dict[str, str] | None]]) -> None:
        self.state = self.HEAD
        self.in_message = False
        events.append((at, "end", None))


def _parse_head(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")
    first = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    if first[0].startswith("HTTP/"):
        headers[":status"] = first[1] if len(first) > 1 else ""
    else:
        headers[":method"] = first[0]
        headers[":path"] = first[1] if len(first) > 1 else ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return headers


def http_body(raw: bytes) -> bytes:
    """The body of one raw HTTP/1.1 response as a client decodes it, as far as it got: chunk
    framing removed, a partial chunk's data included, stopping where the framing breaks."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return b""
    headers = _parse_head(raw[:end])
    rest = raw[end + 4:]
    if "chunked" not in headers.get("transfer-encoding", "").lower():
        if "content-length" in headers:
            return rest[:int(headers["content-length"])]
        return rest
    out = bytearray()
    i = 0
    while i < len(rest):
        nl = rest.find(b"\n", i)
        if nl < 0:
            break
        try:
            size = int(rest[i:nl].split(b";", 1)[0].strip(), 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[nl + 1:nl + 1 + size]
        i = nl + 1 + size
        if rest[i:i + 2] not in (b"\r\n", b"\r", b""):
            break  # the framing broke here
        i += 2
    return bytes(out)


# ------------------------------------------------------------------------------ the proxy


class _Stop(Exception):
    """The response pump ends here: a fault closed or stalled the connection."""


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, record: bool = True,
                 faults: Faults = NO_FAULTS,
                 choose: Callable[[dict[str, str]], Faults | None] | None = None,
                 tag_header: str = "x-test-id") -> None:
        self.upstream = (upstream_host, upstream_port)
        # Requests carrying this header are indexed by its value (see `find`).
        self.tag_header = tag_header.lower()
        self.tagged: dict[str, tuple[Conn, Exchange]] = {}
        self.record = record  # keep the response bytes (off for long, fat streams)
        # Read at the start of every response: assign a new Faults at any time.
        self.faults = faults
        # Per-request faults: called with the request's headers; None falls back to .faults.
        self.choose = choose
        self.connections: list[Conn] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.Transport] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle (sync, and as an async context manager)

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        if self._error is not None:
            raise RuntimeError("the fault proxy did not start") from self._error
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(self._shutdown)
        if self._thread is not None:
            self._thread.join(10)

    async def __aenter__(self) -> FaultProxy:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, "127.0.0.1", 0, backlog=4096))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    def _shutdown(self) -> None:
        assert self._loop is not None and self._server is not None
        self._server.close()
        for transport in list(self._transports):
            transport.abort()
        self._loop.call_later(0.05, self._loop.stop)

    # -- queries (from the test's thread)

    def closed_connections(self) -> list[Conn]:
        return [c for c in self.connections if c.downstream_closed is not None]

    def open_connections(self) -> list[Conn]:
        return [c for c in self.connections if c.downstream_closed is None]

    def find(self, name: str, value: str) -> tuple[Conn, Exchange] | None:
        """The connection and exchange that carried request header `name: value`."""
        if name.lower() == self.tag_header:
            return self.tagged.get(value)
        for conn in reversed(self.connections):
            ex = conn.tagged(name, value)
            if ex is not None:
                return conn, ex
        return None

    def reset_records(self) -> None:
        """Forget closed connections (and their tags)."""
        self.connections = [c for c in self.connections if c.downstream_closed is None]
        self.tagged = {tag: (c, ex) for tag, (c, ex) in self.tagged.items()
                       if c.downstream_closed is None}

    # -- relay (on the proxy's thread)

    async def _accept(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        conn = Conn(id=len(self.connections), opened=time.monotonic())
        self.connections.append(conn)
        down_t = down_w.transport
        self._transports.add(down_t)  # type: ignore[arg-type]
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            conn.closed_by = "proxy"
            conn.downstream_closed = conn.upstream_closed = time.monotonic()
            down_t.abort()
            self._transports.discard(down_t)
            return
        up_t = up_w.transport
        self._transports.add(up_t)  # type: ignore[arg-type]
        pending: list[Exchange] = []  # requests whose response has not begun
        requests = asyncio.create_task(self._pump_requests(conn, down_r, up_w, pending))
        responses = asyncio.create_task(self._pump_responses(conn, up_r, down_w, pending))
        try:
            done, _ = await asyncio.wait({requests, responses},
                                         return_when=asyncio.FIRST_COMPLETED)
            if requests in done:
                # llmtap closed its side (or the proxy is shutting down): pass it on at once.
                responses.cancel()
            else:
                finished = responses.result()
                if finished == "stall":
                    await requests  # hold everything open until llmtap gives up
                else:
                    requests.cancel()
        except asyncio.CancelledError:
            conn.closed_by = conn.closed_by or "shutdown"
            requests.cancel()
            responses.cancel()
        finally:
            now = time.monotonic()
            if conn.downstream_closed is None:
                conn.downstream_closed = now
                conn.closed_by = conn.closed_by or "proxy"
            if conn.upstream_closed is None:
                conn.upstream_closed = now
            up_t.close()
            if not down_t.is_closing():
                down_t.close()
            self._transports.discard(up_t)
            self._transports.discard(down_t)

    async def _pump_requests(self, conn: Conn, down_r: asyncio.StreamReader,
                             up_w: asyncio.StreamWriter, pending: list[Exchange]) -> None:
        framing = HttpFraming(response=False)
        try:
            while data := await down_r.read(65536):
                for _, kind, headers in framing.feed(data):
                    if kind == "head" and headers is not None:
                        ex = Exchange(request=headers, _conn=conn)
                        conn.exchanges.append(ex)
                        pending.append(ex)
                        tag = headers.get(self.tag_header)
                        if tag is not None:
                            self.tagged[tag] = (conn, ex)
                up_w.write(data)
                await up_w.drain()
        except (ConnectionError, OSError):
            pass
        if conn.downstream_closed is None:
            conn.downstream_closed = time.monotonic()
            conn.closed_by = conn.closed_by or "llmtap"

    async def _pump_responses(self, conn: Conn, up_r: asyncio.StreamReader,
                              down_w: asyncio.StreamWriter, pending: list[Exchange]) -> str:
        state = _ResponseState(conn, pending, self)
        try:
            while True:
                data = await up_r.read(65536)
                if not data:
                    conn.upstream_closed = time.monotonic()
                    conn.closed_by = conn.closed_by or "upstream"
                    if state.exchange is not None and state.exchange.response_end is None:
                        state.exchange.response_end = len(conn.sent)
                    return "upstream"
                conn.received_total += len(data)
                await state.relay(data, down_w)
        except _Stop as stop:
            return str(stop)
        except (ConnectionError, OSError):
            if conn.downstream_closed is None:
                conn.downstream_closed = time.monotonic()
                conn.closed_by = conn.closed_by or "llmtap"
            return "llmtap"


class _ResponseState:
    """The response pump's position: which response, how far into it, which faults."""

    def __init__(self, conn: Conn, pending: list[Exchange], proxy: FaultProxy) -> None:
        self.conn = conn
        self.pending = pending
        self.proxy = proxy
        self.framing = HttpFraming(response=True)
        self.exchange: Exchange | None = None
        self.faults = NO_FAULTS
        self.start = 0  # conn.sent_total at the start of the current response
        self.chunked_boundary = False  # at the start of a chunk-size line
        self.garbage_done = False

    def _begin(self) -> None:
        ex = self.pending.pop(0) if self.pending else Exchange(request={}, _conn=self.conn)
        if ex not in self.conn.exchanges:
            self.conn.exchanges.append(ex)
        chosen = self.proxy.choose(ex.request) if self.proxy.choose is not None else None
        ex.faults = chosen if chosen is not None else self.proxy.faults
        ex.response_start = len(self.conn.sent) if self.proxy.record else self.conn.sent_total
        self.exchange = ex
        self.faults = ex.faults
        self.start = self.conn.sent_total
        self.garbage_done = not ex.faults.garbage

    async def relay(self, data: bytes, down_w: asyncio.StreamWriter) -> None:
        events = self.framing.feed(data)
        cuts = sorted({at for at, _, _ in events})
        ev = 0
        i = 0
        while True:
            # Events at this offset, in order.
            self.chunked_boundary = False
            while ev < len(events) and events[ev][0] == i:
                _, kind, _ = events[ev]
                if kind == "message":
                    self._begin()
                elif kind == "chunk":
                    self.chunked_boundary = True
                elif kind == "end" and self.exchange is not None:
                    self.exchange.response_end = (len(self.conn.sent) if self.proxy.record
                                                  else self.conn.sent_total)
                ev += 1
            if i == 0 and self.faults.latency and self.exchange is not None:
                await asyncio.sleep(self.faults.latency)
            await self._act(down_w)
            if i >= len(data):
                return
            # Write up to the next event or fault threshold.
            pos = self.conn.sent_total - self.start
            nxt = len(data)
            for at in cuts:
                if at > i:
                    nxt = min(nxt, at)
                    break
            f = self.faults
            for threshold in (f.reset_after, f.stall_after, f.truncate_after,
                              None if self.garbage_done else f.garbage_at):
                if threshold is not None and threshold > pos:
                    nxt = min(nxt, i + threshold - pos)
            await self._write(data[i:nxt], down_w)
            i = nxt

    async def _act(self, down_w: asyncio.StreamWriter) -> None:
        f = self.faults
        ex = self.exchange
        if ex is None:
            return
        pos = self.conn.sent_total - self.start
        if not self.garbage_done and pos >= f.garbage_at and (
                not f.garbage_framed or self.chunked_boundary
                or self.framing.state == HttpFraming.CLOSE):
            payload = f.garbage
            if f.garbage_framed and self.chunked_boundary:
                payload = f"{len(payload):x}\r\n".encode() + payload + b"\r\n"
            self.garbage_done = True
            ex.fault, ex.fault_time = "garbage", time.monotonic()
            # Not counted in the response position: thresholds stay where the upstream's
            # bytes put them.
            self.start += len(payload)
            await self._write(payload, down_w)
        if f.reset_after is not None and pos >= f.reset_after:
            await down_w.drain()
            await asyncio.sleep(0.05)  # let llmtap read what went out before the RST
            ex.fault, ex.fault_time = "reset", time.monotonic()
            sock = down_w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            down_w.transport.abort()
            self._closed_by_proxy()
            raise _Stop("reset")
        if f.truncate_after is not None and pos >= f.truncate_after:
            await down_w.drain()
            ex.fault, ex.fault_time = "truncate", time.monotonic()
            down_w.close()
            self._closed_by_proxy()
            raise _Stop("truncate")
        if f.stall_after is not None and pos >= f.stall_after:
            await down_w.drain()
            ex.fault, ex.fault_time = "stall", time.monotonic()
            raise _Stop("stall")

    def _closed_by_proxy(self) -> None:
        if self.conn.downstream_closed is None:
            self.conn.downstream_closed = time.monotonic()
            self.conn.closed_by = self.conn.closed_by or "proxy"
        if self.exchange is not None and self.exchange.response_end is None:
            self.exchange.response_end = len(self.conn.sent)

    async def _write(self, data: bytes, down_w: asyncio.StreamWriter) -> None:
        if not data:
            return
        bandwidth = self.faults.bandwidth if self.exchange is not None else 0.0
        step = max(1, int(bandwidth / 50)) if bandwidth else len(data)
        for k in range(0, len(data), step):
            piece = data[k:k + step]
            # Recorded *before* it is written, never after: write() sends at once and the
            # send() system call releases the GIL, so this thread can lose the CPU (or the
            # GIL) right after it while llmtap reads the bytes, relays them and the test
            # reads the recording. Recorded afterwards, a test could see fewer bytes than
            # llmtap had already received (a flaky `got == sent`). Recorded first, every
            # byte llmtap can have read is in `sent`, by construction.
            self.conn.sent_total += len(piece)
            if self.proxy.record:
                self.conn.sent += piece
            down_w.write(piece)
            await down_w.drain()
            if bandwidth:
                await asyncio.sleep(len(piece) / bandwidth)
