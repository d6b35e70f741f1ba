"""Runs the pollers: one task per source, each on its own interval, each failing alone.

The node_exporter shape. A source is a named coroutine that returns True (it polled), False
(it failed cleanly: the upstream did not answer, or answered nonsense) or None (nothing to do
now: the upstream is down, or the source does not apply to this kind). A source that raises
is a bug or a surprise; it counts as a failure, its exception is logged once per change (not
once per tick) and it is tried again on its next tick, while the other sources go on.

Per source the supervisor keeps whether its last poll worked and how long it took, exported
as `llmtap_upstream_poll_success{source}` and `llmtap_upstream_poll_duration_seconds{source}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("llmtap.upstream")


@dataclass
class Source:
    name: str
    interval: float
    poll: Callable[[], Awaitable[bool | None]]
    # A poke (say: a request named a model the inventory does not know) polls early, but
    # never sooner than this after the last poll: a client cannot turn it into a flood.
    min_gap: float = 0.2
    # A source that holds a stream open (llama.cpp's /models/sse) is not polled at startup:
    # its poll lasts as long as the stream.
    at_startup: bool = True
    success: bool | None = None  # None: not polled yet, or nothing to poll
    duration: float | None = None  # seconds the last poll took
    problem: str | None = None  # what the log last said was wrong (None: nothing)
    last_started: float = 0.0
    last_finished: float = 0.0  # time.monotonic() when a poll last ended, however it ended
    _poked: asyncio.Event = field(default_factory=asyncio.Event)

    def poke(self) -> None:
        self._poked.set()


class PollSupervisor:
    def __init__(self, upstream: str, sources: list[Source]) -> None:
        self.upstream = upstream
        self.sources = {source.name: source for source in sources}
        self._tasks: list[asyncio.Task[None]] = []

    def poke(self, *names: str) -> None:
        """Poll these sources soon (all but the first when no name is given)."""
        for name in names or list(self.sources)[1:]:
            self.sources[name].poke()

    async def poll_all_once(self) -> None:
        """Every source once, in order (health first: the others read what it found)."""
        for source in self.sources.values():
            if source.at_startup:
                await self._poll(source)

    def start(self) -> None:
        for source in self.sources.values():
            if not source.at_startup:
                source.poke()  # at once, not one interval from now
        self._tasks = [asyncio.create_task(self._run(source), name=f"poll-{source.name}")
                       for source in self.sources.values()]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _run(self, source: Source) -> None:
        while True:
            await self._wait(source)
            await self._poll(source)

    async def _wait(self, source: Source) -> None:
        """Its interval, or less when poked (but never sooner than min_gap after a poll)."""
        try:
            await asyncio.wait_for(source._poked.wait(), source.interval)
        except TimeoutError:
            return
        source._poked.clear()
        gap = source.last_started + source.min_gap - time.monotonic()
        if gap > 0:
            await asyncio.sleep(gap)

    def polled_since(self, moment: float) -> bool:
        """Every source that polls at startup has finished a poll since `moment` (answered,
        failed or found nothing to do): what llmtap knows is no older than that."""
        return all(source.last_finished >= moment for source in self.sources.values()
                   if source.at_startup)

    async def _poll(self, source: Source) -> None:
        source.last_started = started = time.monotonic()
        try:
            outcome = await source.poll()
        except Exception as exc:  # a source must never take the others down (cancelled
            # is a BaseException: it still stops the task)
            outcome = False
            self._report(source, f"{type(exc).__name__}: {exc}"[:300])
        else:
            if outcome is not None:
                self._report(source, None if outcome else "no usable answer")
        source.last_finished = time.monotonic()
        if outcome is None:
            return
        source.success = outcome
        source.duration = time.monotonic() - started

    def _report(self, source: Source, problem: str | None) -> None:
        """Log a source's trouble once when it starts (or changes), once when it clears."""
        if problem == source.problem:
            return
        if problem is None:
            log.info("upstream poll recovered", upstream=self.upstream, source=source.name)
        else:
            log.warning("upstream poll failing", upstream=self.upstream, source=source.name,
                        problem=problem, note="logged once until it changes or recovers")
        source.problem = problem
