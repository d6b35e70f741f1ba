"""OTLP traces: one span per request, per the OpenTelemetry GenAI semantic conventions.

Configured only by the standard OTEL_* variables (endpoint, protocol http/protobuf or grpc,
headers, timeout, service name, resource attributes, sampler — parent-based by default). No
endpoint means no tracer at all: the relay checks one attribute and moves on.

Spans leave through the SDK's BatchSpanProcessor: ended spans go into a bounded queue and a
worker thread exports them, so a slow or dead collector costs the request path nothing but
an append. Spans that cannot be delivered (queue full, export failed) are counted in
`llmtap_spans_dropped_total` and logged at most once a minute. Prompt and completion text are
never put on spans.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter

from exporter import __version__
from exporter.events import CHAT, TEXT_COMPLETION
from exporter.record import RequestRecord
from exporter.relay.observers import Observer
from exporter.telemetry.semconv import latest_experimental

log = structlog.get_logger("llmtap.tracing")

SHUTDOWN_SECONDS = 1.5  # with the rest of shutdown, llmtap stops within 2 s of SIGTERM
DROP_LOG_INTERVAL = 60.0
PROPAGATOR = TraceContextTextMapPropagator()
# Client input on spans is bounded: the model name as the access log has it, the path a bit
# longer. The span name uses the bounded model label, never the name the client sent.
MAX_ATTRIBUTE = 128
MAX_PATH_ATTRIBUTE = 256
GENERATIONS = (CHAT, TEXT_COMPLETION)  # operations whose answers end with a finish reason
# Server-reported phases, as span attributes (seconds or the server's own unit).
PHASE_ATTRIBUTES = {
    "load_duration": "llmtap.upstream.load_duration",
    "prompt_eval_duration": "llmtap.upstream.prompt_eval_duration",
    "eval_duration": "llmtap.upstream.eval_duration",
    "total_duration": "llmtap.upstream.total_duration",
    "prompt_ms": "llmtap.upstream.prompt_ms",
    "predicted_ms": "llmtap.upstream.predicted_ms",
    "prompt_n": "llmtap.upstream.prompt_n",
    "predicted_n": "llmtap.upstream.predicted_n",
}


def tracing_configured(env: Mapping[str, str] = os.environ) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _protocol(env: Mapping[str, str]) -> str:
    return (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").lower()


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    protocol = _protocol(env)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )
        return HTTPSpanExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: llmtap supports "
                     "http/protobuf and grpc")


def _resource(env: Mapping[str, str]) -> Resource:
    defaults: dict[str, Any] = {"service.version": __version__}
    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", "")
    if not named:
        defaults["service.name"] = "llmtap"
    # Resource.create merges in OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; the service
    # name is ours only when the operator named none.
    return Resource.create(defaults)


class DropCounter:
    """Counts spans that never reach the collector; logs at most once a minute."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._lock = threading.Lock()
        self._unlogged = 0
        self._logged_at = -DROP_LOG_INTERVAL

    def add(self, count: int, reason: str) -> None:
        if count <= 0:
            return
        self._counter.inc(count)
        with self._lock:
            self._unlogged += count
            now = time.monotonic()
            if now - self._logged_at < DROP_LOG_INTERVAL:
                return
            dropped, self._unlogged, self._logged_at = self._unlogged, 0, now
        log.warning("spans dropped", count=dropped, reason=reason,
                    note="the collector is slow or unreachable; logged at most once a minute")


class CountingExporter(SpanExporter):
    """The OTLP exporter, counting the spans of every batch it failed to deliver."""

    def __init__(self, inner: SpanExporter, drops: DropCounter) -> None:
        self._inner = inner
        self._drops = drops

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:  # an exporter bug must not kill the export thread
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._drops.add(len(spans), "export failed")
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class CountingBatchProcessor(BatchSpanProcessor):
    """BatchSpanProcessor that counts the spans its full queue pushes out.

    The SDK drops the oldest span silently when its queue is full; the queue length is read
    through the processor's internals, and if a future SDK moves them, only the queue-full
    part of the count is lost (failed exports are still counted by CountingExporter).
    """

    def __init__(self, exporter: SpanExporter, drops: DropCounter) -> None:
        super().__init__(exporter)
        self._drops = drops
        inner = getattr(self, "_batch_processor", None)
        self._queue = getattr(inner, "_queue", None)
        self._max_queue = getattr(inner, "_max_queue_size", None)

    def on_end(self, span: ReadableSpan) -> None:
        queue = self._queue
        if queue is not None and self._max_queue is not None and len(queue) >= self._max_queue:
            self._drops.add(1, "queue full")
        super().on_end(span)


class PresetIds(IdGenerator):
    """The ids of a request's span are picked when the request starts (its traceparent goes
    upstream then) and handed to the SDK when the span is made, once the request is over:
    making it first cost 25 µs on the way to the upstream, in every request's TTFT."""

    def __init__(self) -> None:
        self.random = RandomIdGenerator()
        self._trace_id = 0
        self._span_id = 0

    def preset(self, trace_id: int, span_id: int) -> None:
        self._trace_id, self._span_id = trace_id, span_id

    def generate_trace_id(self) -> int:
        trace_id, self._trace_id = self._trace_id, 0
        return trace_id or self.random.generate_trace_id()

    def generate_span_id(self) -> int:
        span_id, self._span_id = self._span_id, 0
        return span_id or self.random.generate_span_id()


@dataclass(slots=True)
class PendingSpan:
    """What the span will be made from when the request ends."""

    parent: Context
    trace_id: int
    span_id: int
    name: str
    start_ns: int
    recording: bool


class Tracing:
    def __init__(self, registry: CollectorRegistry,
                 env: Mapping[str, str] = os.environ,
                 exporter: SpanExporter | None = None) -> None:
        # The SDK logs every failed batch and retry in plain text; llmtap counts undelivered
        # spans itself and logs them at most once a minute, so quiet the SDK's own lines.
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
        self.dropped = Counter("llmtap_spans_dropped",
                               "Spans that could not be delivered to the OTLP collector "
                               "(export queue full or export failed)", registry=registry)
        drops = DropCounter(self.dropped)
        self.ids = PresetIds()
        self.provider = TracerProvider(resource=_resource(env), shutdown_on_exit=False,
                                       id_generator=self.ids)
        self.provider.add_span_processor(
            CountingBatchProcessor(CountingExporter(exporter or _otlp_exporter(env), drops),
                                   drops))
        self.tracer = self.provider.get_tracer("llmtap", __version__)
        self.latest = latest_experimental(env)  # OTEL_SEMCONV_STABILITY_OPT_IN

    def start(self, record: RequestRecord, arrival_ns: int) -> PendingSpan:
        """The request's span, child of the client's traceparent (in `record.traceparent`),
        decided now: its ids, whether it is sampled, and the traceparent the upstream request
        carries (left in `record.traceparent`). The SDK span is made by `finish`."""
        parent = PROPAGATOR.extract({"traceparent": record.traceparent.decode("latin-1")}) \
            if record.traceparent else Context()
        parent_context = trace.get_current_span(parent).get_span_context()
        trace_id = parent_context.trace_id if parent_context.is_valid else \
            self.ids.random.generate_trace_id()
        span_id = self.ids.random.generate_span_id()
        name = record.operation or record.method
        if record.operation and record.live_label:
            name = f"{record.operation} {record.live_label}"
        decision = self.provider.sampler.should_sample(parent, trace_id, name,
                                                      SpanKind.CLIENT).decision
        sampled = decision.is_sampled()
        if sampled:
            record.trace_id = format(trace_id, "032x")
            record.span_id = format(span_id, "016x")
        record.traceparent = b"00-%032x-%016x-%s" % (trace_id, span_id,
                                                     b"01" if sampled else b"00")
        return PendingSpan(parent, trace_id, span_id, name, arrival_ns,
                           decision.is_recording())

    def finish(self, pending: PendingSpan, record: RequestRecord, end_ns: int,
               server: dict[str, Any]) -> None:
        if not pending.recording:
            return
        self.ids.preset(pending.trace_id, pending.span_id)
        span = self.tracer.start_span(pending.name, context=pending.parent,
                                      kind=SpanKind.CLIENT, start_time=pending.start_ns)
        if span.is_recording():
            span.set_attributes({**server, "http.request.method": record.method,
                                 "url.path": record.path[:MAX_PATH_ATTRIBUTE],
                                 **span_attributes(record, self.latest)})
            if record.error_type:
                span.set_status(Status(StatusCode.ERROR, record.error_type))
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        """Flush what is queued, giving up after SHUTDOWN_SECONDS (a dead collector must not
        hold a stopping sidecar)."""
        done = threading.Thread(target=self.provider.shutdown, daemon=True,
                                name="otel-shutdown")
        done.start()
        done.join(SHUTDOWN_SECONDS)


def _cut(text: str) -> str:
    return text[:MAX_ATTRIBUTE]


def span_attributes(record: RequestRecord, latest: bool = False) -> dict[str, Any]:
    """The span's attributes when the request ends: GenAI conventions (v1.41, or the
    semantic-conventions-genai repository's with `latest`), then llmtap's own. Absent facts
    are left out (None is not a valid attribute value)."""
    attributes: dict[str, Any] = {"http.response.status_code": record.status}
    if record.operation:
        attributes.update(_present(_genai(record)))
        attributes.update(_present(_measured(record)))
        if latest and record.error_type and not record.finish_reasons and \
                record.operation in GENERATIONS:
            # client-inference.md (genai main): a finish reason that was expected and never
            # came (failed, cancelled, cut short) is reported as "error". v1.41 says nothing.
            attributes["gen_ai.response.finish_reasons"] = ["error"]
    if record.error_type:
        attributes["error.type"] = record.error_type
    return attributes


def _present(values: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value not in (None, "", [])}


def _genai(record: RequestRecord) -> dict[str, Any]:
    info = record.request_info
    return {
        "gen_ai.operation.name": record.operation,
        "gen_ai.provider.name": record.provider,
        "gen_ai.request.model": _cut(record.request_model),
        "gen_ai.request.stream": record.stream,
        "gen_ai.request.max_tokens": info.max_tokens if info is not None else None,
        "gen_ai.request.temperature": info.temperature if info is not None else None,
        "gen_ai.response.model": _cut(record.response_model),
        "gen_ai.response.id": _cut(record.response_id),
        "gen_ai.response.finish_reasons": [_cut(r) for r in record.finish_reasons[:16]],
        "gen_ai.usage.input_tokens": record.input_tokens,
        "gen_ai.usage.cache_read.input_tokens": record.cached_input_tokens,
        "gen_ai.usage.output_tokens": record.output_token_count,
        "gen_ai.usage.reasoning.output_tokens": record.reasoning_output_tokens,
        # "Recommended if the request was a streaming request" (v1.41 and genai main): the
        # first chunk with generated content, reasoning included, as the TTFT histogram.
        "gen_ai.response.time_to_first_chunk": record.ttft if record.stream else None,
    }


def _measured(record: RequestRecord) -> dict[str, Any]:
    measured: dict[str, Any] = {"llmtap.queue_wait": record.queue_wait,
                                "llmtap.cold_load": record.cold_load,
                                "llmtap.time_to_first_answer_token": record.time_to_first_answer,
                                "llmtap.time_to_first_reasoning_token":
                                    record.time_to_first_reasoning}
    if record.reasoning_counted:  # the reasoning count is llmtap's (frames), not the server's
        measured["llmtap.usage.reasoning.counted"] = True
    for key, value in record.server_timings.items():
        if (name := PHASE_ATTRIBUTES.get(key)) is not None:
            measured[name] = value
    return measured


class TracingObserver(Observer):
    """One span per request: decided as the request starts (its context goes upstream), made
    with its facts when it finishes."""

    def __init__(self, tracing: Tracing, upstream_host: str = "", upstream_port: int = 0) -> None:
        self.tracing = tracing
        self.server = {"server.address": upstream_host, "server.port": upstream_port}

    def started(self, record: RequestRecord) -> None:
        # Spans take wall-clock times; the record keeps perf_counter ones.
        arrival_ns = time.time_ns() - int((time.perf_counter() - record.arrival) * 1e9)
        record.span = self.tracing.start(record, arrival_ns)
        if record.trace_id:  # every log line of this request carries its trace
            structlog.contextvars.bind_contextvars(trace_id=record.trace_id,
                                                   span_id=record.span_id)

    def finished(self, record: RequestRecord) -> None:
        pending, record.span = record.span, None
        if isinstance(pending, PendingSpan):
            end = record.end if record.end is not None else time.perf_counter()
            self.tracing.finish(pending, record,
                                time.time_ns() - int((time.perf_counter() - end) * 1e9),
                                self.server)
