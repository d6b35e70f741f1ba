"""The discrete-event model of a routed fleet: backends, sidecars, router replicas.

What is modelled (one heap-ordered event loop, pure Python):

- Backends with different speeds. Each serves every model sequentially (`parallel` = 1, as
  Ollama does by default): one queue per model per backend, FIFO. Different resident models on
  one backend run at the same time but share its compute: each of the n busy models goes at
  speed / n (processor sharing).
- At most `resident_limit` models resident per backend. A request for an absent model triggers a
  cold load; when the backend is full, the least recently used idle model is evicted, and if none
  is idle, the least recently used one stops taking new work, drains what it had and is evicted
  (Ollama waits for a runner's requests to finish before unloading it). Requests for it that
  arrive meanwhile wait for a reload.
- A request is prefill (TTFT ends there: prompt tokens x the model's prefill cost per token)
  then `tokens` x tpot of decode, both divided by the backend's speed share. Prompt lengths are
  log-normal (a long tail of long prompts); the router is told each one within +-25% (it
  counts characters / 4).
- Each backend has a sidecar keeping what `exporter/state.py` keeps: per model in flight,
  waiting (no first token yet), EWMAs (alpha 0.2) of TTFT measured from arrival (so it includes
  queueing and loads), of TPOT, of the service time (start of work to end, as the server's own
  prompt + generation timings give it), of the prompt time and prompt tokens (their ratio: the
  seconds per prompt token), the measured cold-load time, and the decayed arrival rate
  (`exporter.state.ArrivalRate`).
- One or more router replicas, each with its own policy instance and its own counts (in
  flight, sent since the poll, in flight at the poll); arrivals go to a replica at random. A
  replica sees a sidecar only through polls every `poll_interval` seconds: each (replica,
  backend) pair on its own random phase, or all at the same instants (`aligned_polls`, the
  herd's worst case: every replica reads the same state at once). With `shared_in_flight`
  the replicas also share their in-flight counts at once (the router's `shared_state` in
  Redis): every replica's "router in flight" is all replicas' requests there, now and at
  the poll.
- Arrivals: Poisson, or bursty (a two-state Markov-modulated Poisson process: bursts at 2.5x the
  mean rate a quarter of the time, 0.5x otherwise), at a fraction of the fleet's capacity.

A replica calls `policy.rank(...)` of the real policies in `exporter.routing.policies` for
every request and sends it to the first candidate: the code under test is the code that ships.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from exporter.routing.policies import POLICIES, Candidate, Policy, RequestTraits
from exporter.state import ArrivalRate, ewma

ABSENT, LOADING, LOADED = 0, 1, 2
EV_ARRIVAL, EV_PHASE, EV_LOADED, EV_POLL = 0, 1, 2, 3
MAX_PROMPT_TOKENS = 16_384


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    popularity: float
    prefill_per_token: float  # seconds of prompt processing per token at speed 1
    tpot: float  # seconds per output token at speed 1
    load: float  # seconds of cold load (disk-bound: independent of the backend's speed)


@dataclass(frozen=True, slots=True)
class Scenario:
    speeds: tuple[float, ...]
    models: tuple[ModelSpec, ...]
    load: float  # offered load as a fraction of the fleet's compute capacity
    arrivals: str = "poisson"  # or "bursty"
    resident_limit: int = 2
    poll_interval: float = 0.5  # 0: the router sees every sidecar change at once
    requests: int = 4000  # measured arrivals
    warmup: int = 1000  # arrivals before those, not measured
    mean_tokens: float = 150.0
    expected_tokens: int = 256  # what the router assumes where no service time is measured
    # Prompt tokens ~ log-normal with this mean and shape (sigma of the log): median 0.61 x
    # the mean, 1% over 6 x the mean.
    mean_prompt_tokens: float = 500.0
    prompt_sigma: float = 1.0
    slo: float = 10.0  # TTFT goal, seconds
    replicas: int = 1  # router replicas, each with its own counts and policy instance
    aligned_polls: bool = False  # every replica polls every backend at the same instants
    shared_in_flight: bool = False  # the replicas' in-flight counts shared (Redis), exactly
    # Validation only: service time ~ Exp(mean 1 / speed), no prefill, every model resident,
    # and every server starts with an M/M/1-stationary queue so no long warm-up is needed.
    exponential: bool = False

    def mean_service(self) -> float:
        if self.exponential:
            return 1.0
        total = sum(m.popularity for m in self.models)
        return sum(m.popularity / total * (m.prefill_per_token * self.mean_prompt_tokens
                                           + self.mean_tokens * m.tpot)
                   for m in self.models)

    def arrival_rate(self) -> float:
        return self.load * sum(self.speeds) / self.mean_service()


class _Req:
    __slots__ = (
        "arrival",
        "backend",
        "decode",
        "end",
        "first",
        "measured",
        "model",
        "phase",
        "prefill",
        "prompt",
        "remaining",
        "replica",
        "started",
        "tokens",
        "told",
    )

    def __init__(self, model: int, arrival: float, prefill: float, decode: float, tokens: int,
                 measured: bool, prompt: int = 0, told: int | None = None) -> None:
        self.model = model
        self.arrival = arrival
        self.prefill = prefill
        self.decode = decode
        self.tokens = tokens
        self.prompt = prompt
        self.told = told  # the prompt length the router is told
        self.measured = measured
        self.first = -1.0
        self.end = -1.0
        self.started = -1.0
        self.phase = 0
        self.remaining = 0.0
        self.backend = -1
        self.replica = 0


class _Runner:
    """One model on one backend: its queue, residency and the sidecar's figures for it."""

    __slots__ = ("current", "draining", "in_flight", "last_used", "later", "load_began",
                 "load_seconds", "prompt_seconds", "prompt_tokens", "queue", "rate", "service",
                 "state", "tpot", "ttft", "waiting")

    def __init__(self) -> None:
        self.state = ABSENT
        self.queue: deque[_Req] = deque()
        self.later: deque[_Req] = deque()  # arrived while draining for eviction
        self.current: _Req | None = None
        self.draining = False
        self.last_used = 0.0
        self.load_began = 0.0
        self.in_flight = 0
        self.waiting = 0
        self.ttft: float | None = None
        self.tpot: float | None = None
        self.load_seconds: float | None = None
        self.service: float | None = None
        self.prompt_seconds: float | None = None
        self.prompt_tokens: float | None = None
        self.rate = ArrivalRate()


class _Backend:
    __slots__ = ("active", "idx", "pending", "resident", "runners", "speed", "t", "version")

    def __init__(self, idx: int, speed: float, n_models: int) -> None:
        self.idx = idx
        self.speed = speed
        self.runners = [_Runner() for _ in range(n_models)]
        self.resident = 0
        self.pending: deque[int] = deque()  # models waiting for a resident slot
        self.active: list[_Req] = []
        self.t = 0.0  # when `remaining` of the active requests was last brought up to date
        self.version = 0  # phase-end events from before the last change are ignored


@dataclass(slots=True)
class RunResult:
    p50_ttft: float
    p99_ttft: float
    mean_ttft: float
    mean_sojourn: float  # arrival to last token
    goodput: float  # measured requests with TTFT <= SLO, per second of the arrival window
    slo_fraction: float
    cold_per_1k: float
    events: int


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    # Nearest rank.
    return sorted_values[max(0, math.ceil(p * len(sorted_values)) - 1)]


class _Sim:
    def __init__(self, scn: Scenario, factory: Callable[[], Policy], seed: int) -> None:
        self.scn = scn
        n_replicas = max(1, scn.replicas)
        self.policies = [factory() for _ in range(n_replicas)]
        # Separate streams: arrivals and request sizes are identical for every policy under one
        # seed (common random numbers), so policies are compared on the same traffic.
        self.rng_arrivals = random.Random(seed * 7919 + 1)
        self.rng_policy = random.Random(seed * 7919 + 2)
        self.rng_system = random.Random(seed * 7919 + 3)
        self.rng_replica = random.Random(seed * 7919 + 4)
        n_models = len(scn.models)
        n_backends = len(scn.speeds)
        self.backends = [_Backend(i, s, n_models) for i, s in enumerate(scn.speeds)]
        # cands[replica][model][backend]: what that replica knows of that sidecar.
        self.cands = [[[Candidate(backend=f"b{i}", has_model=True, loaded=False)
                        for i in range(n_backends)] for _ in range(n_models)]
                      for _ in range(n_replicas)]
        self.polled_at = [[0.0] * n_backends for _ in range(n_replicas)]
        # fleet[model][backend]: every replica's requests in flight there (shared mode's view).
        self.fleet = [[0] * n_backends for _ in range(n_models)]
        self.shared = scn.shared_in_flight
        self.index = {f"b{i}": i for i in range(n_backends)}
        total = sum(m.popularity for m in scn.models)
        acc, self.cum = 0.0, []
        for m in scn.models:
            acc += m.popularity / total
            self.cum.append(acc)
        self.heap: list[tuple[float, int, int, Any, Any, int]] = []
        self.seq = 0
        self.now = 0.0
        self.rate = scn.arrival_rate()
        self.bursty = scn.arrivals == "bursty"
        self.burst_on = False
        self.next_switch = self._dwell(False) if self.bursty else math.inf
        self.n_arrived = 0
        self.measured: list[_Req] = []
        self.unfinished = scn.requests
        self.window = [math.inf, -math.inf]
        self.loads: list[float] = []  # start times of cold loads
        self.live = scn.poll_interval <= 0

    # -- events --------------------------------------------------------------------------------

    def _push(self, t: float, kind: int, a: Any = None, b: Any = None, c: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b, c))

    def _dwell(self, on: bool) -> float:
        # Bursts: 20 s mean at 2.5x; lulls: 60 s mean at 0.5x -> mean rate 1.0x.
        return self.rng_arrivals.expovariate(1 / 20.0 if on else 1 / 60.0)

    def _next_arrival(self, t: float) -> float:
        rng = self.rng_arrivals
        if not self.bursty:
            return t + rng.expovariate(self.rate)
        while True:
            gap = rng.expovariate(self.rate * (2.5 if self.burst_on else 0.5))
            if t + gap < self.next_switch:
                return t + gap
            # Memoryless: restart the gap from the switch at the new rate.
            t = self.next_switch
            self.burst_on = not self.burst_on
            self.next_switch = t + self._dwell(self.burst_on)

    def _schedule_polls(self) -> None:
        scn = self.scn
        pairs = [(r, b) for r in range(len(self.policies)) for b in range(len(self.backends))]
        for r, b in pairs:
            self._poll(r, self.backends[b])
        if scn.aligned_polls:
            self._push(self.rng_system.uniform(0, scn.poll_interval), EV_POLL, pairs)
            return
        for pair in pairs:
            self._push(self.rng_system.uniform(0, scn.poll_interval), EV_POLL, [pair])

    def run(self) -> RunResult:
        scn = self.scn
        for b in self.backends:
            self._initial(b)
        if self.live:
            for b in self.backends:
                for m in range(len(scn.models)):
                    self._publish(b, m)
        else:
            self._schedule_polls()
        self._push(self._next_arrival(0.0), EV_ARRIVAL)
        heap = self.heap
        pop = heapq.heappop
        events = 0
        while self.unfinished > 0:
            t, _, kind, a, b, c = pop(heap)
            self.now = t
            events += 1
            if kind == EV_PHASE:
                if c == a.version:
                    self._phase_end(a, b)
            elif kind == EV_ARRIVAL:
                self._arrival()
                self._push(self._next_arrival(t), EV_ARRIVAL)
            elif kind == EV_POLL:
                for r, i in a:
                    self._poll(r, self.backends[i])
                self._push(t + scn.poll_interval, EV_POLL, a)
            else:
                self._load_done(a, b)
        return self._result(events)

    def _initial(self, b: _Backend) -> None:
        scn = self.scn
        if scn.exponential:
            for m, r in enumerate(b.runners):
                r.state = LOADED
                b.resident += 1
                # Queue length ~ geometric(load): M/M/1 in equilibrium (the random-choice
                # answer; two choices relax from there within a few service times).
                for _ in range(int(math.log(self.rng_system.random()) / math.log(scn.load))):
                    self._enqueue(b, m, self._new_request(m, measured=False))
                    self.cands[0][m][b.idx].router_in_flight += 1
                    self.fleet[m][b.idx] += 1
            return
        # Start warm: backend i holds models i, i+1, ... (the warm-up absorbs the rest).
        for k in range(min(scn.resident_limit, len(scn.models))):
            r = b.runners[(b.idx + k) % len(scn.models)]
            r.state = LOADED
            b.resident += 1

    def _new_request(self, m: int, measured: bool) -> _Req:
        rng = self.rng_arrivals
        scn = self.scn
        if scn.exponential:
            return _Req(m, self.now, 0.0, rng.expovariate(1.0), 1, measured)
        spec = scn.models[m]
        tokens = max(1, round(rng.gammavariate(2.0, scn.mean_tokens / 2.0)))
        sigma = scn.prompt_sigma
        prompt = min(MAX_PROMPT_TOKENS, max(1, round(rng.lognormvariate(
            math.log(scn.mean_prompt_tokens) - sigma * sigma / 2, sigma))))
        told = max(1, round(prompt * rng.uniform(0.75, 1.25)))
        return _Req(m, self.now, prompt * spec.prefill_per_token, tokens * spec.tpot, tokens,
                    measured, prompt, told)

    def _arrival(self) -> None:
        scn = self.scn
        i = self.n_arrived
        self.n_arrived += 1
        m = bisect_right(self.cum, self.rng_arrivals.random())
        if m >= len(self.cum):
            m = len(self.cum) - 1
        measured = scn.warmup <= i < scn.warmup + scn.requests
        req = self._new_request(m, measured)
        if measured:
            self.measured.append(req)
            self.window[0] = min(self.window[0], self.now)
            self.window[1] = self.now
        r = self.rng_replica.randrange(len(self.policies)) if len(self.policies) > 1 else 0
        req.replica = r
        cands = self.cands[r][m]
        if not self.live:
            polled = self.polled_at[r]
            for k, c in enumerate(cands):
                c.state_age = self.now - polled[k]
        if self.shared:
            for k, c in enumerate(cands):
                c.router_in_flight = self.fleet[m][k]
        traits = RequestTraits(model=scn.models[m].name, expected_output_tokens=scn.expected_tokens,
                               prompt_tokens=req.told)
        chosen = self.policies[r].rank(cands, traits, self.rng_policy)[0]
        chosen.router_in_flight += 1
        chosen.router_sent_since_poll += 1
        b = self.index[chosen.backend]
        self.fleet[m][b] += 1
        self._enqueue(self.backends[b], m, req)

    # -- backend -------------------------------------------------------------------------------

    def _enqueue(self, b: _Backend, m: int, req: _Req) -> None:
        req.backend = b.idx
        run = b.runners[m]
        run.in_flight += 1
        run.waiting += 1
        run.rate.arrived(self.now)
        if run.draining:
            run.later.append(req)
        else:
            run.queue.append(req)
            if run.state == LOADED:
                if run.current is None:
                    self._start(b, m)
            elif run.state == ABSENT and m not in b.pending:
                self._need_load(b, m)
        if self.live:
            self._publish(b, m)

    def _need_load(self, b: _Backend, m: int) -> None:
        if b.resident < self.scn.resident_limit:
            self._begin_load(b, m)
            return
        b.pending.append(m)
        self._make_room(b)

    def _make_room(self, b: _Backend) -> None:
        """Evict the LRU idle model now; else mark the LRU busy one to drain (one at a time)."""
        idle, busy = None, None
        for k, r in enumerate(b.runners):
            if r.state != LOADED:
                continue
            if r.current is None and not r.queue:
                if idle is None or r.last_used < b.runners[idle].last_used:
                    idle = k
            elif r.draining:
                busy = -1
            elif busy is None or (busy >= 0 and r.last_used < b.runners[busy].last_used):
                busy = k
        if idle is not None:
            self._evict(b, idle)
        elif busy is not None and busy >= 0:
            b.runners[busy].draining = True

    def _evict(self, b: _Backend, m: int) -> None:
        run = b.runners[m]
        run.state = ABSENT
        run.draining = False
        b.resident -= 1
        if self.live:
            self._publish(b, m)
        if b.pending:
            self._begin_load(b, b.pending.popleft())
        if run.later:  # requests that came while it drained need it back
            run.queue.extend(run.later)
            run.later.clear()
            b.pending.append(m)
        if b.pending:
            self._make_room(b)
        else:  # nothing waits for room any more: whoever still drains may keep its model
            for r in b.runners:
                if r.draining:
                    r.draining = False
                    r.queue.extend(r.later)
                    r.later.clear()

    def _begin_load(self, b: _Backend, m: int) -> None:
        run = b.runners[m]
        run.state = LOADING
        run.load_began = self.now
        b.resident += 1
        if self.window[0] <= self.now and self.unfinished > 0:
            self.loads.append(self.now)
        seconds = self.scn.models[m].load * self.rng_system.uniform(0.9, 1.1)
        self._push(self.now + seconds, EV_LOADED, b, m)

    def _load_done(self, b: _Backend, m: int) -> None:
        run = b.runners[m]
        run.state = LOADED
        run.last_used = self.now
        # The sidecar measures it (llmtap_model_load_duration_seconds); the router learns it.
        run.load_seconds = ewma(run.load_seconds, self.now - run.load_began)
        if run.queue:
            self._start(b, m)
        if b.pending:
            self._make_room(b)
        if self.live:
            self._publish(b, m)

    def _sync(self, b: _Backend) -> None:
        """Bring the active requests' remaining work up to now (processor sharing)."""
        active = b.active
        if active:
            done = (self.now - b.t) * b.speed / len(active)
            for r in active:
                r.remaining -= done
        b.t = self.now

    def _reschedule(self, b: _Backend) -> None:
        b.version += 1
        active = b.active
        if not active:
            return
        per = len(active) / b.speed  # seconds per unit of work, each
        for r in active:
            self._push(self.now + max(r.remaining, 0.0) * per, EV_PHASE, b, r, b.version)

    def _start(self, b: _Backend, m: int) -> None:
        run = b.runners[m]
        req = run.queue.popleft()
        run.current = req
        run.last_used = self.now
        req.started = self.now
        self._sync(b)
        if req.prefill > 0:
            req.phase, req.remaining = 0, req.prefill
        else:  # nothing to prefill: the first token comes as work begins
            self._first_token(run, req)
            req.phase, req.remaining = 1, req.decode
        b.active.append(req)
        self._reschedule(b)

    def _first_token(self, run: _Runner, req: _Req) -> None:
        req.first = self.now
        run.waiting -= 1

    def _phase_end(self, b: _Backend, req: _Req) -> None:
        self._sync(b)
        m = req.model
        run = b.runners[m]
        if req.phase == 0:
            self._first_token(run, req)
            req.phase, req.remaining = 1, req.decode
            self._reschedule(b)
            if self.live:
                self._publish(b, m)
            return
        # Finished.
        req.end = self.now
        b.active.remove(req)
        run.current = None
        run.last_used = self.now
        run.in_flight -= 1
        self._measure(run, req)
        self.cands[req.replica][m][b.idx].router_in_flight -= 1
        self.fleet[m][b.idx] -= 1
        if req.measured:
            self.unfinished -= 1
        if run.draining and not run.queue:
            self._evict(b, m)
        elif run.queue:
            self._start(b, m)
        if b.pending:  # busy models never go idle under overload: make room by draining one
            self._make_room(b)
        self._reschedule(b)
        if self.live:
            self._publish(b, m)

    def _measure(self, run: _Runner, req: _Req) -> None:
        """What the sidecar learns from a finished request (exporter/state.py's EWMAs)."""
        run.ttft = ewma(run.ttft, req.first - req.arrival)
        if req.tokens > 1:
            run.tpot = ewma(run.tpot, (req.end - req.first) / (req.tokens - 1))
        # The server's prompt + generation timings: start of work to the end.
        run.service = ewma(run.service, req.end - req.started)
        if req.prompt > 0:
            run.prompt_seconds = ewma(run.prompt_seconds, req.first - req.started)
            run.prompt_tokens = ewma(run.prompt_tokens, float(req.prompt))

    # -- what the router sees ------------------------------------------------------------------

    def _view(self, c: Candidate, run: _Runner, fleet: int) -> None:
        c.in_flight = run.in_flight
        c.waiting = run.waiting
        c.loaded = run.state == LOADED
        c.ttft = run.ttft
        c.tpot = run.tpot
        c.load_seconds = run.load_seconds
        c.service = run.service
        c.prefill = run.prompt_seconds
        c.prefill_per_token = run.prompt_seconds / run.prompt_tokens \
            if run.prompt_seconds is not None and run.prompt_tokens else None
        c.arrival_rate = run.rate.rate(self.now)
        c.router_sent_since_poll = 0
        c.router_in_flight_at_poll = fleet if self.shared else c.router_in_flight

    def _publish(self, b: _Backend, m: int) -> None:
        """Live mode: every replica sees the change at once."""
        run = b.runners[m]
        for cands in self.cands:
            self._view(cands[m][b.idx], run, self.fleet[m][b.idx])

    def _poll(self, r: int, b: _Backend) -> None:
        self.polled_at[r][b.idx] = self.now
        cands = self.cands[r]
        for m, run in enumerate(b.runners):
            self._view(cands[m][b.idx], run, self.fleet[m][b.idx])

    def _result(self, events: int) -> RunResult:
        reqs = self.measured
        ttfts = sorted(r.first - r.arrival for r in reqs)
        slo = self.scn.slo
        good = sum(1 for x in ttfts if x <= slo)
        span = max(self.window[1] - self.window[0], 1e-9)
        lo, hi = self.window
        cold = sum(1 for t in self.loads if lo <= t <= hi)
        return RunResult(
            p50_ttft=_percentile(ttfts, 0.50),
            p99_ttft=_percentile(ttfts, 0.99),
            mean_ttft=statistics.fmean(ttfts),
            mean_sojourn=statistics.fmean(r.end - r.arrival for r in reqs),
            goodput=good / span,
            slo_fraction=good / len(ttfts),
            cold_per_1k=1000.0 * cold / len(reqs),
            events=events,
        )


def simulate(scn: Scenario, policy: str | Callable[[], Policy], seed: int) -> RunResult:
    factory = POLICIES[policy] if isinstance(policy, str) else policy
    return _Sim(scn, factory, seed).run()
