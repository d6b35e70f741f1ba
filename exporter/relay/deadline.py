"""Deadlines, and the one timer that watches all of them.

A request has a deadline for the upstream's first byte and then for its silences; a client
connection has one for its request head and one for a client that stops sending or reading.
Arming a loop timer for each costs a heap entry per request (and one per POST lived for the
whole 60 s of the client-idle limit before anything was left to check). Instead every
deadline of a proxy joins one set, and one timer ticks every TICK seconds while the set is
not empty: an active stream pays a float store per chunk (`touched`), arming and disarming a
set insert and removal. A deadline fires at most TICK late, which no limit here cares about.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import perf_counter
from typing import Protocol

TICK = 0.05  # seconds between checks while anything is armed


class Watched(Protocol):
    def check(self, now: float) -> bool:
        """True when it is done: expired (and acted on) or no longer anything to watch."""


class Sweeper:
    def __init__(self, tick: float = TICK) -> None:
        self._tick = tick
        self._watched: set[Watched] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once: a getpid() each

    def add(self, item: Watched) -> None:
        self._watched.add(item)
        if self._timer is None:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._timer = self._loop.call_later(self._tick, self._sweep)

    def discard(self, item: Watched) -> None:
        self._watched.discard(item)

    def _sweep(self) -> None:
        self._timer = None
        now = perf_counter()
        done = [item for item in list(self._watched) if item.check(now)]
        self._watched.difference_update(done)
        if self._watched and self._loop is not None:
            self._timer = self._loop.call_later(self._tick, self._sweep)


class Deadline:
    """Expires `limit` seconds after it was last touched; calls `on_expire` once."""

    __slots__ = ("_limit", "_on_expire", "_sweeper", "expired", "touched")

    def __init__(self, sweeper: Sweeper, limit: float, on_expire: Callable[[], None]) -> None:
        self._sweeper = sweeper
        self._limit = limit
        self._on_expire = on_expire
        self.expired = False
        self.touched = perf_counter()
        sweeper.add(self)

    def rearm(self, limit: float, now: float) -> None:
        """A new limit from `now` on (the first byte came: from now on, the idle limit)."""
        self._limit = limit
        self.touched = now
        self.expired = False
        self._sweeper.add(self)

    def check(self, now: float) -> bool:
        if now - self.touched < self._limit:
            return False
        self.expired = True
        self._on_expire()
        return True

    def disarm(self) -> None:
        self._sweeper.discard(self)
