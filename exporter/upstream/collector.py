"""Prometheus view of the upstream: up, info, models (installed, loaded, VRAM, pins), queue.

Read from the monitor's last polls at scrape time; nothing here runs per request.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.state import LiveState
from exporter.upstream.monitor import UpstreamMonitor
from exporter.upstream.supervisor import PollSupervisor
from exporter.upstream.view import ServerQueue, UpstreamView

MODEL = ("gen_ai_request_model",)
QUEUE_COUNTERS = {
    "prompt_tokens": "Prompt tokens the server processed (its own count)",
    "prompt_tokens_cached": "Prompt tokens the server reused from its cache",
    "tokens_predicted": "Tokens the server generated (its own count)",
    "prompt_seconds": "Seconds the server spent processing prompts",
    "tokens_predicted_seconds": "Seconds the server spent generating tokens",
}


class UpstreamCollector(Collector):
    def __init__(self, monitor: UpstreamMonitor, pollers: PollSupervisor,
                 live: LiveState) -> None:
        self._monitor = monitor
        self._pollers = pollers
        self._live = live

    def collect(self) -> Iterator[Metric]:
        monitor = self._monitor
        view = monitor.view
        up = GaugeMetricFamily("llmtap_upstream_up",
                               "1 when the upstream answered its last health probe")
        up.add_metric([], 1.0 if monitor.up else 0.0)
        yield up
        info = GaugeMetricFamily("llmtap_upstream_info", "The upstream server llmtap fronts",
                                 labels=("kind", "version"))
        info.add_metric([monitor.kind or "unknown", monitor.version], 1.0)
        yield info
        yield from _poll_metrics(self._pollers)

        models = view.models
        if models is not None:
            model_info = GaugeMetricFamily(
                "llmtap_model_info", "A model the upstream has installed (its inventory)",
                labels=(*MODEL, "digest", "family", "parameter_size", "quantization"))
            for name, m in sorted(models.items()):
                model_info.add_metric([name, m.digest, m.family, m.parameter_size,
                                       m.quantization], 1.0)
            yield model_info

        loaded = view.loaded
        if loaded is not None:
            resident = GaugeMetricFamily("llmtap_model_loaded",
                                         "1 when the model is loaded in the server's memory",
                                         labels=MODEL)
            vram = GaugeMetricFamily("llmtap_model_vram_bytes",
                                     "GPU memory the loaded model occupies", labels=MODEL)
            sleeping = GaugeMetricFamily(
                "llmtap_model_sleeping", "1 when llama.cpp's router has put the model to "
                "sleep (--sleep-idle-seconds: its weights are freed)", labels=MODEL)
            for name in sorted(set(models or ()) | loaded.keys()):
                entry = loaded.get(name)
                resident.add_metric([name], 1.0 if entry is not None and entry.in_memory
                                    else 0.0)
                sleeping.add_metric([name], 1.0 if entry is not None and not entry.in_memory
                                    else 0.0)
                if entry is not None and entry.vram_bytes is not None:
                    vram.add_metric([name], float(entry.vram_bytes))
            yield resident
            yield vram
            if monitor.llamacpp_router:  # only its models sleep
                yield sleeping
            loads = CounterMetricFamily("llmtap_model_loads",
                                        "Models seen going from unloaded to loaded",
                                        labels=MODEL)
            unloads = CounterMetricFamily("llmtap_model_unloads",
                                          "Models seen going from loaded to unloaded",
                                          labels=MODEL)
            for name in sorted(set(view.loads) | set(view.unloads)):
                loads.add_metric([name], view.loads.get(name, 0))
                unloads.add_metric([name], view.unloads.get(name, 0))
            yield loads
            yield unloads

        if monitor.pins:
            mismatch = GaugeMetricFamily(
                "llmtap_model_digest_mismatch",
                "1 when a pinned model's installed digest differs from its pin (or it is not "
                "installed)", labels=MODEL)
            for name in sorted(monitor.pins):
                mismatch.add_metric([name], 1.0 if name in monitor.mismatched else 0.0)
            yield mismatch

        queue = view.queue
        if queue is not None:
            yield from _queue_metrics(queue)
        if view.model_queues is not None:
            yield from _model_queue_metrics(view.model_queues, self._live)
        yield from _scheduler_metrics(view, self._live)


def _model_queue_metrics(queues: dict[str, ServerQueue], live: LiveState) -> Iterator[Metric]:
    """Per model, inside the server (Ollama's runners): what runs, what waits, the cache."""
    total = GaugeMetricFamily("llmtap_model_slots_total",
                              "Request slots of the model's runner (its -np)", labels=MODEL)
    busy = GaugeMetricFamily("llmtap_model_slots_busy",
                             "Slots processing a request: what runs inside the server",
                             labels=MODEL)
    queued = GaugeMetricFamily(
        "llmtap_model_requests_queued",
        "Requests in flight through llmtap that have no slot yet: what waits inside the server",
        labels=MODEL)
    kv = GaugeMetricFamily("llmtap_model_kv_cache_usage_ratio",
                           "Share of the runner's context its busy slots hold (0-1)",
                           labels=MODEL)
    for name, q in sorted(queues.items()):
        if q.slots_total is not None:
            total.add_metric([name], q.slots_total)
        running = _running(q)
        if running is not None:
            busy.add_metric([name], running)
            queued.add_metric([name], max(q.deferred or 0,
                                          live.in_flight(name) - running))
        if q.kv_cache_usage_ratio is not None:
            kv.add_metric([name], q.kv_cache_usage_ratio)
    yield from (total, busy, queued, kv)


def _scheduler_metrics(view: UpstreamView, live: LiveState) -> Iterator[Metric]:
    """The three gauges the Kubernetes inference gateways' endpoint picker schedules by (the
    model-server protocol: vLLM's num_requests_waiting, num_requests_running and
    kv_cache_usage_perc), for servers that publish none: from the server's own figures where
    llmtap can read them, else from llmtap's counts (running: past the first token)."""
    running, kv = _server_running_and_kv(view)
    in_flight, waiting = live.totals()
    deferred = view.queue.deferred if view.queue is not None else None
    if running is None:
        running, queued = in_flight - waiting, float(waiting)
    else:
        queued = max(float(deferred or 0), in_flight - running)
    yield from _gauge("llmtap_server_requests_queued",
                      "Requests waiting for the server to start them (model-server protocol)",
                      queued)
    yield from _gauge("llmtap_server_requests_running",
                      "Requests the server is working on (model-server protocol)", running)
    yield from _gauge("llmtap_server_kv_cache_usage_ratio",
                      "KV-cache utilization 0-1, the fullest model's (model-server protocol)",
                      kv)


def _running(q: ServerQueue) -> float | None:
    """What the server is working on: its own count (llama.cpp's --metrics, vLLM) where it
    gives one, else the busy slots."""
    return q.processing if q.processing is not None else q.slots_busy


def _server_running_and_kv(view: UpstreamView) -> tuple[float | None, float | None]:
    queues = list(view.model_queues.values()) if view.model_queues else []
    if not queues and view.queue is not None:
        queues = [view.queue]
    known = [float(r) for q in queues if (r := _running(q)) is not None]
    kvs = [q.kv_cache_usage_ratio for q in queues if q.kv_cache_usage_ratio is not None]
    return (sum(known) if known else None), (max(kvs) if kvs else None)


def _poll_metrics(pollers: PollSupervisor) -> Iterator[Metric]:
    success = GaugeMetricFamily("llmtap_upstream_poll_success",
                                "1 when the source's last poll of the upstream worked",
                                labels=("source",))
    duration = GaugeMetricFamily("llmtap_upstream_poll_duration_seconds",
                                 "How long the source's last poll took", labels=("source",))
    for name, source in pollers.sources.items():
        if source.success is not None:
            success.add_metric([name], 1.0 if source.success else 0.0)
        if source.duration is not None:
            duration.add_metric([name], source.duration)
    yield success
    yield duration


def _gauge(name: str, doc: str, value: float | int | None) -> Iterator[GaugeMetricFamily]:
    if value is not None:
        family = GaugeMetricFamily(name, doc)
        family.add_metric([], float(value))
        yield family


def _queue_metrics(queue: ServerQueue) -> Iterator[Metric]:
    yield from _gauge("llmtap_upstream_requests_processing",
                      "Requests the server says it is processing", queue.processing)
    yield from _gauge("llmtap_upstream_requests_deferred",
                      "Requests the server says it has queued (deferred)", queue.deferred)
    yield from _gauge("llmtap_upstream_slots_total", "The server's request slots",
                      queue.slots_total)
    yield from _gauge("llmtap_upstream_slots_busy", "Slots processing a request",
                      queue.slots_busy)
    yield from _gauge("llmtap_upstream_kv_cache_usage_ratio",
                      "Share of the server's KV cache in use (0-1)", queue.kv_cache_usage_ratio)
    for key, value in sorted(queue.counters.items()):
        counter = CounterMetricFamily(f"llmtap_upstream_{key}",
                                      QUEUE_COUNTERS.get(key, "Server counter"))
        counter.add_metric([], value)
        yield counter
