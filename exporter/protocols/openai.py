"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/embeddings.

Served by Ollama, llama.cpp and vLLM alike. Streams are SSE; the first event may carry only
the role, so the first token is the first non-empty `delta.content`, `delta.reasoning_content`
(`delta.reasoning` on some servers), `delta.tool_calls` or `text`. Usage arrives only when the
request set `stream_options.include_usage`; llama.cpp adds `timings` on the final event.
"""

from __future__ import annotations

from typing import Any

from exporter.protocols.base import (
    RequestInfo,
    answer_object,
    count,
    note_llamacpp_timings,
    note_token,
    number,
    request_info,
)
from exporter.record import UPSTREAM_ERROR, RequestRecord

PROVIDER = "openai"


def parse_request(body: dict[str, Any]) -> RequestInfo:
    info = request_info(body, stream_default=False)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    info.max_tokens = count(max_tokens)
    info.temperature = number(body.get("temperature"))
    return info


def _has_content(part: Any) -> bool:
    if type(part) is not dict:
        return False
    return bool(
        part.get("content")
        or part.get("reasoning_content")
        or part.get("reasoning")
        or part.get("tool_calls")
    )


def on_object(record: RequestRecord, obj: Any, now: float) -> None:
    if answer_object(record, obj) is None:
        return
    choices = obj.get("choices")
    if type(choices) is list and choices:
        token = False
        for choice in choices:
            if type(choice) is not dict:
                continue
            if choice.get("text") or _has_content(choice.get("delta") or choice.get("message")):
                token = True
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                record.finish_reasons.append(reason)
        if token:
            note_token(record, now)
    usage = obj.get("usage")
    if type(usage) is dict:
        prompt = count(usage.get("prompt_tokens"))
        if prompt is not None:
            record.input_tokens = prompt
        completion = count(usage.get("completion_tokens"))
        if completion is not None:
            record.output_tokens = completion
    timings = obj.get("timings")
    if type(timings) is dict:
        note_llamacpp_timings(record, timings)
    if "error" in obj:
        record.error_type = UPSTREAM_ERROR
