"""The last minute, from cumulative counters: TTFT percentiles and output tokens per second.

Each scrape gives cumulative histogram buckets; the difference between now and the oldest
scrape still inside the window is the window's own histogram, and its percentiles are read
the way Prometheus' histogram_quantile reads them (linear inside a bucket). A counter that
went down (the sidecar restarted) starts the window again.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from exporter.top.scrape import Counts

WINDOW_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Recent:
    ttft_p50: float | None
    ttft_p95: float | None
    tokens_per_second: float | None
    requests: int  # first tokens in the window


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of a histogram given as sorted (upper bound, cumulative count)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # past the last finite bound: that bound is all we know
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


class Window:
    """One source's per-model history, a minute long."""

    def __init__(self, seconds: float = WINDOW_SECONDS) -> None:
        self.seconds = seconds
        self._history: dict[str, deque[tuple[float, Counts]]] = {}
        # When the source started, if within the window: its counters began at zero then,
        # so what they hold is all recent. (Else the window begins at the first scrape.)
        self.zero_at: float | None = None

    def add(self, at: float, counts: dict[str, Counts], uptime: float | None = None) -> None:
        if uptime is not None and uptime < self.seconds and not self._history:
            self.zero_at = at - uptime
        for model, entry in counts.items():
            history = self._history.get(model)
            if history is None:
                history = self._history[model] = deque()
                if self.zero_at is not None and at - self.zero_at < self.seconds:
                    history.append((self.zero_at, Counts()))
            if history and _went_down(history[-1][1], entry):
                history.clear()
            history.append((at, entry))
            while len(history) > 2 and at - history[1][0] >= self.seconds:
                history.popleft()  # keep one scrape at least a window old as the base

    def recent(self, model: str) -> Recent:
        history = self._history.get(model)
        if not history:
            return Recent(None, None, None, 0)
        (t0, first), (t1, last) = history[0], history[-1]
        delta = sorted((le, last.ttft_buckets[le] - first.ttft_buckets.get(le, 0.0))
                       for le in last.ttft_buckets)
        span = t1 - t0
        tokens = last.output_tokens - first.output_tokens
        return Recent(quantile(0.5, delta), quantile(0.95, delta),
                      tokens / span if span > 0 else None,
                      int(delta[-1][1]) if delta else 0)


def _went_down(before: Counts, now: Counts) -> bool:
    if now.output_tokens < before.output_tokens:
        return True
    return any(now.ttft_buckets.get(le, 0.0) < count for le, count in before.ttft_buckets.items())
