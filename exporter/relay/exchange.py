"""The Exchange: one request through the relay, in explicit phases.

    admit     at the head: API key, declared body length, request target (relay/admission.py)
    prepare   the body read (or streamed), the dialect's view of it, the model label,
              observers told it started, then the model checks (pin, waiting limit)
    open      the Upstream opens the request; a deadline covers its first byte
    pump      each body chunk of the answer: stamp, write to the client, then feed the
              dialect observer; nothing awaited per chunk (the upstream connection pushes)
    conclude  one outcome (relay/outcome.py), the final label, observers told it finished

The exchange owns its record, deadline, upstream response and response observer. It reacts
to what the observer's `feed` returns (the first token), never to the record's fields. Three
things can stop it from outside (the client leaving, a stalled client, a silent upstream):
each records why and cancels its task, and conclusion maps the cause to the outcome.
"""

from __future__ import annotations

import asyncio
import zlib
from time import perf_counter
from typing import TYPE_CHECKING

import orjson
import structlog

from exporter.auth import Admitted
from exporter.models import OTHER
from exporter.protocols import endpoint_for, parse_request_body
from exporter.protocols.errors import error_body
from exporter.protocols.observe import ResponseObserver
from exporter.record import Outcome, RequestRecord
from exporter.relay.admission import target_refusal
from exporter.relay.client import OutgoingRequest
from exporter.relay.deadline import Deadline
from exporter.relay.http1 import LAST_CHUNK, Headers, end_to_end, response_head
from exporter.relay.outcome import (
    ANSWERS,
    BROKEN_STREAM,
    Refusal,
    Refused,
    UpstreamConnectError,
    UpstreamResetError,
    outcome_of,
)

if TYPE_CHECKING:
    from exporter.events import RequestInfo
    from exporter.relay.connection import ClientConnection
    from exporter.relay.proxy import Proxy
    from exporter.relay.request import IncomingRequest
    from exporter.relay.upstream import UpstreamResponse

log = structlog.get_logger("llmtap.proxy")

# Bodies up to this size are read whole (they are JSON prompts): llmtap reads the model from
# them, and can send them again if a pooled connection turns out to be dead. Larger bodies
# stream through as they arrive.
REPLAYABLE_BODY_LIMIT = 1 << 20
INSPECT_LIMIT = 1 << 20  # most bytes a compressed body is inflated to, to read its model
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Request fields the relay writes itself (or the pool does, for its connection).
REWRITTEN = frozenset({b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
                       b"x-forwarded-host"})
UNTRUSTED = REWRITTEN | {b"forwarded"}  # from a peer not in --trusted-proxies


class Exchange:
    __slots__ = ("_answered", "_cause", "_chunked", "_close_after", "_complete", "_done",
                 "_head", "_last", "_no_body", "_started", "admitted", "conn",
                 "deadline", "endpoint", "info", "observer", "payload", "proxy", "record",
                 "request",
                 "response", "task")

    def __init__(self, proxy: Proxy, conn: ClientConnection, request: IncomingRequest) -> None:
        self.proxy = proxy
        self.conn = conn
        self.request = request
        self.record = RequestRecord(request.method, request.path, request.arrival)
        self.endpoint = endpoint_for(request.method, request.path)
        self.info: RequestInfo | None = None
        self.payload: bytes | None = None  # the whole request body, once read (None: streamed)
        self.admitted: Admitted | None = None
        self.task: asyncio.Task[None] | None = None
        self.response: UpstreamResponse | None = None
        self.deadline: Deadline | None = None
        self.observer: ResponseObserver | None = None
        self._cause: Outcome | Refusal | None = None  # why it was stopped from outside
        self._done: asyncio.Future[None] | None = None
        self._head = b""  # the response head, sent with the first body bytes
        self._chunked = False  # the client's answer is chunked by llmtap
        self._no_body = False  # HEAD: the answer has no body
        self._last = b""  # the last chunk relayed
        self._answered = False  # a response head went to the client
        self._complete = False  # ...and the whole response after it
        self._close_after = False  # the answer said Connection: close
        self._started = False  # observers were told it started

    # ------------------------------------------------------------------ admit

    def begin(self) -> None:
        """The request head is in: check what can be checked before reading anything."""
        request = self.request
        self.admitted, refusal = self.proxy.admission.key(request.fields, request.headers)
        if refusal is not None:  # no record, no task: a hash and an answer
            self._answer(refusal, recorded=False)
            if not request.body.complete:
                request.body.discard()
            self.conn.exchange_done(not self._close_after, request.body.complete)
            return
        if self.admitted is not None:
            self.record.key_name = self.admitted.name
        refusal = self.proxy.admission.body_length(request.body.length) or \
            target_refusal(request.target, request.path)
        if refusal is None and not request.body.complete and \
                request.fields.get(b"expect", b"").lower() == b"100-continue":
            self.conn.send(CONTINUE)
        request.body.on_too_large(self._body_too_large)
        self.task = self.conn.loop.create_task(self._run(refusal))

    async def _run(self, refusal: Refusal | None) -> None:
        try:
            if refusal is not None:
                self._prepare(None)
                self._answer(refusal)
            else:
                await self._relay()
        except BaseException as error:  # nothing raises out of an exchange
            self._failed(error)
        finally:
            self._conclude()

    async def _relay(self) -> None:
        body = await self._read_body()
        self._prepare(body)
        refusal = self.proxy.admission.model(self.record.live_label) if self.endpoint else None
        if refusal is not None:
            self._answer(refusal)
            return
        self.deadline = Deadline(self.proxy.sweeper, self.proxy.first_byte_timeout,
                                 self._upstream_silent)
        self.record.dispatched = perf_counter()
        response = self.response = await self.proxy.upstream.open(self)
        self._respond(response)
        await self._pump(response)

    # ------------------------------------------------------------------ prepare

    async def _read_body(self) -> bytes | None:
        body = self.request.body
        if not body.expected:
            return b"" if body.length is not None else None
        whole = await body.read(REPLAYABLE_BODY_LIMIT)
        if body.too_large:
            raise Refused(self.proxy.admission.too_large())
        self.payload = whole
        return whole

    def _prepare(self, body: bytes | None) -> None:
        """What the request asks for, in the dialect's terms; then it counts as started."""
        started = perf_counter()
        record, endpoint = self.record, self.endpoint
        if endpoint is not None:
            info = self.info = parse_request_body(endpoint, self._inspectable(body))
            record.request_info = info
            record.operation = endpoint.operation
            record.request_model = info.model
            record.provider = self.proxy.upstream.kind or endpoint.dialect
            label = record.live_label = self.proxy.labels.for_request(info.model)
            if label != OTHER:
                record.model_was_loaded = self.proxy.upstream.model_resident(label)
            record.waiting = True
        record.traceparent = self.request.fields.get(b"traceparent", b"")
        self._started = True
        self.proxy.observers.started(record)
        record.overhead += perf_counter() - started

    def _inspectable(self, body: bytes | None) -> bytes | None:
        """The body as JSON bytes to read the model from: a gzip or deflate body is inflated
        for reading (at most INSPECT_LIMIT bytes), and relayed as it came."""
        encoding = self.request.fields.get(b"content-encoding", b"").strip().lower()
        if not body or not encoding:
            return body
        wbits = {b"gzip": 31, b"x-gzip": 31, b"deflate": 15}.get(encoding)
        if wbits is None:
            return None
        try:
            return zlib.decompressobj(wbits).decompress(body, INSPECT_LIMIT)
        except zlib.error:
            return None

    def outgoing(self) -> OutgoingRequest:
        """The request as the upstream gets it."""
        request = self.request
        body = self.payload if self.payload is not None else (
            request.body if request.body.expected else
            (b"" if request.body.length is not None else None))
        return OutgoingRequest(request.method.encode(), request.target,
                               self.forwarded_headers(), body)

    def forwarded_headers(self) -> Headers:
        """The client's end-to-end headers, less any that carried a valid llmtap key, with
        X-Forwarded-* set from the connection (the client's own kept only from a trusted
        proxy) and the trace context llmtap's span gives."""
        request, record = self.request, self.record
        fields = request.fields
        trusted = self.proxy.trusts(request.peer)
        drop = REWRITTEN if trusted else UNTRUSTED
        if self.admitted is not None:
            drop = drop | self.admitted.headers
        incoming_trace = fields.get(b"traceparent", b"")
        if record.traceparent != incoming_trace:
            drop = drop | {b"traceparent"}
        headers = end_to_end(request.headers, drop)
        peer = request.peer.encode()
        prior = fields.get(b"x-forwarded-for") if trusted else None
        headers.append((b"X-Forwarded-For", prior + b", " + peer if prior else peer))
        headers.append((b"X-Forwarded-Proto",
                        fields.get(b"x-forwarded-proto", b"http") if trusted else b"http"))
        host = fields.get(b"host") or request.local.encode()
        headers.append((b"X-Forwarded-Host",
                        fields.get(b"x-forwarded-host", host) if trusted else host))
        if record.traceparent and record.traceparent != incoming_trace:
            headers.append((b"traceparent", record.traceparent))
        return headers

    # ------------------------------------------------------------------ pump

    def _respond(self, response: UpstreamResponse) -> None:
        """The upstream's head is in: make the client's, and the observer for the body."""
        now = perf_counter()
        record = self.record
        record.upstream_sent = now
        assert self.deadline is not None
        self.deadline.rearm(self.proxy.idle_timeout, now)
        status = record.status = response.status
        headers = end_to_end(response.headers)
        if status == 204:  # no body, so no length (RFC 9110 §8.6), whatever the upstream said
            headers = [pair for pair in headers if pair[0].lower() != b"content-length"]
        length = content_type = encoding = None
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                length = value
            elif lower == b"content-type":
                content_type = value
            elif lower == b"content-encoding":
                encoding = value
        request = self.request
        self._no_body = request.method == "HEAD" or status in (204, 304)
        if length is None and not self._no_body:
            if request.http11:
                self._chunked = True
                headers.append((b"Transfer-Encoding", b"chunked"))
            else:
                self._close_after = True  # HTTP/1.0: the body ends when the connection does
        if not request.keep_alive or not request.body.complete:
            self._close_after = True
        if self._close_after:
            headers.append((b"Connection", b"close"))
        if self.endpoint is not None and 200 <= status < 300 and encoding is None:
            self.observer = ResponseObserver(self.endpoint, record,
                                             (content_type or b"").decode("latin-1"))
        self._head = response_head(status, response.reason, headers)
        self._answered = True

    async def _pump(self, response: UpstreamResponse) -> None:
        self._done = self.conn.loop.create_future()
        response.start(self)
        if self._head:  # no body bytes came with the head: send it on its own
            self.conn.send(self._head)
            self._head = b""
        await self._done

    def body(self, data: bytes) -> None:
        """One chunk of the answer: the hot path."""
        now = perf_counter()
        if self._no_body:
            return
        out = b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data
        if self._head:
            out = self._head + out
            self._head = b""
        conn = self.conn
        if not conn.lost:  # stamped before the write: TTFT never later than the client's
            conn.transport.write(out)  # type: ignore[union-attr]
        self._last = data
        record = self.record
        if self.deadline is not None:
            self.deadline.touched = now
        if record.first_byte is None:
            record.first_byte = now
            if self.observer is None:  # not a token stream: the wait ends as the answer starts
                self._first_token()
        observer = self.observer
        if observer is not None:
            parsing = perf_counter()
            try:
                if observer.feed(data, now) and record.waiting:
                    self._first_token()
            except Exception:  # the observer must never break the relay
                record.unparseable += 1
                self.observer = None
            record.overhead += perf_counter() - parsing

    def end(self) -> None:
        out = self._head
        self._head = b""
        if self._chunked:
            out += LAST_CHUNK
        if out:
            self.conn.send(out)
        self.record.end = perf_counter()
        self._complete = True
        observer, self.observer = self.observer, None
        if observer is not None and observer.finish(True) and self.record.waiting:
            self._first_token()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def fail(self, error: BaseException) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(error)

    def _first_token(self) -> None:
        if self.record.waiting:
            self.record.waiting = False
            self.proxy.observers.first_token(self.record)

    # ------------------------------------------------------------------ stopped from outside

    def client_gone(self) -> None:
        self._stop(Outcome.CANCELLED)

    def client_stalled(self) -> None:
        self._stop(Outcome.CLIENT_TIMEOUT)

    def client_paused(self, paused: bool) -> None:
        """The client's socket is full (it reads slowly): stop reading the upstream."""
        if self.response is not None:
            if paused:
                self.response.pause()
            else:
                self.response.resume()

    def stop(self) -> None:
        self._stop(Outcome.CANCELLED)  # shutdown's grace is over

    def _upstream_silent(self) -> None:
        self._stop(Outcome.TIMEOUT)

    def _body_too_large(self) -> None:
        self._stop(self.proxy.admission.too_large())

    def _stop(self, cause: Outcome | Refusal) -> None:
        if self._cause is None and not self._complete:
            self._cause = cause
            if self.task is not None and not self.task.done():
                self.task.cancel()

    # ------------------------------------------------------------------ conclude

    def _failed(self, error: BaseException) -> None:
        """The one place a failure becomes an outcome and, where someone still listens, an
        answer in the client's dialect."""
        cause = self._cause
        if isinstance(error, Refused):
            cause = error.refusal
        if isinstance(cause, Refusal):
            self._answer(cause)
            return
        outcome = cause if isinstance(cause, Outcome) else outcome_of(error)
        self.record.outcome = outcome
        self._log_failure(outcome, error)
        if outcome in (Outcome.CANCELLED, Outcome.CLIENT_TIMEOUT):
            self.conn.abort()
        elif not self._answered:
            self._answer(ANSWERS[outcome], outcome)
        else:
            self._end_broken_stream(BROKEN_STREAM.get(outcome, BROKEN_STREAM[Outcome.INTERNAL]))

    def _log_failure(self, outcome: Outcome, error: BaseException) -> None:
        if outcome is Outcome.INTERNAL:
            log.error("relay failed", path=self.record.path, exc_info=error)
        elif isinstance(error, UpstreamConnectError | UpstreamResetError):
            log.warning("upstream failed", path=self.record.path, error=str(error),
                        outcome=outcome.value)
        elif outcome is Outcome.TIMEOUT:
            log.warning("upstream silent past its deadline", path=self.record.path,
                        answered=self._answered)

    def _answer(self, refusal: Refusal, outcome: Outcome | None = None,
                recorded: bool = True) -> None:
        """Answer with llmtap's own error, in the dialect of the path."""
        if self._answered:
            self.conn.abort()  # a head went out already: nothing else can be said
            return
        if recorded:
            self.record.status = refusal.status
            self.record.outcome = outcome or refusal.outcome
        payload = error_body(self.request.path, refusal.status, refusal.message, refusal.kind)
        headers: Headers = [(b"Content-Type", b"application/json"),
                            (b"Content-Length", b"%d" % len(payload))]
        if refusal.retry_after is not None:
            headers.append((b"Retry-After", b"%d" % refusal.retry_after))
        if refusal.status == 401:
            headers.append((b"WWW-Authenticate", b'Bearer realm="llmtap"'))
        if not self.request.keep_alive or not self.request.body.complete:
            self._close_after = True
            headers.append((b"Connection", b"close"))
        self.conn.send(response_head(refusal.status, b"", headers) + payload)
        self._answered = self._complete = True
        self.record.end = perf_counter()

    def _end_broken_stream(self, message: str) -> None:
        """End a stream the upstream broke off so the client's SDK reports an error: an
        Ollama NDJSON stream ends as Ollama ends one that fails, with a last
        `{"error": ...}` line (the ollama SDK raises it); anything else is cut without its
        terminator (no SSE `[DONE]`, no final chunk), which every HTTP client reports."""
        self._close_after = True
        ndjson = self.observer is not None and self.record.stream and \
            self.endpoint is not None and self.endpoint.dialect == "ollama"
        if not (ndjson and self._chunked):
            self.conn.abort()
            return
        line = orjson.dumps({"error": message}) + b"\n"
        if self._last and not self._last.endswith(b"\n"):
            line = b"\n" + line  # never glue the error onto a half-relayed line
        self.conn.send(self._head + b"%x\r\n%s\r\n" % (len(line), line) + LAST_CHUNK)
        self._head = b""

    def _conclude(self) -> None:
        started = perf_counter()
        record = self.record
        record.end = record.end or started
        if self.deadline is not None:
            self.deadline.disarm()
            self.deadline = None
        if self.response is not None and not self._complete:
            self.response.abandon()  # never return a half-read connection to the pool
        # Nothing refers back to this exchange once it is over: it is freed by reference
        # counting, not left for the garbage collector (which cost 12% of the CPU).
        self.response = None
        self.request.body.on_too_large(None)
        if self.observer is not None:
            self.observer.finish(False)
            self.observer = None
        if not self._started:  # stopped before the body was read: counted all the same
            self._prepare(None)
        if record.operation:
            record.model_label = self.proxy.labels.for_answer(
                record.request_model, record.response_model, record.succeeded)
        record.overhead += perf_counter() - started
        self.proxy.observers.finished(record)
        body = self.request.body
        if not body.complete:
            body.discard()  # answered early: the rest is drained, not kept
        self.conn.exchange_done(self._complete and not self._close_after, body.complete)
