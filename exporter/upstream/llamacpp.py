"""llama-server's own state: /props (model, slots), /metrics (its queue), /slots (busy slots).

/slots also carries each slot's prompt and sampling parameters: llmtap only counts slots
that are processing and the context they hold, and never keeps or re-exports anything else.
llama-server in single-model mode holds its one model for its whole life: no loaded source.
"""

from __future__ import annotations

from typing import Any

from exporter.upstream import promtext
from exporter.upstream.fetch import Fetcher
from exporter.upstream.view import ModelInfo, ServerQueue


def _parameter_size(n_params: Any) -> str:
    if not isinstance(n_params, int | float) or n_params <= 0:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n_params >= scale:
            return f"{n_params / scale:.2f}{unit}"
    return str(n_params)


async def inventory(fetch: Fetcher) -> dict[str, ModelInfo] | None:
    doc = await fetch.json("/v1/models")
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        return None
    props = await fetch.json("/props")
    quantization = props.get("model_ftype", "") if isinstance(props, dict) else ""
    return {entry["id"]: model_info(entry, quantization) for entry in doc["data"]
            if isinstance(entry, dict) and isinstance(entry.get("id"), str)}


def model_info(entry: dict[str, Any], quantization: Any = None) -> ModelInfo:
    """A /v1/models (or router /models) entry: its `meta` has the parameters and the size;
    the quantization comes from /props in single-model mode, else from `meta.ftype`."""
    raw = entry.get("meta")
    meta = raw if isinstance(raw, dict) else {}
    if quantization is None:
        quantization = meta.get("ftype")
    size = meta.get("size")
    return ModelInfo(name=entry["id"], parameter_size=_parameter_size(meta.get("n_params")),
                     quantization=quantization if isinstance(quantization, str) else "",
                     size_bytes=size if isinstance(size, int) else None)


def slot_figures(slots: list[Any]) -> ServerQueue:
    """Slots in all and busy, and the share of the context the busy ones hold: the KV-cache
    estimate (a busy slot holds its prompt plus what it has generated so far)."""
    total = busy = held = capacity = 0
    for slot in slots:
        if not isinstance(slot, dict):
            continue
        total += 1
        capacity += _count(slot.get("n_ctx"))
        if slot.get("is_processing"):
            busy += 1
            held += _count(slot.get("n_prompt_tokens")) + _decoded(slot.get("next_token"))
    kv = min(1.0, held / capacity) if capacity else None
    return ServerQueue(processing=busy, slots_total=total, slots_busy=busy,
                       kv_cache_usage_ratio=kv)


async def _total_slots(fetch: Fetcher) -> int | None:
    props = await fetch.json("/props")
    total = props.get("total_slots") if isinstance(props, dict) else None
    return total if isinstance(total, int) and not isinstance(total, bool) else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _decoded(next_token: Any) -> int:
    if isinstance(next_token, list) and next_token and isinstance(next_token[0], dict):
        return _count(next_token[0].get("n_decoded"))
    return 0


async def queue(fetch: Fetcher, previous: ServerQueue | None, idle: bool) -> ServerQueue | None:
    """The server's queue. /slots is asked only while llmtap has requests in flight: asking
    it is work for the server, which wakes one sleeping under --sleep-idle-seconds and keeps
    it from ever falling asleep (measured; /metrics, /props, /health do neither). Idle, the
    slots are idle too, unless clients bypass llmtap."""
    if idle:
        total = previous.slots_total if previous is not None else await _total_slots(fetch)
        figures = ServerQueue(processing=0, slots_total=total, slots_busy=0,
                              kv_cache_usage_ratio=0.0) if total is not None else None
    else:
        slots = await fetch.json("/slots")
        figures = slot_figures(slots) if isinstance(slots, list) else None
    text = await fetch.text("/metrics")  # served only when llama-server runs with --metrics
    values = promtext.parse(text, promtext.LLAMACPP) if text else None
    if values is None and figures is None:
        return None
    return promtext.to_queue(values or {}, figures)
