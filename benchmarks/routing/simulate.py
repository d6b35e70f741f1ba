"""Discrete-event simulation of a routed fleet of local model servers, driving the real policies.

    python -m benchmarks.routing.simulate            # validation + comparison -> results.md
    python -m benchmarks.routing.simulate --quick    # a few seconds, prints only

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
- A request is prefill (TTFT ends there) then `tokens` x tpot of decode, both divided by the
  backend's speed share.
- Each backend has a sidecar keeping what `exporter/state.py` keeps: per model in flight,
  waiting (no first token yet), EWMAs (alpha 0.2) of TTFT measured from arrival (so it includes
  queueing and loads) and of TPOT, plus the measured cold-load time. The router sees that only
  through polls every `poll_interval` seconds (each backend on its own phase), and between polls
  knows only its own counts: in flight, sent since the poll.
- Arrivals: Poisson, or bursty (a two-state Markov-modulated Poisson process: bursts at 2.5x the
  mean rate a quarter of the time, 0.5x otherwise), at a fraction of the fleet's capacity.

The router calls `exporter.routing.policies.POLICIES[name]().rank(...)` for every request and
sends it to the first candidate: the code under test is the code that ships.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import sys
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.routing.policies import POLICIES, Candidate, Policy, RequestTraits
from exporter.state import ewma

ABSENT, LOADING, LOADED = 0, 1, 2
EV_ARRIVAL, EV_PHASE, EV_LOADED, EV_POLL = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    popularity: float
    prefill: float  # seconds of prompt processing at speed 1
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
    expected_tokens: int = 256  # what the router is told (no max_tokens in the request)
    slo: float = 10.0  # TTFT goal, seconds
    # Validation only: service time ~ Exp(mean 1 / speed), no prefill, every model resident,
    # and every server starts with an M/M/1-stationary queue so no long warm-up is needed.
    exponential: bool = False

    def mean_service(self) -> float:
        if self.exponential:
            return 1.0
        total = sum(m.popularity for m in self.models)
        return sum(m.popularity / total * (m.prefill + self.mean_tokens * m.tpot)
                   for m in self.models)

    def arrival_rate(self) -> float:
        return self.load * sum(self.speeds) / self.mean_service()


class _Req:
    __slots__ = ("arrival", "backend", "decode", "end", "first", "measured", "model", "phase",
                 "prefill", "remaining", "tokens")

    def __init__(self, model: int, arrival: float, prefill: float, decode: float, tokens: int,
                 measured: bool) -> None:
        self.model = model
        self.arrival = arrival
        self.prefill = prefill
        self.decode = decode
        self.tokens = tokens
        self.measured = measured
        self.first = -1.0
        self.end = -1.0
        self.phase = 0
        self.remaining = 0.0
        self.backend = -1


class _Runner:
    """One model on one backend: its queue, residency and the sidecar's figures for it."""

    __slots__ = ("current", "draining", "in_flight", "last_used", "later", "load_began",
                 "load_seconds", "queue", "state", "tpot", "ttft", "waiting")

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
    def __init__(self, scn: Scenario, policy: Policy, seed: int) -> None:
        self.scn = scn
        self.policy = policy
        # Separate streams: arrivals and request sizes are identical for every policy under one
        # seed (common random numbers), so policies are compared on the same traffic.
        self.rng_arrivals = random.Random(seed * 7919 + 1)
        self.rng_policy = random.Random(seed * 7919 + 2)
        self.rng_system = random.Random(seed * 7919 + 3)
        n_models = len(scn.models)
        self.backends = [_Backend(i, s, n_models) for i, s in enumerate(scn.speeds)]
        self.cands = [[Candidate(backend=f"b{i}", has_model=True, loaded=False)
                       for i in range(len(scn.speeds))] for _ in range(n_models)]
        self.index = {f"b{i}": i for i in range(len(scn.speeds))}
        self.traits = [RequestTraits(model=m.name, expected_output_tokens=scn.expected_tokens)
                       for m in scn.models]
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

    def run(self) -> RunResult:
        scn = self.scn
        for b in self.backends:
            self._initial(b)
        for b in self.backends:
            if not self.live:
                self._poll(b)
                self._push(self.rng_system.uniform(0, scn.poll_interval), EV_POLL, b)
            else:
                for m in range(len(scn.models)):
                    self._publish(b, m)
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
                self._poll(a)
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
                    self.cands[m][b.idx].router_in_flight += 1
            return
        # Start warm: backend i holds models i, i+1, ... (the warm-up absorbs the rest).
        for k in range(min(scn.resident_limit, len(scn.models))):
            r = b.runners[(b.idx + k) % len(scn.models)]
            r.state = LOADED
            b.resident += 1

    def _new_request(self, m: int, measured: bool) -> _Req:
        rng = self.rng_arrivals
        if self.scn.exponential:
            return _Req(m, self.now, 0.0, rng.expovariate(1.0), 1, measured)
        spec = self.scn.models[m]
        tokens = max(1, round(rng.gammavariate(2.0, self.scn.mean_tokens / 2.0)))
        return _Req(m, self.now, spec.prefill, tokens * spec.tpot, tokens, measured)

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
        ranked = self.policy.rank(self.cands[m], self.traits[m], self.rng_policy)
        chosen = ranked[0]
        chosen.router_in_flight += 1
        chosen.router_sent_since_poll += 1
        self._enqueue(self.backends[self.index[chosen.backend]], m, req)

    # -- backend -------------------------------------------------------------------------------

    def _enqueue(self, b: _Backend, m: int, req: _Req) -> None:
        req.backend = b.idx
        run = b.runners[m]
        run.in_flight += 1
        run.waiting += 1
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
        run.ttft = ewma(run.ttft, req.first - req.arrival)
        if req.tokens > 1:
            run.tpot = ewma(run.tpot, (req.end - req.first) / (req.tokens - 1))
        self.cands[m][b.idx].router_in_flight -= 1
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

    # -- what the router sees ------------------------------------------------------------------

    def _publish(self, b: _Backend, m: int) -> None:
        run = b.runners[m]
        c = self.cands[m][b.idx]
        c.in_flight = run.in_flight
        c.waiting = run.waiting
        c.loaded = run.state == LOADED
        c.ttft = run.ttft
        c.tpot = run.tpot
        c.load_seconds = run.load_seconds
        c.router_sent_since_poll = 0
        c.router_in_flight_at_poll = c.router_in_flight

    def _poll(self, b: _Backend) -> None:
        for m in range(len(b.runners)):
            self._publish(b, m)

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
    return _Sim(scn, factory(), seed).run()


# -- statistics ----------------------------------------------------------------------------------

# Two-sided 95% Student t quantiles by degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093,
        24: 2.064, 29: 2.045}


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (Student t over seeds)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan
    df = n - 1
    t = _T95.get(df) or next((_T95[k] for k in sorted(_T95, reverse=True) if k <= df), 1.96)
    if df > 29:
        t = 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(n)


# -- the experiments -----------------------------------------------------------------------------

FLEET_SPEEDS = (1.0, 1.0, 0.5, 2.0)
FLEET_MODELS = (
    ModelSpec("llama3.1:8b", 0.45, prefill=0.25, tpot=0.025, load=4.0),
    ModelSpec("qwen2.5:14b", 0.25, prefill=0.40, tpot=0.045, load=7.0),
    ModelSpec("mistral:7b", 0.18, prefill=0.20, tpot=0.022, load=4.0),
    ModelSpec("phi3:3.8b", 0.12, prefill=0.10, tpot=0.012, load=2.5),
)
COMPARED = ("round_robin", "least_outstanding", "power_of_two", "expected_wait", "random")
THEORY_RANDOM = 10.0  # M/M/1 at 0.9: 1 / (1 - 0.9)
THEORY_TWO = sum(0.9 ** (2**i - 2) for i in range(1, 12))  # supermarket model, d = 2: 2.61


@dataclass(slots=True)
class Validation:
    servers: int
    seeds: int
    requests: int
    random: tuple[float, float]  # mean time in system (service times), CI half-width
    two: tuple[float, float]


def validate(quick: bool = False) -> Validation:
    """Identical exponential servers at 90% load, state seen live: random vs two choices."""
    servers, seeds, requests = (40, 3, 12_000) if quick else (100, 5, 80_000)
    # Both start from the M/M/1 equilibrium; two choices drain the excess (about 6 requests
    # per server at 0.1 per unit time) within the 150 service times of warm-up.
    scn = Scenario(speeds=(1.0,) * servers, models=(ModelSpec("m", 1.0, 0.0, 0.0, 0.0),),
                   load=0.9, resident_limit=1, poll_interval=0.0, requests=requests,
                   warmup=round(150 * 0.9 * servers), exponential=True)
    rnd = [simulate(scn, "random", s).mean_sojourn for s in range(seeds)]
    two = [simulate(scn, "power_of_two", s).mean_sojourn for s in range(seeds)]
    return Validation(servers, seeds, requests, mean_ci(rnd), mean_ci(two))


def fleet(load: float, arrivals: str = "poisson", requests: int = 3000) -> Scenario:
    """The heterogeneous fleet with stale metrics: what the policies are compared on."""
    return Scenario(speeds=FLEET_SPEEDS, models=FLEET_MODELS, load=load, arrivals=arrivals,
                    requests=requests, warmup=requests // 4)


@dataclass(slots=True)
class Cell:
    arrivals: str
    load: float
    policy: str
    runs: list[RunResult] = field(default_factory=list)

    def stat(self, name: str) -> tuple[float, float]:
        return mean_ci([getattr(r, name) for r in self.runs])


def compare(loads: Sequence[float], arrivals: Sequence[str], seeds: int, requests: int,
            policies: Sequence[str] = COMPARED) -> list[Cell]:
    cells = []
    for pattern in arrivals:
        for load in loads:
            scn = fleet(load, pattern, requests)
            for name in policies:
                cell = Cell(pattern, load, name)
                cell.runs = [simulate(scn, name, s) for s in range(seeds)]
                cells.append(cell)
    return cells


def _fmt(stat: tuple[float, float], digits: int = 2) -> str:
    mean, half = stat
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def render(validation: Validation, cells: list[Cell], seeds: int, requests: int,
           command: str, seconds: float) -> str:
    v = validation
    f = fleet(0.9, requests=requests)
    lines = [
        "# Routing policies: simulation results",
        "",
        f"Made by `{command}` in {seconds:.0f} s (one core). Mean ± 95% CI over seeds.",
        "",
        "## Validation against theory",
        "",
        f"{v.servers} identical servers, exponential service (mean 1), Poisson arrivals at 90% "
        f"load, state seen live; {v.requests:,} measured requests per run, {v.seeds} seeds. "
        "Mean time in system, in service times:",
        "",
        "| policy | simulated | theory (N → ∞) |",
        "|---|---|---|",
        f"| random | {_fmt(v.random)} | {THEORY_RANDOM:.2f} (M/M/1) |",
        f"| power_of_two | {_fmt(v.two)} | {THEORY_TWO:.2f} (supermarket model, d = 2) |",
        "",
        "## Heterogeneous fleet, stale metrics",
        "",
        f"Backends at speeds {', '.join(f'{s:g}x' for s in FLEET_SPEEDS)}; models (popularity, "
        "prefill / TPOT at 1x, cold load): "
        + "; ".join(f"{m.name} ({m.popularity:.0%}, {m.prefill:g} s / {m.tpot * 1000:g} ms, "
                    f"{m.load:g} s)" for m in FLEET_MODELS)
        + f". Sequential per model, at most {f.resident_limit} resident per backend (LRU), "
        f"output tokens ~ Gamma(2) with mean {f.mean_tokens:g} (the router assumes "
        f"{f.expected_tokens}), state polled every {f.poll_interval:g} s. "
        f"{requests:,} measured requests per run after a warm-up, {seeds} seeds, the same "
        "traffic for every policy under one seed. Load is the offered fraction of the fleet's "
        "compute (cold loads come on top). TTFT in seconds; goodput = requests per second "
        f"whose TTFT met the SLO of {f.slo:g} s (in SLO = their share); cold = model "
        "loads per 1,000 requests.",
        "",
    ]
    patterns = sorted({c.arrivals for c in cells}, key=["poisson", "bursty"].index)
    for pattern in patterns:
        lines += [f"### {pattern.capitalize()} arrivals", "",
                  "| load | policy | p50 TTFT | p99 TTFT | goodput req/s | in SLO % | cold /1k |",
                  "|---|---|---|---|---|---|---|"]
        for c in cells:
            if c.arrivals != pattern:
                continue
            slo = c.stat("slo_fraction")
            lines.append(
                f"| {c.load:.0%} | {c.policy} | {_fmt(c.stat('p50_ttft'))} | "
                f"{_fmt(c.stat('p99_ttft'), 1)} | {_fmt(c.stat('goodput'), 3)} | "
                f"{slo[0] * 100:.1f} ± {slo[1] * 100:.1f} | {_fmt(c.stat('cold_per_1k'), 0)} |")
        lines.append("")
    lines += _verdict(cells)
    return "\n".join(lines) + "\n"


def _verdict(cells: list[Cell]) -> list[str]:
    """Paired over seeds (same traffic): does expected_wait beat each baseline?"""
    out = ["## expected_wait against the baselines, paired by seed", "",
           "Difference (baseline - expected_wait) in p99 TTFT (s) and (expected_wait - baseline) "
           "in goodput (req/s): positive = expected_wait better.", "",
           "| arrivals | load | vs | Δ p99 TTFT | Δ goodput |", "|---|---|---|---|---|"]
    by_key = {(c.arrivals, c.load, c.policy): c for c in cells}
    for (pattern, load, name), ew in by_key.items():
        if name != "expected_wait":
            continue
        for base in ("least_outstanding", "round_robin"):
            other = by_key.get((pattern, load, base))
            if other is None:
                continue
            d99 = [o.p99_ttft - e.p99_ttft for o, e in zip(other.runs, ew.runs, strict=True)]
            dgp = [e.goodput - o.goodput for o, e in zip(other.runs, ew.runs, strict=True)]
            out.append(f"| {pattern} | {load:.0%} | {base} | {_fmt(mean_ci(d99), 1)} | "
                       f"{_fmt(mean_ci(dgp), 3)} |")
    return [*out, ""]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a tiny run; prints, writes nothing")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=3000, help="measured per run")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.md"))
    args = parser.parse_args(argv)
    started = time.process_time()
    validation = validate(quick=args.quick)
    if args.quick:
        cells = compare([0.9], ["poisson"], seeds=2, requests=600)
        seeds, requests = 2, 600
    else:
        cells = compare([0.3, 0.6, 0.9, 1.1], ["poisson", "bursty"], args.seeds, args.requests)
        seeds, requests = args.seeds, args.requests
    command = "python -m benchmarks.routing.simulate" + (" --quick" if args.quick else "")
    if not args.quick and (args.seeds != 10 or args.requests != 3000):
        command += f" --seeds {args.seeds} --requests {args.requests}"
    text = render(validation, cells, seeds, requests, command, time.process_time() - started)
    if args.quick:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
