"""Ollama's native API: /api/generate, /api/chat (NDJSON streams), /api/embed(dings).

Wire facts (Ollama docs/api.md): chat chunks carry `message.content` (and `message.thinking`,
`message.tool_calls`), generate chunks `response` (and `thinking`): a model that reasons
(thinking models think unless the request says `"think": false`) sends its thinking first,
in frames whose content is "", then its answer. Its `eval_count` includes the thinking
tokens and it reports no separate count for them. The last line has
`"done": true`, `done_reason` and nanosecond timings; an error can arrive mid-stream as
`{"error": "..."}`. Streaming is on unless the request says `"stream": false`.
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
    ServerTimings,
    Usage,
)
from exporter.protocols.common import count, number, request_info

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


def _kind(obj: dict[str, Any]) -> int:
    """What the frame carries (events.ANSWER_BIT, REASONING_BIT): `thinking` is reasoning;
    content, `response` and tool calls are the answer. Thinking frames carry `"content":""`
    (0.34.4, captured: tests/test_ollama.py)."""
    message = obj.get("message")
    if type(message) is dict:
        answer = message.get("content") or message.get("tool_calls")
        thinking = message.get("thinking")
    else:
        answer, thinking = obj.get("response"), obj.get("thinking")
    return (ANSWER_BIT if answer else 0) | (REASONING_BIT if thinking else 0)


def events(obj: dict[str, Any]) -> tuple[Event, ...]:
    kind = _kind(obj)
    final = obj.get("done") is True or "embeddings" in obj or "embedding" in obj
    if not final and "error" not in obj:
        return JUST_BY_BITS[kind]
    token = TOKEN_BY_BITS[kind]
    found: list[Event] = [token] if token is not None else []
    if final:
        found += _final(obj)
    elif "error" in obj:
        found.append(UPSTREAM_ERROR)
    return tuple(found)


def _final(obj: dict[str, Any]) -> list[Event]:
    # prompt_eval_count is the whole prompt, cache hits included; since 0.30 the cached part
    # is prompt_eval_cached_count (0.34.4, measured: the same chat twice gave 36 and 36, with
    # 1 then 35 cached).
    found: list[Event] = [Usage(count(obj.get("prompt_eval_count")),
                                count(obj.get("eval_count")),
                                count(obj.get("prompt_eval_cached_count")))]
    reason = obj.get("done_reason")
    if isinstance(reason, str) and reason:
        found.append(Finished(reason))
    timings = tuple((name, value / 1e9) for name in TIMING_FIELDS  # nanoseconds → seconds
                    if (value := count(obj.get(name))) is not None)
    if timings:
        found.append(ServerTimings(timings))
    return found
