"""llama.cpp's native API: /completion and /infill (SSE `data: {...}` events).

A stream can begin with an empty `content` chunk sent before prompt processing, so the first
token is the first non-empty `content`, not the first byte. The final event (`"stop": true`)
carries `timings`, `tokens_predicted` and `tokens_evaluated`.
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

PROVIDER = "llama.cpp"


def parse_request(body: dict[str, Any]) -> RequestInfo:
    info = request_info(body, stream_default=False)
    n_predict = count(body.get("n_predict"))
    info.max_tokens = n_predict if n_predict else None
    info.temperature = number(body.get("temperature"))
    return info


def on_object(record: RequestRecord, obj: Any, now: float) -> None:
    if answer_object(record, obj) is None:
        return
    if obj.get("content"):
        note_token(record, now)
    if obj.get("stop") is True:
        predicted = count(obj.get("tokens_predicted"))
        if predicted is not None:
            record.output_tokens = predicted
        evaluated = count(obj.get("tokens_evaluated"))
        if evaluated is not None:
            record.input_tokens = evaluated
        reason = obj.get("stop_type")
        if isinstance(reason, str) and reason:
            record.finish_reasons.append(reason)
        timings = obj.get("timings")
        if type(timings) is dict:
            note_llamacpp_timings(record, timings)
    if "error" in obj:
        record.error_type = UPSTREAM_ERROR
