"""The circuit breaker: one per backend, ejecting one that keeps failing and letting it back
after a successful probe. With shared state (routing/shared.py) an ejection is seen by every
router replica: one replica's failures keep the backend out for all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import structlog

from exporter.routing.config import BreakerSpec

log = structlog.get_logger("llmtap.router")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class EjectionBoard(Protocol):
    """Where replicas tell each other about ejections (shared.RedisLedger)."""

    def track(self, backend: str) -> None: ...

    def ejected(self, backend: str, seconds: float, by: str) -> None: ...

    def restored(self, backend: str) -> None: ...

    def ejected_for(self, backend: str) -> float: ...


class Breaker:
    """Closed → (N consecutive failures) → open for a cooldown → half-open: one probe; its
    success closes the breaker, its failure reopens it for twice as long (up to a maximum).

    Request outcomes and liveness are apart: a sidecar whose admin port answers while its
    requests fail is ejected all the same (a poll's success never clears request failures),
    and only a request probe brings back a backend that failing answers ejected. Failed polls
    and refused connections are liveness: a poll answering again brings that one back.
    A probe that hangs past `probe_timeout` fails; one that is cancelled, or answered 429,
    proves nothing and frees the probe slot. `cool_down` (a 429 with Retry-After) keeps a
    backend out for that long without calling it broken.
    """

    def __init__(self, spec: BreakerSpec, clock: Callable[[], float] = time.monotonic,
                 on_open: Callable[[], None] | None = None, name: str = "",
                 board: EjectionBoard | None = None) -> None:
        self.name = name
        self.board = board
        self.spec = spec
        self.clock = clock
        self.on_open = on_open
        self.state = CLOSED
        self.failures = 0
        self.cooldown = spec.cooldown
        self.opened_at = 0.0
        self.opened_by = ""  # "requests" or "liveness" (polls, connects): what ejected it
        self.probe_at = 0.0  # when the half-open probe was sent
        self.ejections = 0

    def eligible(self) -> bool:
        """May a request go there now (the probe is taken by `dispatched`)?"""
        if self.state == HALF_OPEN and self.clock() - self.probe_at >= self.spec.probe_timeout:
            self.failure()  # the probe hung: that is an answer too
        if self.state == CLOSED and self.board is not None and \
                (seconds := self.board.ejected_for(self.name)) > 0:
            self._follow(seconds)
        if self.state == CLOSED:
            return True
        return self.state == OPEN and self.clock() - self.opened_at >= self.cooldown

    def dispatched(self) -> None:
        if self.state == OPEN and self.clock() - self.opened_at >= self.cooldown:
            self.state = HALF_OPEN  # this request is the probe; others wait for its outcome
            self.probe_at = self.clock()

    def released(self) -> None:
        """The probe ended without telling (cancelled, a 429): the next request probes."""
        if self.state == HALF_OPEN:
            self.state = OPEN

    def cool_down(self, seconds: float) -> None:
        """Out for `seconds` (a 429's Retry-After), not broken: no failure, no doubling."""
        self._follow(seconds)
        if self.board is not None:
            self.board.ejected(self.name, self.cooldown, self.opened_by)

    def _follow(self, seconds: float) -> None:
        """Out for `seconds` without a failure of ours: a 429, another replica's ejection.
        A request probe brings it back."""
        self.state = OPEN
        self.opened_at = self.clock()
        self.cooldown = max(0.0, min(seconds, self.spec.max_cooldown))
        self.opened_by = self.opened_by or "requests"

    def success(self, liveness: bool = False) -> None:
        if liveness and (self.state == CLOSED or self.opened_by != "liveness"):
            return  # liveness says nothing about requests: it neither clears nor closes
        if self.state == OPEN and self.clock() - self.opened_at < self.cooldown:
            return  # too early to trust it again
        if self.state != CLOSED:
            log.info("backend back in rotation", backend=self.name,
                     after_s=round(self.cooldown, 3))
            if self.board is not None:
                self.board.restored(self.name)
        self.state = CLOSED
        self.failures = 0
        self.cooldown = self.spec.cooldown
        self.opened_by = ""

    def failure(self, liveness: bool = False) -> None:
        if self.state == HALF_OPEN or (self.state == OPEN and self.eligible()):
            self.cooldown = min(self.cooldown * 2, self.spec.max_cooldown)
            self._open("liveness" if liveness else "requests")
            return
        if self.state == OPEN:
            return
        self.failures += 1
        if self.failures >= self.spec.failures:
            self._open("liveness" if liveness else "requests")

    def _open(self, by: str) -> None:
        first = self.state == CLOSED
        self.state = OPEN
        self.opened_at = self.clock()
        if first or self.opened_by == "liveness":
            self.opened_by = by
        if self.board is not None:
            self.board.ejected(self.name, self.cooldown, self.opened_by)
        if first:
            self.ejections += 1
            if self.on_open is not None:
                self.on_open()


