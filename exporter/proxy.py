"""The relay: forward each request to the upstream and stream its answer back, unchanged.

Per chunk the hot loop does three things: write the bytes to the client, take a timestamp,
feed the dialect observer. Bytes reach the client before any parsing, nothing is buffered
whole (every write is awaited, so a slow client slows the upstream read instead of growing
memory), and the observer can neither alter nor delay a chunk.

Timeouts fit LLM serving: a connect timeout, a long first-byte timeout (cold loads take
minutes), an idle timeout between chunks, no total limit. One timer per request enforces the
last two (re-armed only when it fires), so the per-chunk cost is a float store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from time import perf_counter
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry.trace import Span
from yarl import URL

from exporter import record as rec
from exporter.auth import ApiKeys
from exporter.models import OTHER, ModelLabels
from exporter.protocols import Endpoint, ResponseObserver, endpoint_for, parse_request_body
from exporter.protocols.errors import error_body
from exporter.record import RequestRecord
from exporter.state import GaugeKey, LiveState
from exporter.telemetry.tracing import Tracing
from exporter.upstream.monitor import UpstreamMonitor

log = structlog.get_logger("llmtap.proxy")

# RFC 9110 §7.6.1 hop-by-hop fields, plus the legacy ones proxies still meet. Expect is
# answered by llmtap's own server; forwarding it would make the upstream wait for a 100.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authorization", "proxy-authenticate", "expect",
})
# Headers aiohttp's client would add on its own; the upstream must see only the client's.
NO_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})
# Request bodies up to this size are read whole (they are JSON prompts): llmtap can then read
# the model from them and re-send them if a pooled connection turns out to be dead. Larger
# bodies stream through as they arrive.
REPLAYABLE_BODY_LIMIT = 1 << 20

Sink = Callable[[RequestRecord], None]
Body = bytes | AsyncIterable[bytes] | None
# Sends one request and returns the upstream's response head (the body still unread). The
# sidecar sends to its one upstream; the router (exporter/routing) picks a backend per
# request and may try several before any byte of an answer reaches the client.
Dispatch = Callable[[web.Request, RequestRecord, CIMultiDict[str], Body, bool],
                    Awaitable[aiohttp.ClientResponse]]


def _connection_named(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Fields the Connection header names are hop-by-hop too (RFC 9110 §7.6.1)."""
    values = headers.getall("Connection", ())
    return frozenset(token.strip().lower() for value in values for token in value.split(","))


def forward_request_headers(request: web.Request, strip: str = "") -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones (and `strip`: llmtap's own API key)."""
    drop = _connection_named(request.headers)
    if strip:
        drop |= {strip}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in drop or lower == "host" or lower.startswith(
                "x-forwarded-"):
            continue
        out.add(name, value)
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = request.headers.get("X-Forwarded-Proto", request.scheme)
    out["X-Forwarded-Host"] = request.headers.get("X-Forwarded-Host", request.host)
    return out


def forward_response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    drop = _connection_named(upstream.headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in drop:
            continue
        out.add(name, value)
    return out


class Deadline:
    """Cancels the request's task when the upstream is silent for too long.

    `touched` is written per chunk (a float store); the timer only re-arms itself when it
    fires early, so an active stream costs nothing here.
    """

    __slots__ = ("_handle", "_limit", "_loop", "_task", "expired", "touched")

    def __init__(self, limit: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._limit = limit
        self.expired = False
        self.touched = perf_counter()
        self._handle = self._loop.call_later(limit, self._check)

    def rearm(self, limit: float, now: float) -> None:
        self._limit = limit
        self.touched = now
        self._handle.cancel()
        self._handle = self._loop.call_later(limit, self._check)

    def _check(self) -> None:
        left = self.touched + self._limit - perf_counter()
        if left > 0:
            self._handle = self._loop.call_later(left, self._check)
            return
        self.expired = True
        if self._task is not None:
            self._task.cancel()

    def disarm(self) -> None:
        self._handle.cancel()


class UpstreamFailure(Exception):
    def __init__(self, error_type: str, status: int, message: str,
                 kind: str = "upstream_unavailable") -> None:
        super().__init__(message)
        self.error_type = error_type
        self.status = status
        self.kind = kind  # the error type the client's dialect names (errors.error_body)


class BodyTooLarge(Exception):
    """The request body passed --max-body-bytes."""


async def _read_body(request: web.Request, limit: int) -> tuple[Body, bool]:
    """The request body: whole bytes when small (replayable), else a stream of it.

    aiohttp's client_max_size covers only bodies read whole; a streamed body is counted as
    it passes, and the upstream request is abandoned the moment it goes over the limit.
    """
    if not request.body_exists:
        return None, True
    content = request.content
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    if length is not None and length > REPLAYABLE_BODY_LIMIT:
        return _StreamedBody(b"", content, limit), False
    buf = bytearray()
    while len(buf) <= REPLAYABLE_BODY_LIMIT:
        chunk = await content.readany()
        if not chunk:
            return bytes(buf), True
        buf += chunk
        if len(buf) > limit:
            raise BodyTooLarge
    return _StreamedBody(bytes(buf), content, limit), False


class _StreamedBody:
    """A request body relayed as it arrives, counted against the limit on the way.

    Going over the limit raises inside aiohttp's body writer, which reports it as a
    connection error; `too_large` tells the relay what really happened.
    """

    def __init__(self, prefix: bytes, content: aiohttp.StreamReader, limit: int) -> None:
        self._prefix = prefix
        self._content = content
        self._limit = limit
        self.too_large = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = len(self._prefix)
        if self._prefix:
            yield self._prefix
        async for chunk in self._content.iter_any():
            sent += len(chunk)
            if sent > self._limit:
                self.too_large = True
                raise BodyTooLarge
            yield chunk


class Relay:
    def __init__(self, upstream_url: str, monitor: UpstreamMonitor, labels: ModelLabels,
                 live: LiveState, sinks: list[Sink], *, connect_timeout: float = 5.0,
                 first_byte_timeout: float = 600.0, idle_timeout: float = 300.0,
                 on_retry: Callable[[], None] | None = None,
                 tracing: Tracing | None = None, keys: ApiKeys | None = None,
                 on_rejected: Callable[[], None] | None = None,
                 max_waiting_per_model: int = 0, max_body_bytes: int = 64 << 20,
                 dispatch: Dispatch | None = None) -> None:
        self._base = upstream_url.rstrip("/")
        self._dispatch: Dispatch = dispatch if dispatch is not None else self._to_upstream
        self._keys = keys
        self._on_rejected = on_rejected
        self._max_waiting = max_waiting_per_model
        self._max_body = max_body_bytes
        self._tracing = tracing
        parts = URL(self._base)
        self._upstream_host = parts.host or ""
        self._upstream_port = parts.port or 0
        self._monitor = monitor
        self._labels = labels
        self._live = live
        self._sinks = sinks
        self._connect_timeout = connect_timeout
        self._first_byte_timeout = first_byte_timeout
        self._idle_timeout = idle_timeout
        self._on_retry = on_retry
        self._session: aiohttp.ClientSession | None = None
        self._fresh_session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout)
        # No connection cap: queueing must happen at the upstream, where llmtap measures it.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            timeout=timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        # Retries go out on a connection that is new by construction.
        self._fresh_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        for session in (self._session, self._fresh_session):
            if session is not None:
                await session.close()

    async def _to_upstream(self, request: web.Request, record: RequestRecord,
                           headers: CIMultiDict[str], body: Body,
                           replayable: bool) -> aiohttp.ClientResponse:
        return await self.send(self._base + request.raw_path, request.method, headers, body,
                               replayable)

    async def send(self, url_text: str, method: str, headers: CIMultiDict[str], body: Body,
                   replayable: bool) -> aiohttp.ClientResponse:
        """Send one request to `url_text` (already encoded), retrying once on a fresh
        connection when a pooled one turns out dead before any response byte."""
        assert self._session is not None and self._fresh_session is not None
        url = URL(url_text, encoded=True)
        session = self._session
        for attempt in (0, 1):
            try:
                return await session.request(
                    method, url, headers=headers, data=body, allow_redirects=False,
                    skip_auto_headers=NO_AUTO_HEADERS)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                raise UpstreamFailure(rec.UPSTREAM_CONNECT, 502,
                                      f"cannot connect to the upstream: {exc}") from None
            except aiohttp.ClientConnectionError as exc:
                # A pooled keep-alive connection the upstream had closed (llama-server closes
                # them after each streamed answer): no response byte came back, so re-send
                # once on a fresh connection.
                if attempt or not replayable:
                    raise UpstreamFailure(rec.UPSTREAM_RESET, 502,
                                          f"the upstream closed the connection: {exc}") from None
                session = self._fresh_session
                if self._on_retry is not None:
                    self._on_retry()
        raise AssertionError("unreachable")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        arrival = perf_counter()
        admitted = None
        if self._keys is not None:
            # Before anything else: a rejected request costs a hash and never reaches the
            # upstream, nor any metric series or log line of its own.
            admitted = self._keys.check(request.headers)
            if admitted is None:
                if self._on_rejected is not None:
                    self._on_rejected()
                return web.Response(
                    status=401, content_type="application/json",
                    headers={"WWW-Authenticate": 'Bearer realm="llmtap"'},
                    body=error_body(request.path, 401, "a valid API key is required "
                                    "(Authorization: Bearer KEY or x-api-key: KEY)",
                                    "invalid_api_key"))
        record = RequestRecord(request.method, request.path, arrival)
        if admitted is not None:
            record.key_name = admitted.name
        endpoint = endpoint_for(request.method, request.path)
        key: GaugeKey | None = None
        span: Span | None = None
        log_context: dict[str, Any] = {}
        waiting = False
        deadline: Deadline | None = None
        upstream: aiohttp.ClientResponse | None = None
        response: web.StreamResponse | None = None
        chunk = b""  # the last chunk relayed
        try:
            body, replayable = await _read_body(request, self._max_body)
            started = perf_counter()
            label = OTHER
            if endpoint is not None:
                info = parse_request_body(endpoint, body if replayable else None)  # type: ignore[arg-type]
                record.request_info = info
                record.operation = endpoint.operation
                record.request_model = info.model
                record.provider = self._monitor.kind or endpoint.dialect
                label = self._labels.for_request(info.model)
                if label == OTHER and info.model:
                    self._monitor.inventory_stale()
                key = (record.provider, record.operation, label)
                self._live.started(key)
                waiting = True
            if self._tracing is not None:
                span = self._start_span(record, request)
                if record.trace_id:  # every log line of this request carries its trace
                    log_context = structlog.contextvars.bind_contextvars(
                        trace_id=record.trace_id, span_id=record.span_id)
            if key is not None:
                if (refusal := self._monitor.refuses(label)) is not None:
                    record.error_type = "409"
                    return await self._fail(request, record, 409, refusal, "model_pin_mismatch")
                if self._max_waiting and self._live.models[label].waiting > self._max_waiting:
                    record.error_type = rec.QUEUE_FULL
                    return await self._fail(
                        request, record, 503,
                        f"{self._live.models[label].waiting - 1} requests for this model are "
                        "already waiting at llmtap (--max-waiting-per-model); retry later",
                        "queue_full", retry_after=1)
                if label != OTHER:
                    record.model_was_loaded = self._monitor.view.model_was_loaded(label)
            headers = forward_request_headers(request,
                                              admitted.header if admitted is not None else "")
            if span is not None:
                Tracing.inject(span, headers)
            record.dispatched = perf_counter()
            record.overhead += record.dispatched - started

            deadline = Deadline(self._first_byte_timeout)
            upstream = await self._dispatch(request, record, headers, body, replayable)
            now = record.upstream_sent = perf_counter()
            deadline.rearm(self._idle_timeout, now)
            status = record.status = upstream.status
            if status >= 400:
                record.error_type = str(status)
            response = web.StreamResponse(status=status, reason=upstream.reason,
                                          headers=forward_response_headers(upstream))
            await response.prepare(request)

            observer = None
            if endpoint is not None and 200 <= status < 300 and "Content-Encoding" not in \
                    upstream.headers:
                observer = ResponseObserver(endpoint, record,
                                            upstream.headers.get("Content-Type", ""))
            read = upstream.content.readany
            write = response.write
            while chunk := await read():
                # Stamped before the write: the client cannot have the chunk any earlier, so
                # llmtap's TTFT is never later than what the client measures.
                now = perf_counter()
                await write(chunk)
                deadline.touched = now
                if record.first_byte is None:
                    record.first_byte = now
                if observer is not None:
                    parse_start = perf_counter()
                    try:
                        observer.feed(chunk, now)
                    except Exception:  # the observer must never break the relay
                        record.unparseable += 1
                        observer = None
                    if waiting and record.first_token is not None:
                        self._live.first_token(key)  # type: ignore[arg-type]
                        waiting = False
                    record.overhead += perf_counter() - parse_start
                elif waiting:
                    # Not a token stream (an error answer, an embedding): the wait is over
                    # once the answer starts arriving.
                    self._live.first_token(key)  # type: ignore[arg-type]
                    waiting = False
            if observer is not None:
                observer.close(now)
            upstream.release()
            await response.write_eof()
            return response
        except BodyTooLarge:
            if endpoint is not None and key is None:
                # Refused before the body was parsed: counted all the same, as model "other".
                record.operation = endpoint.operation
                record.provider = self._monitor.kind or endpoint.dialect
                key = (record.provider, record.operation, OTHER)
                self._live.started(key)
                waiting = True
            return await self._too_large(request, record)
        except UpstreamFailure as failure:
            if isinstance(body, _StreamedBody) and body.too_large:
                return await self._too_large(request, record)
            record.error_type = failure.error_type
            return await self._fail(request, record, failure.status, str(failure),
                                    failure.kind)
        except asyncio.CancelledError:
            if deadline is None or not deadline.expired:
                record.error_type = rec.CANCELLED  # the client went away (or shutdown)
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            record.error_type = rec.TIMEOUT
            if response is None:
                return await self._fail(request, record, 504,
                                        "the upstream did not answer in time", "timeout")
            return await _end_broken_stream(request, response, endpoint, chunk,
                                            "the upstream went silent (llmtap idle timeout)")
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError included
            # Writing to a client that disconnected. Returning the (prepared) response lets
            # aiohttp finish quietly; raising would log a traceback per departed client.
            record.error_type = rec.CANCELLED
            return response if response is not None else web.Response(status=499)
        except aiohttp.ClientError as exc:
            # The upstream broke off mid-answer: end the client's stream without the
            # final chunk, so its SDK reports a truncated answer instead of a complete one.
            record.error_type = rec.UPSTREAM_RESET
            log.warning("upstream broke off the answer", path=record.path, error=str(exc))
            if response is None:
                return await self._fail(request, record, 502, "the upstream failed",
                                        "upstream_unavailable")
            return await _end_broken_stream(request, response, endpoint, chunk,
                                            "the upstream broke off the answer")
        finally:
            if deadline is not None:
                deadline.disarm()
            if upstream is not None and not upstream.closed and record.error_type:
                upstream.close()  # never return a half-read connection to the pool
            self._finish(record, key, waiting, span)
            if record.trace_id:
                structlog.contextvars.reset_contextvars(**log_context)

    async def _too_large(self, request: web.Request, record: RequestRecord) -> web.Response:
        record.error_type = "413"
        response = await self._fail(
            request, record, 413, f"the request body is larger than {self._max_body} bytes "
            "(llmtap --max-body-bytes)", "request_too_large")
        # No force_close: with unread request bytes the kernel would reset the connection
        # and the client could lose this answer. aiohttp's lingering close drains the rest
        # of the body (for at most its lingering time) and then closes.
        return response

    async def _fail(self, request: web.Request, record: RequestRecord, status: int,
                    message: str, kind: str, retry_after: int | None = None) -> web.Response:
        record.status = status
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return web.Response(status=status, body=error_body(record.path, status, message, kind),
                            content_type="application/json", headers=headers)

    def _start_span(self, record: RequestRecord, request: web.Request) -> Span:
        assert self._tracing is not None
        # Spans take wall-clock times; the record keeps perf_counter ones.
        arrival_ns = time.time_ns() - int((perf_counter() - record.arrival) * 1e9)
        return self._tracing.start(record, request.headers, self._upstream_host,
                                   self._upstream_port, arrival_ns)

    def _finish(self, record: RequestRecord, key: GaugeKey | None, waiting: bool,
                span: Span | None = None) -> None:
        started = perf_counter()
        record.end = record.end or started
        if key is not None:
            success = not record.error_type and 200 <= record.status < 300
            record.model_label = self._labels.for_answer(
                record.request_model, record.response_model, success)
            self._monitor.view.note_finished(key[2], record.model_was_loaded, success)
            self._live.finished(key, waiting, record)
        if span is not None:
            Tracing.finish(span, record, time.time_ns() - int((perf_counter() - record.end) * 1e9))
        record.overhead += perf_counter() - started
        for sink in self._sinks:
            try:
                sink(record)
            except Exception:  # telemetry must never break the request path
                log.exception("telemetry sink failed", sink=getattr(sink, "__qualname__", ""))


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _end_broken_stream(request: web.Request, response: web.StreamResponse,
                             endpoint: Endpoint | None, last_chunk: bytes,
                             message: str) -> web.StreamResponse:
    """End a stream the upstream broke off, so the client's SDK reports an error.

    An Ollama NDJSON stream ends as Ollama ends one that fails: a last `{"error": ...}` line
    (the ollama SDK raises it). Anything else is cut without its terminator (no SSE
    `[DONE]`, no final chunk), which every HTTP client reports as a truncated answer.
    """
    ndjson = response.headers.get("Content-Type", "").startswith("application/x-ndjson")
    if endpoint is not None and endpoint.dialect == "ollama" and ndjson:
        line = orjson.dumps({"error": message}) + b"\n"
        if last_chunk and not last_chunk.endswith(b"\n"):
            line = b"\n" + line  # never glue the error onto a half-relayed line
        try:
            await response.write(line)
            await response.write_eof()
            return response
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
    _abort(request)
    return response
