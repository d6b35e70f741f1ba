"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/embeddings.

Served by Ollama, llama.cpp and vLLM alike. Streams are SSE; the first event may carry only
the role, so the first token is the first non-empty `delta.content`, `delta.reasoning_content`
(`delta.reasoning` on some servers), `delta.tool_calls` or `text`. llama-server's
`prompt_progress` events (`return_progress`) carry a null delta and are not tokens. Usage
arrives only when the request set `stream_options.include_usage`; llama-server puts its own
counts in `timings` on the final event either way, and those stand in when there is no usage.
"""

from __future__ import annotations

from typing import Any

from exporter.events import (
    JUST_A_TOKEN,
    NO_EVENTS,
    TOKEN,
    UPSTREAM_ERROR,
    Event,
    Finished,
    RequestInfo,
    Usage,
)
from exporter.protocols.common import count, llamacpp_timings, number, request_info

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


def _choices(choices: list[Any]) -> tuple[bool, list[str]]:
    """Whether any choice carries generated content, and the finish reasons given."""
    token = False
    reasons: list[str] = []
    for choice in choices:
        if type(choice) is not dict:
            continue
        if choice.get("text") or _has_content(choice.get("delta") or choice.get("message")):
            token = True
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            reasons.append(reason)
    return token, reasons


def events(obj: dict[str, Any]) -> tuple[Event, ...]:
    choices = obj.get("choices")
    token, reasons = _choices(choices) if type(choices) is list else (False, [])
    usage, timings = obj.get("usage"), obj.get("timings")
    if not reasons and usage is None and timings is None and "error" not in obj:
        return JUST_A_TOKEN if token else NO_EVENTS
    found: list[Event] = [TOKEN] if token else []
    found += [Finished(reason) for reason in reasons]
    if type(usage) is dict:
        details = usage.get("prompt_tokens_details")
        cached = count(details.get("cached_tokens")) if type(details) is dict else None
        found.append(Usage(count(usage.get("prompt_tokens")),
                           count(usage.get("completion_tokens")), cached))
    if type(timings) is dict:
        found += llamacpp_timings(timings)
    if "error" in obj:
        found.append(UPSTREAM_ERROR)
    return tuple(found)
