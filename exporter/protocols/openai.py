"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/embeddings.

Served by Ollama, llama.cpp and vLLM alike. Streams are SSE; the first event may carry only
the role, so the first token is the first non-empty `delta.content`, `delta.reasoning_content`
(`delta.reasoning` on some servers), `delta.tool_calls` or `text`. Reasoning is told apart
from the answer: llama-server sends `reasoning_content` deltas with `--reasoning-format
deepseek` (its default `auto` does too for templates that think), Ollama `reasoning`; neither
reports a reasoning token count (OpenAI's `completion_tokens_details.reasoning_tokens` is read
where a server sends it). llama-server's
`prompt_progress` events (`return_progress`) carry a null delta and are not tokens. Usage
arrives only when the request set `stream_options.include_usage`; llama-server puts its own
counts in `timings` on the final event either way, and those stand in when there is no usage.
"""

from __future__ import annotations

from typing import Any

from exporter.events import (
    ANSWER_BIT,
    JUST_BY_BITS,
    REASONING_BIT,
    TOKEN_BY_BITS,
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


def _part_kind(part: Any) -> int:
    """A delta's (or message's) content as events' bits: `reasoning_content` (llama-server,
    vLLM, DeepSeek) and `reasoning` (Ollama's /v1) are reasoning; content and tool calls are
    the answer. Ollama's reasoning deltas carry `"content":""`, llama-server's omit it."""
    if type(part) is not dict:
        return 0
    answer = part.get("content") or part.get("tool_calls")
    reasoning = part.get("reasoning_content") or part.get("reasoning")
    return (ANSWER_BIT if answer else 0) | (REASONING_BIT if reasoning else 0)


def _choices(choices: list[Any]) -> tuple[int, list[str]]:
    """What the choices carry (events' bits), and the finish reasons given."""
    kind = 0
    reasons: list[str] = []
    for choice in choices:
        if type(choice) is not dict:
            continue
        if choice.get("text"):
            kind |= ANSWER_BIT
        kind |= _part_kind(choice.get("delta") or choice.get("message"))
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            reasons.append(reason)
    return kind, reasons


def _usage(usage: dict[str, Any]) -> Usage:
    """OpenAI's usage; the cached and reasoning parts where it details them."""
    details = usage.get("prompt_tokens_details")
    cached = count(details.get("cached_tokens")) if type(details) is dict else None
    output = usage.get("completion_tokens_details")
    reasoning = count(output.get("reasoning_tokens")) if type(output) is dict else None
    return Usage(count(usage.get("prompt_tokens")), count(usage.get("completion_tokens")),
                 cached, reasoning_output_tokens=reasoning)


def events(obj: dict[str, Any]) -> tuple[Event, ...]:
    choices = obj.get("choices")
    kind, reasons = _choices(choices) if type(choices) is list else (0, [])
    usage, timings = obj.get("usage"), obj.get("timings")
    if not reasons and usage is None and timings is None and "error" not in obj:
        return JUST_BY_BITS[kind]
    token = TOKEN_BY_BITS[kind]
    found: list[Event] = [token] if token is not None else []
    found += [Finished(reason) for reason in reasons]
    if type(usage) is dict:
        found.append(_usage(usage))
    if type(timings) is dict:
        found += llamacpp_timings(timings)
    if "error" in obj:
        found.append(UPSTREAM_ERROR)
    return tuple(found)
