"""llama.cpp's native API: /completion and /infill (SSE `data: {...}` events).

A stream can begin with an empty `content` chunk sent before prompt processing, so the first
token is the first non-empty `content`, not the first byte. The final event (`"stop": true`)
carries `timings`, `tokens_predicted` and `tokens_evaluated`.

The native endpoints apply no chat template and parse no reasoning: a model's thinking comes
as plain `content`, tags and all (`</think>` split over three frames, b11434 with SmolLM2
prompted to think: tests/test_relay_llamacpp.py), so here every frame is an answer token and
only the OpenAI endpoints tell reasoning apart (`reasoning_content`).
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

PROVIDER = "llama.cpp"


def parse_request(body: dict[str, Any]) -> RequestInfo:
    info = request_info(body, stream_default=False)
    n_predict = count(body.get("n_predict"))
    info.max_tokens = n_predict if n_predict else None
    info.temperature = number(body.get("temperature"))
    return info


def events(obj: dict[str, Any]) -> tuple[Event, ...]:
    token = bool(obj.get("content"))
    if obj.get("stop") is not True and "error" not in obj:
        return JUST_A_TOKEN if token else NO_EVENTS
    found: list[Event] = [TOKEN] if token else []
    if obj.get("stop") is True:
        found.append(Usage(count(obj.get("tokens_evaluated")),
                           count(obj.get("tokens_predicted"))))
        reason = obj.get("stop_type")
        if isinstance(reason, str) and reason:
            found.append(Finished(reason))
        timings = obj.get("timings")
        if type(timings) is dict:
            found += llamacpp_timings(timings)
    if "error" in obj:
        found.append(UPSTREAM_ERROR)
    return tuple(found)
