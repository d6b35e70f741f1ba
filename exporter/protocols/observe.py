"""ResponseObserver: one request's relayed response bytes → framer → dialect → its record.

`feed` is called after each chunk has been written to the client, with the time it was
written; it never raises, never alters or delays the bytes, and returns True for the chunk
that carried the answer's first token, which is all the relay needs to react to.
"""

from __future__ import annotations

from typing import Any

from exporter.events import (
    JUST_A_TOKEN,
    JUST_REASONING,
    NOT_AN_OBJECT,
    REASONING,
    UPSTREAM_ERROR,
    Answered,
)
from exporter.protocols import Endpoint
from exporter.protocols.framing import Framer, framer_for
from exporter.record import Outcome, RequestRecord, apply, token

CUT_SHORT = ("chat", "text_completion")  # operations whose streams end with a finish frame


class ResponseObserver:
    __slots__ = ("_done", "_events", "_framer", "_last", "_named", "_record")

    def __init__(self, endpoint: Endpoint, record: RequestRecord, content_type: str) -> None:
        self._record = record
        self._events = endpoint.events
        self._named = False  # the answer's model and id are noted once, from its first frame
        self._last = 0.0  # when the latest chunk was relayed
        self._done = False  # an SSE stream's [DONE] came
        framer, streamed = framer_for(content_type, self._value, self._terminated)
        self._framer: Framer | None = framer
        if framer is not None:
            record.stream = streamed

    def feed(self, data: bytes, now: float) -> bool:
        framer = self._framer
        if framer is None:
            return False
        self._last = now
        waiting = self._record.first_token is None
        framer.feed(data)
        return waiting and self._record.first_token is not None

    def finish(self, complete: bool) -> bool:
        """The answer ended (complete: it was not broken off). A whole document is parsed
        now: True if that gave the first token, stamped with the time of its last byte."""
        framer = self._framer
        if framer is None:
            return False
        record = self._record
        waiting = record.first_token is None
        if complete:
            framer.close()
            if record.stream and not (record.finish_reasons or self._done) and \
                    record.operation in CUT_SHORT and record.outcome is Outcome.ANSWERED \
                    and record.status == 200:
                # A generation stream whose HTTP body ended cleanly without its end (no
                # finish reason, no [DONE], no done line): Ollama's /v1 layer does this when
                # the model's runner dies. It was not answered.
                apply(record, UPSTREAM_ERROR, self._last)
        record.unparseable += framer.unparseable
        self._framer = None
        return waiting and record.first_token is not None

    def _terminated(self) -> None:
        self._done = True

    def _value(self, value: Any) -> None:
        record, now = self._record, self._last
        if type(value) is not dict:
            apply(record, NOT_AN_OBJECT, now)
            return
        if not self._named:
            self._name(value)
        events = self._events(value)
        if events is JUST_A_TOKEN:  # most frames: what apply() does for an answer, inline
            if record.first_token is None:
                record.first_token = now
            if record.first_answer_token is None:
                record.first_answer_token = now
            record.last_token = now
            record.token_chunks += 1
            return
        if events is JUST_REASONING:  # a reasoning model's thinking: no loop, no type tests
            token(record, REASONING, now)
            return
        for event in events:
            apply(record, event, now)

    def _name(self, obj: dict[str, Any]) -> None:
        model, rid = obj.get("model"), obj.get("id")
        if isinstance(model, str) or isinstance(rid, str):
            apply(self._record, Answered(model if isinstance(model, str) else "",
                                         rid if isinstance(rid, str) else ""), self._last)
            self._named = isinstance(model, str)
