"""llama-server's own state: /props (model, slots), /metrics (its queue), /slots (busy slots).

/slots also carries each slot's prompt and sampling parameters: llmtap only counts slots
that are processing and never keeps or re-exports anything else from it.
"""

from __future__ import annotations

from typing import Any

from exporter.upstream import promtext
from exporter.upstream.fetch import Fetcher
from exporter.upstream.view import LoadedModel, ModelInfo, ServerQueue


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
    models = {}
    for entry in doc["data"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        raw = entry.get("meta")
        meta = raw if isinstance(raw, dict) else {}
        models[entry["id"]] = ModelInfo(
            name=entry["id"], parameter_size=_parameter_size(meta.get("n_params")),
            quantization=quantization if isinstance(quantization, str) else "",
            size_bytes=meta.get("size") if isinstance(meta.get("size"), int) else None)
    return models


async def loaded(fetch: Fetcher) -> dict[str, LoadedModel] | None:
    return None  # llama-server holds its one model for its whole life: no loads to see


async def queue(fetch: Fetcher) -> ServerQueue | None:
    slots = await fetch.json("/slots")
    busy = total = None
    if isinstance(slots, list):
        total = len(slots)
        busy = sum(1 for slot in slots if isinstance(slot, dict) and slot.get("is_processing"))
    text = await fetch.text("/metrics")  # served only when llama-server runs with --metrics
    values = promtext.parse(text, promtext.LLAMACPP) if text else None
    if values is None and total is None:
        return None
    return promtext.to_queue(values or {}, total, busy)
