"""The classifier's own threads: a sync plugin or the embedding model runs here, never on
the event loop, and never on the loop's default executor (which name resolution uses).

A call cut by its deadline cannot be stopped (Python threads are not cancellable): it runs
on, holding its thread. `busy` counts calls submitted and not yet returned, so that a
plugin hung for good makes requests fall back at once (reason "overloaded") instead of
queueing without bound behind it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
WORKERS = 2
MAX_BUSY = 16  # submitted and unfinished; past it: Saturated


class Saturated(Exception):
    """Too many calls still running or queued: the caller falls back."""


class Threads:
    def __init__(self, workers: int = WORKERS, max_busy: int = MAX_BUSY) -> None:
        self.executor = ThreadPoolExecutor(max_workers=workers,
                                           thread_name_prefix="llmtap-classify")
        self.max_busy = max_busy
        self.busy = 0
        self._lock = threading.Lock()

    def _done(self, _: Future[Any]) -> None:
        with self._lock:
            self.busy -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self.busy >= self.max_busy:
                raise Saturated(f"{self.busy} classifier calls still running")
            self.busy += 1
        try:
            future = self.executor.submit(fn, *args)
        except RuntimeError:  # shut down: nothing was submitted
            with self._lock:
                self.busy -= 1
            raise
        # Done when it returns, raises, or is cancelled before it started (a deadline cut
        # it while it was queued): `busy` counts down in every case.
        future.add_done_callback(self._done)
        return await asyncio.wrap_future(future)
