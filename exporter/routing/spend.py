"""Who may spend what: the cloud backends (key, health, budget, rate limit) and the client
keys' own daily budgets and rate limits, all kept in one ledger (routing/ledger.py).

A cloud request reserves its maximum cost before it is sent (`Cloud.admit`): its prompt's
bytes as input tokens (a token is at least one byte, so this never undercounts) and its
`max_tokens`, else the cloud's `max_output_tokens`, as output tokens, at the configured
prices. It draws on the cloud's budget and on the client key's, and is settled at what the
answer reported when it ends (routing/accounting.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from exporter.routing.breaker import Breaker
from exporter.routing.config import CloudSpec, KeyLimitSpec
from exporter.routing.ledger import Budget, Ledger, LedgerUnavailable, Refused, Reservation, left
from exporter.routing.policies import Candidate

ANY_KEY = "*"  # key_limits entry for every key the file names and key_limits does not
# Why a cloud that could serve a request did not: a limit, not a fault.
LIMITS = ("budget_exhausted", "key_budget_exhausted", "rate_limited", "shared_state_down")


@dataclass(slots=True)
class Admission:
    """What `Cloud.admit` gives: a reservation to settle, or why the cloud declined."""

    reservation: Reservation | None = None
    declined: str = ""  # budget_exhausted, key_budget_exhausted, rate_limited, ...


class KeyLimits:
    """The client keys' daily budgets (cloud spend) and rate limits (all requests)."""

    def __init__(self, specs: Mapping[str, KeyLimitSpec], ledger: Ledger) -> None:
        self.specs = dict(specs)
        self.ledger = ledger

    def _spec(self, key: str | None) -> KeyLimitSpec | None:
        if not key:
            return None
        return self.specs.get(key) or self.specs.get(ANY_KEY)

    def budget(self, key: str | None) -> Budget | None:
        spec = self._spec(key)
        if spec is None or spec.budget is None:
            return None
        return Budget(f"key:{key}", spec.budget, "day")

    def budget_left(self, key: str) -> float | None:
        budget = self.budget(key)
        return None if budget is None else left(self.ledger, budget)

    async def take(self, key: str | None) -> float:
        """One request of the key's rate limit: 0.0 when taken (or none is set), else the
        seconds until it may send again. A ledger that cannot answer does not block."""
        spec = self._spec(key)
        if spec is None or spec.rate_limit is None:
            return 0.0
        try:
            return await self.ledger.take(f"key:{key}", spec.rate_limit)
        except LedgerUnavailable:
            return 0.0  # local traffic goes on; the error is logged and counted

    def with_budgets(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if self.budget(k) is not None]


class Cloud:
    """A frontier API: its key, health, budget and rate limit, and its measured TTFT."""

    def __init__(self, spec: CloudSpec, breaker: Breaker, ledger: Ledger) -> None:
        self.spec = spec
        self.name = spec.name
        self.breaker = breaker
        self.ledger = ledger
        self.budget = Budget(f"cloud:{spec.name}", spec.budget, spec.budget_period) \
            if spec.budget is not None else None
        self.bucket = f"cloud:{spec.name}"
        self.in_flight = 0
        self.ttft: float | None = None  # EWMA of measured TTFT through the router

    def budget_left(self) -> float | None:
        return None if self.budget is None else left(self.ledger, self.budget)

    def unusable(self, need: float = 0.0, key_budget: Budget | None = None) -> str:
        """Why the cloud cannot take a request that may cost `need` now ("" when it can),
        from the ledger's last known figures (`admit` is the authoritative check)."""
        if not self.spec.api_key:
            return "no_api_key"
        if not self.breaker.eligible():
            return "cloud_unhealthy"
        if (room := self.budget_left()) is not None and (room <= 0 or room < need):
            return "budget_exhausted"
        if key_budget is not None and left(self.ledger, key_budget) < max(need, 1e-12):
            return "key_budget_exhausted"
        rate = self.spec.rate_limit
        if rate is not None and self.ledger.wait_hint(self.bucket, rate) > 0:
            return "rate_limited"
        return ""

    def max_cost(self, prompt_bytes: int, max_tokens: int | None) -> float:
        return self.cost(prompt_bytes, max_tokens or self.spec.max_output_tokens)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.spec.price_per_input_token
                + output_tokens * self.spec.price_per_output_token)

    async def admit(self, amount: float, key_budget: Budget | None) -> Admission:
        """Reserve `amount` in the cloud's and the key's budgets, then take one request of
        the cloud's rate limit; nothing is held when the answer is no."""
        budgets = [b for b in (self.budget, key_budget) if b is not None]
        try:
            if budgets:
                reserved = await self.ledger.reserve(budgets, amount)
                if isinstance(reserved, Refused):
                    return Admission(declined="budget_exhausted" if reserved.budget is
                                     self.budget else "key_budget_exhausted")
            else:
                reserved = Reservation("", (), 0.0, settled=True)
            rate = self.spec.rate_limit
            if rate is not None and await self.ledger.take(self.bucket, rate) > 0:
                self.ledger.settle(reserved, 0.0)
                return Admission(declined="rate_limited")
        except LedgerUnavailable:
            return Admission(declined="shared_state_down")
        return Admission(reservation=reserved)

    def candidate(self) -> Candidate:
        return Candidate(backend=self.name, healthy=True, has_model=True, loaded=True,
                         router_in_flight=self.in_flight, is_cloud=True, parallel=1 << 20,
                         ttft=self.ttft if self.ttft is not None else self.spec.expected_ttft)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "base_url": self.spec.base_url,
                "api_key_set": bool(self.spec.api_key), "breaker": self.breaker.state,
                "budget": self.spec.budget, "budget_left": self.budget_left(),
                "in_flight": self.in_flight, "unusable": self.unusable() or None}
