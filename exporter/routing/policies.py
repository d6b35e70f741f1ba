"""Routing policies: rank the backends that could serve one request, best first.

Pure and sans-IO: the router fills one `Candidate` per backend from its latest poll of that
sidecar's `/llmtap/v1/state` plus its own counters, calls `Policy.rank` once per request, and
tries the answer in order (first pick, then the retries). Nothing here awaits, reads a clock or
touches the network, so the discrete-event simulator in `benchmarks/routing/` drives exactly
this code.

Every policy puts the candidates in the same tiers and applies its own choice inside them:

1. healthy local backends known to have the model, with fresh state;
2. healthy local backends where that is unknown (`has_model is None`): maybe, tried after;
3. healthy cloud backends (the router's spill decision is its own, from `expected_ttft`);
4. stale ones (state older than the staleness limit): treated as saturated, usable last.

Unhealthy candidates and those known not to have the model are never returned.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# Stand-ins when neither the candidate nor any other candidate for the model has a measurement
# yet: deliberately pessimistic, so an unmeasured backend does not look free.
DEFAULT_TTFT_SECONDS = 1.0
DEFAULT_TPOT_SECONDS = 0.05
DEFAULT_LOAD_SECONDS = 10.0


@dataclass(slots=True)
class Candidate:
    backend: str  # backend id
    healthy: bool = True  # circuit breaker closed / probe allowed
    stale: bool = False  # state older than the staleness limit -> treat as saturated
    has_model: bool | None = None  # None = unknown
    loaded: bool | None = None  # model resident (None = unknown)
    waiting: int = 0  # sidecar-reported waiting for this model at last poll
    in_flight: int = 0  # sidecar-reported in flight for this model at last poll
    # This router's unfinished requests there (this model); with shared state (Redis) every
    # replica's, read before the decision: "this router" is then all the replicas.
    router_in_flight: int = 0
    router_sent_since_poll: int = 0  # this router's requests there for this model since that poll
    ttft: float | None = None  # EWMA seconds, this model, from the sidecar
    tpot: float | None = None  # EWMA seconds per output token
    load_seconds: float | None = None  # measured cold-load time for this model, if known
    parallel: int = 1  # requests the backend serves at once for this model (Ollama default 1)
    is_cloud: bool = False
    # router_in_flight as it was when the last poll was taken. With it, the sidecar's count
    # splits into this router's requests (known exactly, now) and other clients' (as polled);
    # None falls back to max(router_in_flight, in_flight + router_sent_since_poll).
    router_in_flight_at_poll: int | None = None
    # Measured by the sidecar, per model (EWMAs; None = not measured yet):
    service: float | None = None  # seconds one request occupies the model (start of work to end)
    prefill: float | None = None  # seconds of prompt processing per request
    prefill_per_token: float | None = None  # seconds per evaluated prompt token
    arrival_rate: float | None = None  # requests/s arriving there for this model, all clients
    state_age: float = 0.0  # seconds since the state above was polled


@dataclass(slots=True)
class RequestTraits:
    model: str
    # Output length assumed for the work queued ahead where no service time is measured yet.
    # Not the incoming request's max_tokens: its own length does not delay its first token.
    expected_output_tokens: int = 256
    prompt_tokens: int | None = None  # the incoming prompt's length (estimated: characters / 4)


class Policy(Protocol):
    name: str

    def rank(
        self, candidates: Sequence[Candidate], request: RequestTraits, rng: random.Random
    ) -> list[Candidate]:
        """Eligible candidates, best first (the router tries them in this order on retry).

        Unhealthy ones excluded; stale ones last."""
        ...


def _tiers(candidates: Sequence[Candidate]) -> list[list[Candidate]]:
    known: list[Candidate] = []
    maybe: list[Candidate] = []
    cloud: list[Candidate] = []
    stale: list[Candidate] = []
    for c in candidates:
        if not c.healthy or c.has_model is False:
            continue
        if c.stale:
            stale.append(c)
        elif c.is_cloud:
            cloud.append(c)
        elif c.has_model:
            known.append(c)
        else:
            maybe.append(c)
    return [known, maybe, cloud, stale]


def _outstanding(c: Candidate) -> int:
    # The sidecar's count at the last poll plus what this router added since: the simple load
    # measure of the classic policies (it overcounts requests that finished since the poll).
    return c.in_flight + c.router_sent_since_poll


Order = Callable[[list[Candidate]], list[Candidate]]


def _ranked(tiers: list[list[Candidate]], first: Order, rest: Order = list) -> list[Candidate]:
    """Every policy's shape: its choice is made inside the first non-empty tier (`first`
    orders that tier), the later tiers follow in `rest`'s order, for retries."""
    out: list[Candidate] = []
    for tier in tiers:
        if tier:
            out.extend(rest(tier) if out else first(tier))
    return out


class RandomChoice:
    """Uniform random choice: the textbook baseline (M/M/1 per server under Poisson arrivals)."""

    name = "random"

    def rank(
        self, candidates: Sequence[Candidate], request: RequestTraits, rng: random.Random
    ) -> list[Candidate]:
        def pick(tier: list[Candidate]) -> list[Candidate]:
            # The pick comes first; the rest keep their order.
            i = rng.randrange(len(tier))
            return [tier[i], *tier[:i], *tier[i + 1:]]

        return _ranked(_tiers(candidates), pick)


class RoundRobin:
    """Rotate over the eligible backends, one rotation per model; load is ignored."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def rank(
        self, candidates: Sequence[Candidate], request: RequestTraits, rng: random.Random
    ) -> list[Candidate]:
        def rotate(tier: list[Candidate]) -> list[Candidate]:
            turn = self._next.get(request.model, 0)
            self._next[request.model] = turn + 1
            i = turn % len(tier)
            return [*tier[i:], *tier[:i]]

        return _ranked(_tiers(candidates), rotate)


class LeastOutstanding:
    """Fewest outstanding requests for the model (sidecar's in flight + sent since the poll).

    Ties are broken at random so that equal backends share the load."""

    name = "least_outstanding"

    def rank(
        self, candidates: Sequence[Candidate], request: RequestTraits, rng: random.Random
    ) -> list[Candidate]:
        # Random tie-break: a random secondary key, drawn once per candidate.
        keys = {id(c): (_outstanding(c), rng.random()) for c in candidates}

        def least(tier: list[Candidate]) -> list[Candidate]:
            return sorted(tier, key=lambda c: keys[id(c)])

        return _ranked(_tiers(candidates), least, least)


class PowerOfTwo:
    """Sample two eligible backends, take the one with fewer outstanding requests.

    The supermarket model: two random choices cut the mean queue exponentially compared with
    one, without every router piling onto the same least-loaded backend."""

    name = "power_of_two"

    def rank(
        self, candidates: Sequence[Candidate], request: RequestTraits, rng: random.Random
    ) -> list[Candidate]:
        def by_load(tier: list[Candidate]) -> list[Candidate]:
            return sorted(tier, key=_outstanding)

        def two_choices(tier: list[Candidate]) -> list[Candidate]:
            if len(tier) == 1:
                return tier
            i, j = rng.sample(range(len(tier)), 2)
            a, b = tier[i], tier[j]
            if _outstanding(b) < _outstanding(a):
                a, b = b, a
            # Retries after the two sampled ones: least loaded first.
            return [a, b, *by_load([c for k, c in enumerate(tier) if k != i and k != j])]

        return _ranked(_tiers(candidates), two_choices, by_load)


def _queue_ahead(c: Candidate) -> int:
    """Requests for this model at the backend, known or polled, that a new one waits behind:
    this router's own (exact, now) and other clients' as the sidecar saw them at the poll."""
    if c.router_in_flight_at_poll is not None:
        return c.router_in_flight + max(0, c.in_flight - c.router_in_flight_at_poll)
    return max(c.router_in_flight, c.in_flight + c.router_sent_since_poll)


@dataclass(frozen=True, slots=True)
class Fleet:
    """What the other candidates for the model say, for a candidate that has not measured a
    figure yet (medians), and the share of the sidecars' requests sent by other clients."""

    ttft: float | None = None
    tpot: float | None = None
    load: float | None = None
    service: float | None = None
    prefill: float | None = None
    prefill_per_token: float | None = None
    others_share: float | None = None


NO_FLEET = Fleet()


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    values.sort()
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def fleet_figures(candidates: Sequence[Candidate]) -> Fleet:
    local = [c for c in candidates if not c.is_cloud]

    def median(field: str) -> float | None:
        return _median([v for c in local if (v := getattr(c, field)) is not None])

    # Other clients' share of what the sidecars had in flight at their polls: 0 for a router
    # alone, about (R - 1) / R for one of R equal replicas. Fleet-wide, because a backend that
    # was idle at its poll (the one every replica would pick) says nothing about it itself.
    polled = [c for c in local if c.router_in_flight_at_poll is not None and not c.stale]
    total = sum(c.in_flight for c in polled)
    others = sum(max(0, c.in_flight - (c.router_in_flight_at_poll or 0)) for c in polled)
    return Fleet(ttft=median("ttft"), tpot=median("tpot"), load=median("load_seconds"),
                 service=median("service"), prefill=median("prefill"),
                 prefill_per_token=median("prefill_per_token"),
                 others_share=others / total if total > 0 else None)


def _first(*values: float | None) -> float:
    for v in values:
        if v is not None:
            return v
    raise ValueError("no value")  # callers end with a default


def _others_since_poll(c: Candidate, share: float | None) -> float:
    """Requests other clients (other router replicas) probably sent there since the poll, from
    this backend alone: its arrival rate x the state's age, the others' share of it."""
    if not c.arrival_rate or c.state_age <= 0:
        return 0.0
    arrived = c.arrival_rate * c.state_age
    if share is not None:
        return share * arrived
    # No fleet to tell the share: all of it, less what this router itself sent.
    return max(0.0, arrived - c.router_sent_since_poll)


def _services_ahead(n: float, slots: int, running: int) -> float:
    """Services (of service / slots seconds each) before a slot frees, with n ahead.

    With k ahead on s slots, k - s of them must finish, and then the first in service: half
    its work is left on average when it is decoding, nearly all when the sidecar saw none of
    them past the first token (prefill or just begun). A fractional n (the estimate of other
    clients' sends) interpolates between the whole numbers around it."""
    head = 1.0 - 0.5 * min(1.0, running / slots)

    def whole(k: int) -> float:
        return k - slots + head if k >= slots else 0.0

    low = math.floor(n)
    frac = n - low
    return whole(low) if frac == 0 else (1 - frac) * whole(low) + frac * whole(low + 1)


@dataclass(slots=True)
class _Parts:
    """One candidate's estimate taken apart: E[TTFT] as a function of other clients' sends
    since the poll (`unseen`), which the ranking places over the whole fleet."""

    ahead: int  # requests ahead now, other clients' sends since the poll not counted
    slots: int
    running: int  # of the polled ones, past their first token
    service: float
    fixed: float  # the request's own prefill, plus the load where one is needed

    def ttft(self, unseen: float = 0.0) -> float:
        waits = _services_ahead(self.ahead + unseen, self.slots, self.running)
        return waits * self.service / self.slots + self.fixed


def _parts(c: Candidate, request: RequestTraits, fleet: Fleet, loads: bool) -> _Parts:
    # See ExpectedWait for the formula.
    ttft = _first(c.ttft, fleet.ttft, DEFAULT_TTFT_SECONDS)
    tpot = _first(c.tpot, fleet.tpot, DEFAULT_TPOT_SECONDS)
    tokens = request.expected_output_tokens
    # Without the server's prompt timings: the TTFT EWMA, capped at one decode's worth (it
    # holds past queueing and loads, which must not be counted twice).
    typical = _first(c.prefill, fleet.prefill, min(ttft, tokens * tpot))
    per_token = c.prefill_per_token if c.prefill_per_token is not None \
        else fleet.prefill_per_token
    own = request.prompt_tokens * per_token \
        if request.prompt_tokens is not None and per_token is not None else typical
    service = _first(c.service, fleet.service, typical + tokens * tpot)
    if loads and c.loaded is not True:
        load = _first(c.load_seconds, fleet.load, DEFAULT_LOAD_SECONDS)
        own += load if c.loaded is False else 0.5 * load  # unknown: could be either
    return _Parts(_queue_ahead(c), c.parallel if c.parallel > 0 else 1,
                  max(0, c.in_flight - c.waiting), service, own)


def _unseen_sends(candidates: Sequence[Candidate], parts: Sequence[_Parts | None],
                  costs: Sequence[float], share: float | None) -> list[float]:
    """Other clients' sends since each poll, placed where they would have put them.

    How many: each sidecar's arrival rate x its state's age x the others' share. Where: the
    other replicas rank the same backends by the same estimate, so their sends went, a little
    at a time, to whichever backend cost least then (water-filling), not in proportion to each
    backend's past rate (that would have every replica crowd the same few idle ones). Then
    the parts are weighted by each state's age (the total kept): a sidecar polled a moment
    ago has already shown this router what was sent to it."""
    unseen = [0.0] * len(candidates)
    fill = [i for i, c in enumerate(candidates)
            if parts[i] is not None and c.healthy and not c.stale and c.has_model is not False]
    total = sum(_others_since_poll(candidates[i], share) for i in fill)
    if total <= 0:
        return unseen
    steps = min(64, math.ceil(total / 0.02))
    chunk = total / steps
    heap = [(costs[i], i) for i in fill]
    heapq.heapify(heap)
    for _ in range(steps):
        _, i = heapq.heappop(heap)
        unseen[i] += chunk
        part = parts[i]
        assert part is not None
        heapq.heappush(heap, (costs[i] + part.ttft(unseen[i]) - part.ttft(), i))
    aged = [u * c.state_age for u, c in zip(unseen, candidates, strict=True)]
    weight = sum(aged)
    return [total * a / weight for a in aged] if weight > 0 else [0.0] * len(candidates)


def _estimates(candidates: Sequence[Candidate], request: RequestTraits, loads: bool = True,
               cold_penalty: float = 1.0) -> list[float]:
    """E[TTFT] of every candidate with the fleet's figures (cost: plus the cold penalty)."""
    fleet = fleet_figures([c for c in candidates if c.healthy and c.has_model is not False])
    parts: list[_Parts | None] = []
    base: list[float] = []
    for c in candidates:
        if c.is_cloud:
            parts.append(None)
            base.append(_first(c.ttft, fleet.ttft, DEFAULT_TTFT_SECONDS))
            continue
        part = _parts(c, request, fleet, loads)
        cost = part.ttft()
        if cold_penalty != 1.0 and c.loaded is False and part.ahead == 0:
            cost += (cold_penalty - 1.0) * _first(c.load_seconds, fleet.load,
                                                  DEFAULT_LOAD_SECONDS)
        parts.append(part)
        base.append(cost)
    unseen = _unseen_sends(candidates, parts, base, fleet.others_share)
    return [cost if part is None else cost + part.ttft(u) - part.ttft()
            for cost, part, u in zip(base, parts, unseen, strict=True)]


def expected_ttft(candidate: Candidate, request: RequestTraits) -> float:
    """Estimated seconds to first token at this candidate alone (see ExpectedWait): without
    the fleet, unmeasured figures take the module defaults and other clients' sends since
    the poll are this backend's arrival rate x the state's age, less this router's."""
    if candidate.is_cloud:
        return _first(candidate.ttft, DEFAULT_TTFT_SECONDS)
    part = _parts(candidate, request, NO_FLEET, True)
    return part.ttft(_others_since_poll(candidate, None))


def fleet_ttfts(candidates: Sequence[Candidate], request: RequestTraits,
                loads: bool = True) -> list[float]:
    """E[TTFT] of each candidate as ExpectedWait ranks them, without its cold penalty;
    `loads=False` leaves cold loads out. Stale state says nothing: infinite."""
    return [math.inf if c.stale else e
            for c, e in zip(candidates, _estimates(candidates, request, loads), strict=True)]


# vLLM with nothing waiting: a new request joins the running batch at the next step, and its
# limit (max_num_seqs, or the KV cache) is not in sight. As the cloud: room for anything.
UNSATURATED_PARALLEL = 1 << 20


def server_parallel(kind: str | None, queue: dict[str, Any]) -> int:
    """Requests the server runs at once, from what the sidecar polled of it: llama-server's
    slots; for an OpenAI-compatible server that publishes vLLM's scheduler gauges, what runs
    when requests wait (the batch is full), else no limit seen; else 1 (Ollama's default)."""
    slots = queue.get("slots_total")
    if isinstance(slots, int) and slots > 0:
        return slots
    running, waiting = queue.get("processing"), queue.get("deferred")
    if kind == "openai" and isinstance(running, int | float):
        if isinstance(waiting, int | float) and waiting > 0:
            return max(1, int(running))
        return UNSATURATED_PARALLEL
    return 1


class ExpectedWait:
    """Smallest estimated time to first token, two random choices among the near-best.

    For a local candidate serving `parallel` = s at once (each figure is the sidecar's EWMA
    for the model; where one is missing, the next line's stands in):

        prefill = prompt_tokens x prefill_per_token    # the incoming request's own prompt
                | prefill EWMA | min(ttft, T x tpot)    # (its length or the rate unknown)
        S       = service EWMA | prefill + T x tpot     # one queued request's time on the model
        n       = routers' in flight (exact, now) + other clients' (as polled) + u
        u       = other clients' sends since the poll (below)
        head    = 1 - running / (2 s)                   # what is left of the first in service
        wait    = (n - s + head) x S / s   if n >= s   else 0   (interpolated for fractional n)
        load    = load_seconds if not loaded, half of it if unknown, else 0
        E[TTFT] = wait + load + prefill

    T (`expected_output_tokens`) is the router's assumption for requests in general, used only
    where no service time is measured: the incoming request's max_tokens never enters (its
    own length does not delay its first token). `running` is the sidecar's count past the
    first token at the poll. Unmeasured figures take the median of the other candidates for
    the model, else pessimistic defaults. A cloud candidate's estimate is its TTFT EWMA.

    "Routers'" is this router's own requests, or with shared state every replica's (their
    counts in Redis, read before each decision): then the others' sends are known, their share
    below is about 0, and so is u. Without it:

    u, other router replicas' (and other clients') sends since the poll: in all, each
    sidecar's arrival rate x its state's age x the others' share (of everything the sidecars
    had in flight at their polls, the part that was not this router's: 0 alone, about 15/16
    for one of 16 replicas); placed where the others would have put them, a little at a time
    on whichever candidate then costs least, and weighted by each state's age (a sidecar polled
    a moment ago has shown what was sent to it). `fleet_ttfts` returns exactly E[TTFT];
    `expected_ttft`, for one candidate alone, takes u = rate x age - own sends since the poll.

    Ranking adds one thing to E[TTFT]: a load this request would start (not loaded, no
    request already queued there for it) costs `cold_penalty` x load_seconds, not 1 x. The
    load also evicts a model that someone else will have to reload and shares the GPU between
    one more model; charged at face value, a fleet under load keeps trading queue for loads
    and thrashes.

    The pick: every candidate whose cost is within `slack` x best + `slack_seconds` is in the
    pool (no cap); two are drawn at random and the smaller cost wins, ties at random. Several
    routers reading the same half-second-old state would otherwise all send their burst to
    the one backend that looked best; a capped pool, or ties broken by config order, makes
    every replica pick from the same few (the simulator's many-replica table).
    """

    name = "expected_wait"

    def __init__(self, slack: float = 1.25, slack_seconds: float = 0.0,
                 cold_penalty: float = 4.0, pool: int | None = None) -> None:
        self.slack = slack
        self.slack_seconds = slack_seconds
        self.cold_penalty = cold_penalty
        self.pool = pool  # None: no cap (a cap exists to show, in the simulator, why not)

    def costs(self, candidates: Sequence[Candidate], request: RequestTraits) -> list[float]:
        """Ranking cost per candidate: E[TTFT], a load it would start at cold_penalty x."""
        return _estimates(candidates, request, True, self.cold_penalty)

    def tie_break(self, rng: random.Random) -> float:
        """Secondary sort key: random, so that equal backends share the load."""
        return rng.random()

    def rank(
        self, candidates: Sequence[Candidate], request: RequestTraits, rng: random.Random
    ) -> list[Candidate]:
        keys = {id(c): (cost, self.tie_break(rng))
                for c, cost in zip(candidates, self.costs(candidates, request), strict=True)}

        def by_cost(tier: list[Candidate]) -> list[Candidate]:
            return sorted(tier, key=lambda c: keys[id(c)])

        def two_of_the_best(tier: list[Candidate]) -> list[Candidate]:
            ordered = by_cost(tier)
            limit = keys[id(ordered[0])][0] * self.slack + self.slack_seconds
            cap = len(ordered) if self.pool is None else min(self.pool, len(ordered))
            size = 1
            while size < cap and keys[id(ordered[size])][0] <= limit:
                size += 1
            if size > 1:
                i, j = rng.sample(range(size), 2)
                ordered.insert(0, ordered.pop(min(i, j)))  # by cost, then tie: lower wins
            return ordered

        return _ranked(_tiers(candidates), two_of_the_best, by_cost)


class ResidencyFirst:
    """Backends with the model loaded first, then fewest outstanding, ties at random.

    The strong simple baseline: it never starts a load while a resident copy exists, and
    balances by count among those (this router's requests there now, exactly, and other
    clients' as polled: in the simulator a little better than least_outstanding's count);
    blind to speed, prompt length and what the queue holds."""

    name = "residency_first"

    def rank(
        self, candidates: Sequence[Candidate], request: RequestTraits, rng: random.Random
    ) -> list[Candidate]:
        keys = {id(c): (c.loaded is not True, _queue_ahead(c), rng.random()) for c in candidates}

        def order(tier: list[Candidate]) -> list[Candidate]:
            return sorted(tier, key=lambda c: keys[id(c)])

        return _ranked(_tiers(candidates), order, order)


POLICIES: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "power_of_two": PowerOfTwo,
    "expected_wait": ExpectedWait,
    "residency_first": ResidencyFirst,
    "random": RandomChoice,
}
DEFAULT_POLICY = "expected_wait"
