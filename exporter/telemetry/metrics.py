"""Prometheus observer: request histograms and counters, fed once per finished request.

Names follow the OpenTelemetry GenAI semantic conventions as they translate to Prometheus, so
the same series appear whether an operator scrapes llmtap or pushes through a Collector.
In-flight and waiting gauges are not updated per request: a custom collector reads the live
state when scraped (client_python's pattern for values that already live elsewhere).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.record import RequestRecord
from exporter.relay.observers import Observer
from exporter.state import LiveState
from exporter.telemetry.histogram import LoopHistogram, Series
from exporter.telemetry.semconv import BASE_LABELS, token_metrics

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5,
                5, 7.5, 10, 20, 40, 80, 160, 640)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1, 2.5)
DURATION_BUCKETS = tuple(round(0.01 * 2**i, 2) for i in range(17))  # 0.01 … 655.36
OVERHEAD_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                    0.005, 0.01, 0.025, 0.05, 0.1)


class LiveGaugeCollector(Collector):
    """llmtap_requests_in_flight / _waiting, read from the live state at scrape time."""

    def __init__(self, live: LiveState) -> None:
        self._live = live

    def collect(self) -> Iterator[GaugeMetricFamily]:
        in_flight = GaugeMetricFamily(
            "llmtap_requests_in_flight", "Requests relayed to the upstream and not yet ended",
            labels=BASE_LABELS)
        waiting = GaugeMetricFamily(
            "llmtap_requests_waiting",
            "Requests in flight that have not received a first token: the queue as clients "
            "feel it", labels=BASE_LABELS)
        for key, (flying, queued) in list(self._live.gauges.items()):
            in_flight.add_metric(key, flying)
            waiting.add_metric(key, queued)
        yield in_flight
        yield waiting


class _Series:
    """The histogram children of one label set, resolved once and reused."""

    __slots__ = ("answer", "duration", "load", "overhead", "queue_wait", "tokens", "tpot",
                 "ttft")

    def __init__(self, metrics: RequestMetrics, labels: tuple[str, str, str]) -> None:
        self.ttft = metrics.ttft.labels(*labels)
        self.answer = metrics.ttfa.labels(*labels)
        self.tpot = metrics.tpot.labels(*labels)
        self.tokens = metrics.tokens.series(labels)
        self.overhead = metrics.overhead.labels(*labels)
        self.queue_wait = metrics.queue_wait.labels(*labels)
        self.load = metrics.load.labels(*labels)
        self.duration: dict[str, Series] = {}


class RequestMetrics(Observer):
    def __init__(self, registry: CollectorRegistry, live: LiveState,
                 env: Mapping[str, str] = os.environ) -> None:
        # `_created` samples would double the series count and no dashboard reads them.
        disable_created_metrics()
        self.ttft = LoopHistogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from the request's arrival at llmtap to the first non-empty token relayed, "
            "reasoning included (non-streamed answers: to the answer relayed)",
            BASE_LABELS, buckets=TTFT_BUCKETS, registry=registry)
        # The conventions have no time to the first answer token; a reasoning model's users
        # wait for it, not for its first thinking token. Observed for every answer (equal to
        # TTFT without reasoning), so that its percentiles describe all requests alike.
        self.ttfa = LoopHistogram(
            "llmtap_time_to_first_answer_token_seconds",
            "Time from the request's arrival at llmtap to the first answer token relayed "
            "(after any reasoning: the same as TTFT for a model that did not reason)",
            BASE_LABELS, buckets=TTFT_BUCKETS, registry=registry)
        self.tpot = LoopHistogram(
            "gen_ai_server_time_per_output_token_seconds",
            "(last token - first token) / (output tokens - 1), streamed answers",
            BASE_LABELS, buckets=TPOT_BUCKETS, registry=registry)
        self.duration = LoopHistogram(
            "gen_ai_server_request_duration_seconds",
            "Time from the request's arrival to the end of its answer; error_type is empty on "
            "success", (*BASE_LABELS, "error_type"), buckets=DURATION_BUCKETS,
            registry=registry)
        # Token metrics differ between the conventions' versions (OTEL_SEMCONV_STABILITY_OPT_IN)
        self.tokens = token_metrics(registry, env)
        self.overhead = LoopHistogram(
            "llmtap_sidecar_overhead_seconds",
            "Time spent in llmtap's own code per request (request handling, frame parsing, "
            "telemetry)", BASE_LABELS, buckets=OVERHEAD_BUCKETS, registry=registry)
        self.queue_wait = LoopHistogram(
            "llmtap_queue_wait_seconds",
            "Time before the server began work on the request, where its timings tell "
            "(Ollama, model resident: total_duration - prompt and eval time; llama.cpp: TTFT - "
            "prompt time)",
            BASE_LABELS, buckets=TTFT_BUCKETS, registry=registry)
        self.load = LoopHistogram(
            "llmtap_model_load_duration_seconds",
            "Cold loads: the server's load time for requests that found their model not "
            "loaded", BASE_LABELS, buckets=TTFT_BUCKETS, registry=registry)
        self.passthrough = Counter(
            "llmtap_passthrough_requests",
            "Requests on paths llmtap relays without observing (model lists, UI, ...)",
            registry=registry)
        self.unparseable = Counter(
            "llmtap_unparseable_frames",
            "Response frames relayed unchanged that llmtap could not parse",
            registry=registry)
        self.retries = Counter(
            "llmtap_upstream_retries",
            "Requests re-sent on a fresh connection because a pooled keep-alive connection "
            "had been closed by the upstream before any response byte", registry=registry)
        build = Gauge("llmtap_build_info", "llmtap's version", ("version",), registry=registry)
        build.labels(__version__).set(1)
        registry.register(LiveGaugeCollector(live))
        self._series: dict[tuple[str, str, str], _Series] = {}

    def finished(self, record: RequestRecord) -> None:
        if record.unparseable:
            self.unparseable.inc(record.unparseable)
        if not record.operation:
            self.passthrough.inc()
            return
        labels = (record.provider, record.operation, record.model_label)
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series(self, labels)
        error_type = record.error_type
        duration = series.duration.get(error_type)
        if duration is None:
            duration = series.duration[error_type] = self.duration.labels(*labels, error_type)
        # The sampled span's ids ride along: OpenMetrics scrapes show them as exemplars.
        exemplar = {"trace_id": record.trace_id, "span_id": record.span_id} \
            if record.trace_id else None
        if record.duration is not None:
            duration.observe(record.duration, exemplar)
        series.overhead.observe(record.overhead)
        series.tokens.record(record, error_type)
        if not error_type:  # latency of failed requests would skew it
            self._succeeded(series, record, exemplar)

    @staticmethod
    def _succeeded(series: _Series, record: RequestRecord,
                   exemplar: dict[str, str] | None) -> None:
        if (ttft := record.ttft) is not None:
            series.ttft.observe(ttft, exemplar)
        if (answer := record.time_to_first_answer) is not None:
            series.answer.observe(answer, exemplar)
        if (tpot := record.tpot) is not None:
            series.tpot.observe(tpot)
        if (wait := record.queue_wait) is not None:
            series.queue_wait.observe(wait)
        if (load := record.cold_load) is not None:
            series.load.observe(load)
