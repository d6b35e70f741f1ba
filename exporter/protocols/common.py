"""Readers every dialect shares: the request's model and stream flag, JSON numbers, timings.

All of them take what a client or server sent and never raise on bad input: a value of the
wrong type reads as absent.
"""

from __future__ import annotations

from typing import Any

from exporter.events import FROM_TIMINGS, Event, RequestInfo, ServerTimings, Usage


def request_info(body: dict[str, Any], stream_default: bool) -> RequestInfo:
    """Model and stream flag, read the same way in every dialect (each says its default)."""
    info = RequestInfo()
    model = body.get("model")
    if isinstance(model, str):
        info.model = model
    stream = body.get("stream", stream_default)
    info.stream = stream if isinstance(stream, bool) else None
    return info


def number(value: Any) -> float | None:
    """A JSON number that is not a bool, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def count(value: Any) -> int | None:
    """A JSON integer ≥ 0 (token counts), else None. (orjson gives plain ints: `type() is`
    is the whole test, and it excludes bool.)"""
    return value if type(value) is int and value >= 0 else None


LLAMACPP_TIMINGS = ("prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "cache_n")


def llamacpp_timings(timings: dict[str, Any]) -> list[Event]:
    """llama.cpp's `timings` object (native and OpenAI endpoints alike): its phase times,
    and its own token counts. Input tokens are the prompt tokens it evaluated plus those it
    found in its prompt cache; `predicted_n` counts every token it generated."""
    values = tuple((name, value) for name in LLAMACPP_TIMINGS
                   if (value := number(timings.get(name))) is not None)
    events: list[Event] = [ServerTimings(values)] if values else []
    prompt, cached = count(timings.get("prompt_n")), count(timings.get("cache_n"))
    predicted = count(timings.get("predicted_n"))
    if prompt is not None or predicted is not None:
        events.append(Usage(None if prompt is None else prompt + (cached or 0), predicted,
                            cached, source=FROM_TIMINGS))
    return events
