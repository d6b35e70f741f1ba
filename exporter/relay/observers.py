"""Observers: everything that consumes a request, told when it starts, when its first token
is relayed and when it ends. In order, and each isolated from the others.

Live state, load tracking, tracing, metrics, the access log and the router's accounting are
all observers. An observer that raises is logged (once per observer and hook until it
succeeds again) and the others still run: telemetry never breaks the request path. Only the
hooks an observer overrides are called, so a request pays for what is there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from exporter.record import RequestRecord

log = structlog.get_logger("llmtap.observers")

Hook = Callable[[RequestRecord], None]


class Observer:
    """Base class: each hook does nothing unless overridden."""

    def started(self, record: RequestRecord) -> None:
        """The request is prepared (labels known) and about to be relayed or refused."""

    def first_token(self, record: RequestRecord) -> None:
        """Its first token (or, for an answer that is not a token stream, its first byte)
        reached the client."""

    def finished(self, record: RequestRecord) -> None:
        """It ended, whatever the outcome; the record is complete."""


def _overrides(observer: Observer, hook: str) -> bool:
    return getattr(type(observer), hook) is not getattr(Observer, hook)


class Observers:
    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = list(observers)
        self._failing: set[tuple[str, str]] = set()
        self._started = self._hooks("started")
        self._first_token = self._hooks("first_token")
        self._finished = self._hooks("finished")

    def _hooks(self, hook: str) -> list[tuple[str, Hook]]:
        return [(type(o).__qualname__, getattr(o, hook)) for o in self.observers
                if _overrides(o, hook)]

    def started(self, record: RequestRecord) -> None:
        self._call(self._started, record, "started")

    def first_token(self, record: RequestRecord) -> None:
        self._call(self._first_token, record, "first_token")

    def finished(self, record: RequestRecord) -> None:
        self._call(self._finished, record, "finished")

    def _call(self, hooks: list[tuple[str, Hook]], record: RequestRecord, what: str) -> None:
        for name, hook in hooks:
            try:
                hook(record)
            except Exception:  # an observer must never break the relay or the others
                if (name, what) not in self._failing:
                    self._failing.add((name, what))
                    log.exception("observer failed; logged once until it recovers",
                                  observer=name, hook=what)
                continue
            if self._failing and (name, what) in self._failing:
                self._failing.discard((name, what))
