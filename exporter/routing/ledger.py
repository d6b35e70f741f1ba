"""What the router may still spend and send: budgets (reserve, then settle) and rate limits.

Budgets are money (the cloud's, and each client key's); rate limits are requests per second
(token buckets, burst = max(1, rate)). Both are kept in one `Ledger`: in memory for a single
router (the default), or in Redis for many replicas (routing/shared.py), so that N replicas
share one budget and one rate limit instead of having N of each.

Reserve-then-settle: before a cloud request is sent, its maximum cost is reserved against
every budget it draws on, all at once and only if each has room for all of it
(spent + reserved + maximum <= limit); when it ends, the reservation becomes what the request
really cost. Concurrent replicas therefore cannot together pass a budget by more than what
requests cost beyond their reservation. A reservation that is never settled (its replica
died) expires after `RESERVATION_TTL` seconds.

Decisions are synchronous and read the ledger's last known figures (`committed`,
`wait_hint`); the authoritative checks are the awaited `reserve` and `take`.
"""

from __future__ import annotations

import datetime
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

RESERVATION_TTL = 3600.0  # seconds: longer than any request the router lets run
DAY_KEY_TTL = 2 * 86400  # a day's spend is kept a day after it ends, for the state page


class LedgerUnavailable(Exception):
    """The shared state cannot be read or written (Redis down): spend nothing."""


@dataclass(frozen=True, slots=True)
class Budget:
    scope: str  # "cloud:<name>" or "key:<name>"
    limit: float  # currency units per period
    period: str = "day"  # "day" (UTC) or "total"

    def period_key(self) -> str:
        if self.period == "total":
            return f"{self.scope}:total"
        return f"{self.scope}:{datetime.datetime.now(datetime.UTC).date().isoformat()}"


@dataclass(slots=True)
class Reservation:
    id: str
    keys: tuple[str, ...]  # the budgets' period keys, fixed when reserved
    amount: float
    settled: bool = False


@dataclass(frozen=True, slots=True)
class Refused:
    """A reservation that did not fit: the budget without room for it."""

    budget: Budget


class Ledger(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def committed(self, budget: Budget) -> float:
        """Spent plus reserved in the budget's current period, as last known."""
        ...

    async def reserve(self, budgets: Sequence[Budget], amount: float) -> Reservation | Refused:
        ...

    def settle(self, reservation: Reservation, cost: float) -> None:
        """Replace the reservation by the real cost (0: nothing was spent). Synchronous: the
        relay's observers call it; a shared ledger writes in the background."""
        ...

    async def take(self, bucket: str, rate: float) -> float:
        """Take one request from the bucket: 0.0 when taken, else seconds until one is."""
        ...

    def wait_hint(self, bucket: str, rate: float) -> float:
        """Seconds until the bucket has a request again, as last known (0: it has one)."""
        ...


def left(ledger: Ledger, budget: Budget) -> float:
    return max(0.0, budget.limit - ledger.committed(budget))


_ids = itertools.count()


def reservation_id() -> str:
    return f"{time.time_ns():x}-{next(_ids)}"


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass
class MemoryLedger:
    """One replica's ledger: exact, and gone when the process restarts."""

    clock: Callable[[], float] = time.monotonic
    _spent: dict[str, float] = field(default_factory=dict)
    _reserved: dict[str, float] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def committed(self, budget: Budget) -> float:
        key = budget.period_key()
        return self._spent.get(key, 0.0) + self._reserved.get(key, 0.0)

    async def reserve(self, budgets: Sequence[Budget], amount: float) -> Reservation | Refused:
        for budget in budgets:
            if self.committed(budget) + amount > budget.limit:
                return Refused(budget)
        keys = tuple(b.period_key() for b in budgets)
        for key in keys:
            self._reserved[key] = self._reserved.get(key, 0.0) + amount
        return Reservation(reservation_id(), keys, amount)

    def settle(self, reservation: Reservation, cost: float) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        for key in reservation.keys:
            self._reserved[key] = max(0.0, self._reserved.get(key, 0.0) - reservation.amount)
            self._spent[key] = self._spent.get(key, 0.0) + cost

    def _bucket(self, bucket: str, rate: float) -> _Bucket:
        burst = max(1.0, rate)
        now = self.clock()
        state = self._buckets.get(bucket)
        if state is None:
            state = self._buckets[bucket] = _Bucket(burst, now)
        state.tokens = min(burst, state.tokens + (now - state.at) * rate)
        state.at = now
        return state

    async def take(self, bucket: str, rate: float) -> float:
        state = self._bucket(bucket, rate)
        if state.tokens >= 1.0:
            state.tokens -= 1.0
            return 0.0
        return (1.0 - state.tokens) / rate

    def wait_hint(self, bucket: str, rate: float) -> float:
        state = self._bucket(bucket, rate)
        return 0.0 if state.tokens >= 1.0 else (1.0 - state.tokens) / rate
