"""Ollama's own state: /api/tags (installed models, digests) and /api/ps (loaded models).

Ollama has no queue of its own to read (no `queue` here): llmtap_requests_waiting is the queue
as clients feel it, and the model runners (runners.py) show what runs inside.
"""

from __future__ import annotations

from typing import Any

from exporter.upstream.fetch import Fetcher
from exporter.upstream.view import LoadedModel, ModelInfo


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _entries(doc: Any) -> list[dict[str, Any]] | None:
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        return None
    return [m for m in doc["models"] if isinstance(m, dict) and isinstance(m.get("name"), str)]


async def inventory(fetch: Fetcher) -> dict[str, ModelInfo] | None:
    entries = _entries(await fetch.json("/api/tags"))
    if entries is None:
        return None
    models = {}
    for entry in entries:
        raw = entry.get("details")
        details = raw if isinstance(raw, dict) else {}
        models[entry["name"]] = ModelInfo(
            name=entry["name"], digest=_str(entry.get("digest")),
            family=_str(details.get("family")),
            parameter_size=_str(details.get("parameter_size")),
            quantization=_str(details.get("quantization_level")),
            size_bytes=_int(entry.get("size")))
    return models


async def loaded(fetch: Fetcher) -> dict[str, LoadedModel] | None:
    entries = _entries(await fetch.json("/api/ps"))
    if entries is None:
        return None
    return {entry["name"]: LoadedModel(name=entry["name"], vram_bytes=_int(entry.get("size_vram")),
                                       size_bytes=_int(entry.get("size")),
                                       expires_at=_str(entry.get("expires_at")))
            for entry in entries}
