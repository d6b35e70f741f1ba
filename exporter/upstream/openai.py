"""Other OpenAI-compatible servers: /v1/models, and vLLM's /metrics queue gauges if present."""

from __future__ import annotations

from exporter.upstream import promtext
from exporter.upstream.fetch import Fetcher
from exporter.upstream.view import ModelInfo, ServerQueue


async def inventory(fetch: Fetcher) -> dict[str, ModelInfo] | None:
    doc = await fetch.json("/v1/models")
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        return None
    return {entry["id"]: ModelInfo(name=entry["id"]) for entry in doc["data"]
            if isinstance(entry, dict) and isinstance(entry.get("id"), str)}


async def queue(fetch: Fetcher, previous: ServerQueue | None, idle: bool) -> ServerQueue | None:
    text = await fetch.text("/metrics")
    values = promtext.parse(text, promtext.VLLM) if text else None
    return promtext.to_queue(values) if values is not None else None
