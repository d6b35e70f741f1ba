"""Prometheus view of the upstream: up, info, models (installed, loaded, VRAM, pins), queue.

Read from the monitor's last polls at scrape time; nothing here runs per request.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.upstream.monitor import UpstreamMonitor
from exporter.upstream.view import ServerQueue

MODEL = ("gen_ai_request_model",)
QUEUE_COUNTERS = {
    "prompt_tokens": "Prompt tokens the server processed (its own count)",
    "prompt_tokens_cached": "Prompt tokens the server reused from its cache",
    "tokens_predicted": "Tokens the server generated (its own count)",
    "prompt_seconds": "Seconds the server spent processing prompts",
    "tokens_predicted_seconds": "Seconds the server spent generating tokens",
}


class UpstreamCollector(Collector):
    def __init__(self, monitor: UpstreamMonitor) -> None:
        self._monitor = monitor

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
            for name in sorted(set(models or ()) | loaded.keys()):
                resident.add_metric([name], 1.0 if name in loaded else 0.0)
                if name in loaded and loaded[name].vram_bytes is not None:
                    vram.add_metric([name], float(loaded[name].vram_bytes or 0))
            yield resident
            yield vram
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
