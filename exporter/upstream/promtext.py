"""Read a server's own Prometheus exposition (llama.cpp, vLLM) into llmtap's names.

llmtap is the only scraper of llama-server's /metrics (its `*_tokens_seconds` gauges reset on
every scrape), so what operators see of the server's queue comes through llmtap.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from exporter.upstream.view import ServerQueue

# server metric → (field of ServerQueue, or a counter name exported as llmtap_upstream_*)
LLAMACPP = {
    "llamacpp:requests_processing": "processing",
    "llamacpp:requests_deferred": "deferred",
    "llamacpp:kv_cache_usage_ratio": "kv_cache_usage_ratio",
    "llamacpp:prompt_tokens_total": "counter:prompt_tokens",
    "llamacpp:prompt_tokens_cached_total": "counter:prompt_tokens_cached",
    "llamacpp:tokens_predicted_total": "counter:tokens_predicted",
    "llamacpp:prompt_seconds_total": "counter:prompt_seconds",
    "llamacpp:tokens_predicted_seconds_total": "counter:tokens_predicted_seconds",
}
VLLM = {
    "vllm:num_requests_running": "processing",
    "vllm:num_requests_waiting": "deferred",
    "vllm:kv_cache_usage_perc": "kv_cache_usage_ratio",  # a ratio 0-1 despite its name
    "vllm:gpu_cache_usage_perc": "kv_cache_usage_ratio",  # its name before vLLM 0.10
    "vllm:prompt_tokens_total": "counter:prompt_tokens",
    "vllm:generation_tokens_total": "counter:tokens_predicted",
}


def parse(text: str, mapping: dict[str, str]) -> dict[str, float] | None:
    """Sum each mapped metric over its series (vLLM labels by model); None if none found."""
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                target = mapping.get(sample.name)
                if target is not None:
                    values[target] = values.get(target, 0.0) + sample.value
    except ValueError:
        return None
    return values or None


def to_queue(values: dict[str, float], slots: ServerQueue | None = None) -> ServerQueue:
    """The server's own figures, over what its slots showed (where it reports both)."""
    kv = values.get("kv_cache_usage_ratio")
    return ServerQueue(
        processing=values.get("processing", slots.processing if slots else None),
        deferred=values.get("deferred"),
        kv_cache_usage_ratio=kv if kv is not None else (
            slots.kv_cache_usage_ratio if slots else None),
        slots_total=slots.slots_total if slots else None,
        slots_busy=slots.slots_busy if slots else None,
        counters={k.removeprefix("counter:"): v for k, v in values.items()
                  if k.startswith("counter:")})
