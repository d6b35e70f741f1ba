"""Router replicas' in-flight counts, shared in Redis so that each ranks with all of them.

Between two polls of a sidecar a replica knows only its own sends there. With 16 replicas
reading the same state at once, each then sends to the backends that looked idle, as if the
other 15 had not (the simulator's many-replica table: mean TTFT 3x one router's even with
the estimate of the others' sends). Shared counts close that gap: before each decision a
replica reads what every other replica has in flight, per backend and model, right now.

Layout, under the shared state's prefix:
- `<prefix>:inflight:<replica>`: a hash per replica, field = JSON `[model, backend]`, value
  = that replica's unfinished requests there. A field is deleted when it reaches 0, so the
  hash is as big as the replica's in-flight requests, whatever model names clients send.
- `<prefix>:replicas`: the set of replicas that have written one.

Each send and each end is one fire-and-forget HINCRBY (a Lua script: the field's count, its
deletion at 0 and the hash's expiry in one step). Every `refresh_interval` a replica rewrites
its whole hash from its own counts: a lost or reordered write is corrected there, and the
hash of a replica that died expires after `COUNTS_TTL`, taking its requests with it.

A read that fails or takes longer than `READ_DEADLINE` returns None, and the replica falls
back to its own counts plus the estimate of the others' sends (policies.py): the shared
counts make routing better, never slower by more than the deadline, never unavailable.
Scripts touch keys they compute, so this needs one Redis, not a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Callable

import orjson
import structlog
from redis.exceptions import RedisError

from exporter.routing.shared import RedisLedger

log = structlog.get_logger("llmtap.router")

READ_DEADLINE = 0.025  # seconds a decision waits for the other replicas' counts
COUNTS_TTL = 10.0  # seconds a replica's counts outlive its last write (it rewrites them
# every refresh_interval while alive)

Counts = dict[tuple[str, str], int]  # (backend, model) -> requests in flight

# KEYS: this replica's hash, the set of replicas. ARGV: field, delta, ttl ms, replica id.
ADD = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return n
"""

# KEYS: the set of replicas. ARGV: the hashes' key prefix, this replica's id, the start
# and the end of the fields wanted ('' for any; a model's start, a backend's end: its counts
# only; JSON escapes the quotes inside a name, so neither can match across the two names).
# Returns the other replicas' counts summed per field, flat (summed here: one field per
# backend goes back, not one per replica and backend, and parsing the answer is most of a
# read's cost); forgets replicas whose hash is gone (expired, or empty: such a one adds
# itself back with its next write).
READ = """
local sums, order = {}, {}
local want, tail = ARGV[3], ARGV[4]
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if id ~= ARGV[2] then
    local fields = redis.call('HGETALL', ARGV[1] .. id)
    if #fields == 0 then redis.call('SREM', KEYS[1], id) end
    for j = 1, #fields, 2 do
      local name = fields[j]
      if string.sub(name, 1, #want) == want
          and (#tail == 0 or string.sub(name, -#tail) == tail) then
        if sums[name] == nil then
          sums[name] = 0
          order[#order + 1] = name
        end
        sums[name] = sums[name] + tonumber(fields[j + 1])
      end
    end
  end
end
local out = {}
for _, name in ipairs(order) do
  out[#out + 1] = name
  out[#out + 1] = sums[name]
end
return out
"""


def replica_id() -> str:
    """Unique per process, readable in Redis: host, pid, a random tail."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class SharedInFlight:
    """This replica's counts written to Redis, and the other replicas' read from it."""

    def __init__(self, shared: RedisLedger, mine: Callable[[], Counts],
                 replica: str | None = None) -> None:
        self.shared = shared
        self.mine = mine  # this replica's own counts, for the periodic rewrite
        self.replica = replica or replica_id()
        self._hashes = shared.key("inflight", "")  # each replica's: this + its id
        self._hash = self._hashes + self.replica
        self._set = shared.key("replicas", "inflight")
        self._add = shared.redis.register_script(ADD)
        self._read = shared.redis.register_script(READ)
        self._ttl_ms = int(max(COUNTS_TTL, 3 * shared.refresh_interval) * 1000)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._rewrite_loop(), name="shared-in-flight")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError):  # gone: the others stop counting ours at once
            await self.shared.redis.delete(self._hash)

    def add(self, backend: str, model: str, delta: int) -> None:
        """A request sent there (+1) or ended (-1): written in the background."""
        field = _field(backend, model)
        self.shared.background(
            self._add(keys=[self._hash, self._set],
                      args=[field, delta, self._ttl_ms, self.replica]), "in-flight count")

    async def others(self, model: str | None = None,
                     backend: str | None = None) -> Counts | None:
        """The other replicas' requests in flight now (for `model`, for `backend` only, if
        given), or None when unknown (Redis failing or slower than READ_DEADLINE)."""
        # orjson writes a name the same way every time: '["model",' starts the model's fields,
        # ',"backend"]' ends the backend's.
        want = b"" if model is None else orjson.dumps([model])[:-1] + b","
        tail = b"" if backend is None else b"," + orjson.dumps([backend])[1:]
        try:
            flat = await asyncio.wait_for(
                self._read(keys=[self._set], args=[self._hashes, self.replica, want, tail]),
                READ_DEADLINE)
        except TimeoutError:  # slow, not down: counted, and spend is not declined for it
            self.shared.on_error()
            return None
        except RedisError as exc:
            self.shared.failed(exc, "in-flight counts")
            return None
        self.shared.ok()
        return _parse(flat)

    async def _rewrite(self) -> None:
        mine = {_field(b, m): n for (b, m), n in self.mine().items() if n > 0}
        try:
            async with self.shared.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._hash)
                if mine:
                    pipe.hset(self._hash, mapping=mine)  # type: ignore[arg-type]
                    pipe.pexpire(self._hash, self._ttl_ms)
                    pipe.sadd(self._set, self.replica)
                await pipe.execute()
        except RedisError as exc:
            self.shared.failed(exc, "in-flight counts")

    async def _rewrite_loop(self) -> None:
        while True:
            await asyncio.sleep(self.shared.refresh_interval)
            await self._rewrite()


def _field(backend: str, model: str) -> bytes:
    """A count's field in a replica's hash (the read script matches its start and end)."""
    return orjson.dumps([model, backend])


def per_backend(counts: Counts) -> dict[str, dict[str, int]]:
    """The counts by backend, then model: one pass, however many sidecars take theirs."""
    out: dict[str, dict[str, int]] = {}
    for (backend, model), n in counts.items():
        out.setdefault(backend, {})[model] = n
    return out


def _parse(flat: list[bytes]) -> Counts:
    counts: Counts = {}
    for i in range(0, len(flat) - 1, 2):
        try:
            model, backend = orjson.loads(flat[i])
            n = int(flat[i + 1])
        except (orjson.JSONDecodeError, ValueError, TypeError):
            continue  # not ours (another version's layout): ignored, not fatal
        if n > 0 and isinstance(backend, str) and isinstance(model, str):
            key = (backend, model)
            counts[key] = counts.get(key, 0) + n
    return counts
