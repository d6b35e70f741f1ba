"""Ollama's native API: /api/generate, /api/chat (NDJSON streams), /api/embed(dings).

Wire facts (Ollama docs/api.md): chat chunks carry `message.content` (and `message.thinking`,
`message.tool_calls`), generate chunks `response` (and `thinking`); the last line has
`"done": true`, `done_reason` and nanosecond timings; an error can arrive mid-stream as
`{"error": "..."}`. Streaming is on unless the request says `"stream": false`.
"""

from __future__ import annotations

from typing import Any

from exporter.protocols.base import (
    RequestInfo,
    answer_object,
    count,
    note_token,
    number,
    request_info,
)
from exporter.record import UPSTREAM_ERROR, RequestRecord

PROVIDER = "ollama"
TIMING_FIELDS = (
    "total_duration",
    "load_duration",
    "prompt_eval_duration",
    "eval_duration",
)


def parse_request(body: dict[str, Any]) -> RequestInfo:
    info = request_info(body, stream_default=True)
    options = body.get("options")
    if isinstance(options, dict):
        max_tokens = count(options.get("num_predict"))
        info.max_tokens = max_tokens if max_tokens else None
        info.temperature = number(options.get("temperature"))
    return info


def on_object(record: RequestRecord, obj: Any, now: float) -> None:
    if answer_object(record, obj) is None:
        return
    message = obj.get("message")
    if type(message) is dict:
        if message.get("content") or message.get("thinking") or message.get("tool_calls"):
            note_token(record, now)
    elif obj.get("response") or obj.get("thinking"):
        note_token(record, now)
    if obj.get("done") is True or "embeddings" in obj or "embedding" in obj:
        _final(record, obj)
    elif "error" in obj:
        record.error_type = UPSTREAM_ERROR


def _final(record: RequestRecord, obj: dict[str, Any]) -> None:
    prompt = count(obj.get("prompt_eval_count"))
    if prompt is not None:
        record.input_tokens = prompt
    evals = count(obj.get("eval_count"))
    if evals is not None:
        record.output_tokens = evals
    reason = obj.get("done_reason")
    if isinstance(reason, str) and reason:
        record.finish_reasons.append(reason)
    timings = record.server_timings
    for name in TIMING_FIELDS:
        value = count(obj.get(name))
        if value is not None:
            timings[name] = value / 1e9  # nanoseconds → seconds
