"""What every dialect module provides: a request parser and a response-object handler.

Both are sans-IO and never raise on bad input: the relay forwards the bytes whatever they
are, and the observer records only what it could read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from exporter.record import RequestRecord


@dataclass(slots=True)
class RequestInfo:
    """What llmtap reads from a request body (never the prompt text itself)."""

    model: str = ""
    stream: bool | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def request_info(body: dict[str, Any], stream_default: bool) -> RequestInfo:
    """Model and stream flag, read the same way in every dialect (each says its default)."""
    info = RequestInfo()
    model = body.get("model")
    if isinstance(model, str):
        info.model = model
    stream = body.get("stream", stream_default)
    info.stream = stream if isinstance(stream, bool) else None
    return info


def answer_object(record: RequestRecord, obj: Any) -> dict[str, Any] | None:
    """The JSON object of a response frame, with its model and id noted; None (counted as
    unparseable) when the frame is valid JSON but not an object."""
    if type(obj) is not dict:
        record.unparseable += 1
        return None
    note_model_and_id(record, obj)
    return obj


def number(value: Any) -> float | None:
    """A JSON number that is not a bool, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def count(value: Any) -> int | None:
    """A JSON integer ≥ 0 (token counts), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def note_token(record: RequestRecord, now: float) -> None:
    """A frame carrying generated content was relayed at `now`."""
    if record.first_token is None:
        record.first_token = now
    record.last_token = now
    record.token_chunks += 1


def note_model_and_id(record: RequestRecord, obj: dict[str, Any]) -> None:
    if not record.response_model:
        model = obj.get("model")
        if isinstance(model, str):
            record.response_model = model
    if not record.response_id:
        rid = obj.get("id")
        if isinstance(rid, str):
            record.response_id = rid


LLAMACPP_TIMINGS = ("prompt_n", "prompt_ms", "predicted_n", "predicted_ms")


def note_llamacpp_timings(record: RequestRecord, timings: dict[str, Any]) -> None:
    """llama.cpp's `timings` object (native and OpenAI endpoints alike)."""
    for name in LLAMACPP_TIMINGS:
        value = number(timings.get(name))
        if value is not None:
            record.server_timings[name] = value
