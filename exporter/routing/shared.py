"""State that many router replicas share, in Redis: spend, rate limits and ejections (their
in-flight counts: routing/shared_counts.py).

`shared_state: {redis_url: redis://host:6379/0}` in the router's config turns it on; without
it each replica keeps its own (routing/ledger.py's MemoryLedger), which is right for one.

Every check that must hold across replicas is one Lua script, so it is atomic in Redis:
- a reservation checks every budget it draws on and reserves in all of them, or in none;
- a settlement swaps a reservation for the real cost;
- a token bucket is refilled and taken from in one step.
Times inside the scripts are Redis's own clock (TIME), so replicas' clocks do not matter.

A budget is one hash per period, `<prefix>:budget:<scope>:<period>`: the field `spent`, and
one field per open reservation, `r:<id>` = "<amount> <expiry ms>"; expired reservations are
dropped by the next reservation. An ejection is a key `<prefix>:eject:<backend>` that lives
as long as the cooldown: every replica's breaker keeps that backend out until it expires.

Redis unreachable: nothing is spent (cloud requests are declined as `shared_state_down` and
go local), while local routing and per-key rate limits go on (a rate limit that cannot be
read is not enforced; the error is logged and counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from exporter.routing.ledger import (
    DAY_KEY_TTL,
    RESERVATION_TTL,
    Budget,
    LedgerUnavailable,
    Refused,
    Reservation,
    reservation_id,
)

log = structlog.get_logger("llmtap.router")

# KEYS: one hash per budget. ARGV: amount, id, ttl ms, then per budget its limit and its
# key's expiry in seconds (0: none). Returns {0, committed...} when reserved, else
# {i, committed} for the first budget without room (1-based).
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local amount = tonumber(ARGV[1])
local seen = {}
for i, key in ipairs(KEYS) do
  local committed = 0
  local fields = redis.call('HGETALL', key)
  for j = 1, #fields, 2 do
    local name, value = fields[j], fields[j + 1]
    if name == 'spent' then
      committed = committed + tonumber(value)
    else
      local held, expiry = string.match(value, '^(%S+) (%S+)$')
      if tonumber(expiry) < now then
        redis.call('HDEL', key, name)
      else
        committed = committed + tonumber(held)
      end
    end
  end
  if committed + amount > tonumber(ARGV[2 + 2 * i]) then
    return {i, tostring(committed)}
  end
  seen[i] = tostring(committed + amount)
end
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'r:' .. ARGV[2], ARGV[1] .. ' ' .. (now + tonumber(ARGV[3])))
  local ttl = tonumber(ARGV[3 + 2 * i])
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
end
return {0, unpack(seen)}
"""

# KEYS: the reservation's budget hashes. ARGV: id, cost. Returns the new spent per budget.
SETTLE = """
local out = {}
for i, key in ipairs(KEYS) do
  redis.call('HDEL', key, 'r:' .. ARGV[1])
  out[i] = redis.call('HINCRBYFLOAT', key, 'spent', ARGV[2])
end
return out
"""

# KEYS: the bucket. ARGV: rate per second, burst. Returns 0 when a request was taken, else
# the milliseconds until one is there.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait
"""


class RedisLedger:
    """The ledger for many replicas (see the module docstring)."""

    def __init__(self, url: str, prefix: str = "llmtap", refresh_interval: float = 1.0,
                 on_error: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.prefix = prefix
        self.refresh_interval = refresh_interval
        self.on_error = on_error
        self.clock = clock
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._reserve = self.redis.register_script(RESERVE)
        self._settle = self.redis.register_script(SETTLE)
        self._take = self.redis.register_script(TAKE)
        self._committed: dict[str, float] = {}  # period key -> spent + reserved, last known
        self._limited_until: dict[str, float] = {}  # bucket -> monotonic time
        self._ejected_until: dict[str, float] = {}  # backend -> monotonic time
        self._watched: dict[str, Budget] = {}
        self._boards: dict[str, None] = {}  # backends whose ejections are shared (ordered)
        self._pending: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self.up = False
        self._failing = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.refresh()
        if not self.up:
            log.error("shared state (Redis) unreachable: cloud requests are declined until "
                      "it answers", redis=_safe(self.url))
        self._refresher = asyncio.create_task(self._refresh_loop(), name="shared-state")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._pending:  # settlements still on their way: spend must not be lost
            await asyncio.wait(self._pending, timeout=5.0)
        await self.redis.aclose()

    def key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    def failed(self, exc: Exception, what: str) -> None:
        self.on_error()
        self.up = False
        if not self._failing:
            self._failing = True
            log.error("shared state (Redis) failed", what=what,
                      error=str(exc) or type(exc).__name__)

    def ok(self) -> None:
        self.up = True
        if self._failing:
            self._failing = False
            log.info("shared state (Redis) answering again")

    # ------------------------------------------------------------------ budgets

    def watch(self, budget: Budget) -> None:
        """Keep this budget's figure fresh for decisions and the metrics."""
        self._watched[budget.scope] = budget

    def committed(self, budget: Budget) -> float:
        self.watch(budget)
        return self._committed.get(budget.period_key(), 0.0)

    async def reserve(self, budgets: Sequence[Budget], amount: float) -> Reservation | Refused:
        keys = [b.period_key() for b in budgets]
        rid = reservation_id()
        args: list[Any] = [repr(amount), rid, int(RESERVATION_TTL * 1000)]
        for budget in budgets:
            args += [repr(budget.limit), DAY_KEY_TTL if budget.period == "day" else 0]
        try:
            answer = await self._reserve(keys=[self.key("budget", k) for k in keys], args=args)
        except RedisError as exc:
            self.failed(exc, "reserve")
            raise LedgerUnavailable(str(exc)) from None
        self.ok()
        index = int(answer[0])
        if index:
            self._committed[keys[index - 1]] = float(answer[1])
            return Refused(budgets[index - 1])
        for key, committed in zip(keys, answer[1:], strict=True):
            self._committed[key] = float(committed)
        return Reservation(rid, tuple(keys), amount)

    def settle(self, reservation: Reservation, cost: float) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        for key in reservation.keys:  # at once here, in Redis when the write lands
            self._committed[key] = self._committed.get(key, 0.0) - reservation.amount + cost
        task = asyncio.get_running_loop().create_task(self._write_settlement(reservation, cost))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write_settlement(self, reservation: Reservation, cost: float) -> None:
        keys = [self.key("budget", k) for k in reservation.keys]
        for attempt in range(6):  # about 6 s: a Redis restart, not an outage
            try:
                await self._settle(keys=keys, args=[reservation.id, repr(cost)])
                self.ok()
                return
            except RedisError as exc:
                self.failed(exc, "settle")
                await asyncio.sleep(0.2 * 2 ** attempt)
        log.error("a cloud request's cost could not be written to the shared state; its "
                  "reservation holds the budget until it expires", cost=cost,
                  reservation_ttl_s=RESERVATION_TTL)

    # ------------------------------------------------------------------ rate limits

    async def take(self, bucket: str, rate: float) -> float:
        try:
            wait_ms = int(await self._take(keys=[self.key("rate", bucket)],
                                           args=[repr(rate), repr(max(1.0, rate))]))
        except RedisError as exc:
            self.failed(exc, "rate limit")
            raise LedgerUnavailable(str(exc)) from None
        self.ok()
        if wait_ms:
            self._limited_until[bucket] = self.clock() + wait_ms / 1000
        return wait_ms / 1000

    def wait_hint(self, bucket: str, rate: float) -> float:
        return max(0.0, self._limited_until.get(bucket, 0.0) - self.clock())

    # ------------------------------------------------------------------ ejections

    def track(self, backend: str) -> None:
        self._boards[backend] = None

    def ejected(self, backend: str, seconds: float, by: str) -> None:
        """Tell the other replicas: `backend` is out for `seconds`."""
        self._ejected_until[backend] = self.clock() + seconds
        self.background(self.redis.set(self.key("eject", backend), by,
                                        px=max(1, int(seconds * 1000))), "eject")

    def restored(self, backend: str) -> None:
        self._ejected_until.pop(backend, None)
        self.background(self.redis.delete(self.key("eject", backend)), "restore")

    def ejected_for(self, backend: str) -> float:
        """Seconds another replica's ejection of `backend` has left (0: none)."""
        return max(0.0, self._ejected_until.get(backend, 0.0) - self.clock())

    def background(self, write: Any, what: str) -> None:
        async def run() -> None:
            try:
                await write
                self.ok()
            except RedisError as exc:
                self.failed(exc, what)

        task = asyncio.get_running_loop().create_task(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # ------------------------------------------------------------------ refresh

    async def refresh(self) -> None:
        """Read the watched budgets and the shared ejections (one round trip)."""
        budgets = list(self._watched.values())
        boards = list(self._boards)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for budget in budgets:
                    pipe.hgetall(self.key("budget", budget.period_key()))
                for backend in boards:
                    pipe.pttl(self.key("eject", backend))
                pipe.ping()
                answers = await pipe.execute()
        except RedisError as exc:
            self.failed(exc, "refresh")
            return
        self.ok()
        now = self.clock()
        for budget, fields in zip(budgets, answers, strict=False):
            self._committed[budget.period_key()] = _committed(fields)
        for backend, ttl_ms in zip(boards, answers[len(budgets):], strict=False):
            if isinstance(ttl_ms, int) and ttl_ms > 0:
                self._ejected_until[backend] = now + ttl_ms / 1000
            else:
                self._ejected_until.pop(backend, None)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            await self.refresh()


def _committed(fields: dict[bytes, bytes]) -> float:
    """Spent plus open reservations, from a budget hash (expiry is Redis's job)."""
    total = 0.0
    for name, value in fields.items():
        if name == b"spent":
            total += float(value)
        else:
            total += float(value.split(b" ", 1)[0])
    return total


def _safe(url: str) -> str:
    """The URL without its password, for the log."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return scheme + sep + rest
