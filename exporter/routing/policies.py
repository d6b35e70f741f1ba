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

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

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
    router_in_flight: int = 0  # this router's unfinished requests there (this model)
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


@dataclass(slots=True)
class RequestTraits:
    model: str
    expected_output_tokens: int = 256  # from max_tokens / num_predict when given


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
    """Requests for this model that are at the backend and will be served before a new one."""
    if c.router_in_flight_at_poll is not None:
        # Own requests known exactly now; other clients' as the sidecar saw them at the poll.
        return c.router_in_flight + max(0, c.in_flight - c.router_in_flight_at_poll)
    return max(c.router_in_flight, c.in_flight + c.router_sent_since_poll)


def _estimate(c: Candidate, tokens: int, ttft: float, tpot: float, load: float) -> float:
    # See ExpectedWait for the formula.
    if c.is_cloud:
        return ttft
    decode = tokens * tpot
    # The sidecar's TTFT EWMA runs from arrival, so it also holds past queueing and loads;
    # capped at one decode's worth it stands in for the prompt time without counting the
    # queue twice.
    prefill = min(ttft, decode)
    service = prefill + decode
    slots = c.parallel if c.parallel > 0 else 1
    ahead = _queue_ahead(c)
    # With n ahead on s slots, n - s + 1 of them must finish before ours starts; the first of
    # those is half done on average.
    wait = (ahead - slots + 0.5) * service / slots if ahead >= slots else 0.0
    if c.loaded is False:
        wait += load
    elif c.loaded is None:
        wait += 0.5 * load  # unknown: could be either
    return wait + prefill


def expected_ttft(candidate: Candidate, request: RequestTraits) -> float:
    """Estimated seconds to first token at this candidate (see ExpectedWait); no fleet context,
    so unmeasured figures take the module defaults."""
    return _estimate(
        candidate,
        request.expected_output_tokens,
        candidate.ttft if candidate.ttft is not None else DEFAULT_TTFT_SECONDS,
        candidate.tpot if candidate.tpot is not None else DEFAULT_TPOT_SECONDS,
        candidate.load_seconds if candidate.load_seconds is not None else DEFAULT_LOAD_SECONDS,
    )


def _median(values: list[float], default: float) -> float:
    if not values:
        return default
    values.sort()
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


class ExpectedWait:
    """Smallest estimated time to first token, with two random choices among the best few.

    For a request expecting T output tokens, at a local candidate serving `parallel` = s at once:

        decode  = T x tpot
        prefill = min(ttft, decode)      # the TTFT EWMA includes past queueing: capped
        service = prefill + decode       # one request's time on the model
        n       = requests ahead         # own in flight (exact) + others' (as last polled)
        wait    = (n - s + 1/2) x service / s   if n >= s   else 0
        load    = load_seconds if not loaded, half of it if unknown, else 0
        E[TTFT] = wait + load + prefill

    Unmeasured ttft / tpot / load_seconds take the median of the other candidates for the same
    model, else pessimistic defaults. A cloud candidate's estimate is its TTFT EWMA.
    `expected_ttft` returns exactly E[TTFT].

    Ranking adds one thing to E[TTFT]: a load this request would start (not loaded, no
    request already queued there for it) costs `cold_penalty` x load_seconds, not 1 x. The
    load also evicts a model that someone else will have to reload and shares the GPU between
    one more model; charged at face value, a fleet under load keeps trading queue for loads
    and thrashes (in the simulator: 4x cut cold loads at 90% load by half and raised goodput
    by a third).

    The pick: the candidates whose cost is within `slack` x best + `slack_seconds` (at most
    `pool` of them) form a pool; two are drawn at random and the smaller cost wins. Several
    routers reading the same half-second-old state would otherwise all send their burst to the
    one backend that looked best. The rest follow by cost, in the usual tiers.
    """

    name = "expected_wait"

    def __init__(self, slack: float = 1.25, slack_seconds: float = 0.05, pool: int = 3,
                 cold_penalty: float = 4.0) -> None:
        self.slack = slack
        self.slack_seconds = slack_seconds
        self.pool = pool
        self.cold_penalty = cold_penalty

    def rank(
        self, candidates: Sequence[Candidate], request: RequestTraits, rng: random.Random
    ) -> list[Candidate]:
        tiers = _tiers(candidates)
        local = [c for tier in tiers for c in tier if not c.is_cloud]
        ttft = _median([c.ttft for c in local if c.ttft is not None], DEFAULT_TTFT_SECONDS)
        tpot = _median([c.tpot for c in local if c.tpot is not None], DEFAULT_TPOT_SECONDS)
        load = _median([c.load_seconds for c in local if c.load_seconds is not None],
                       DEFAULT_LOAD_SECONDS)
        tokens = request.expected_output_tokens
        est: dict[int, float] = {}
        for tier in tiers:
            for c in tier:
                c_load = c.load_seconds if c.load_seconds is not None else load
                e = _estimate(c, tokens, c.ttft if c.ttft is not None else ttft,
                              c.tpot if c.tpot is not None else tpot, c_load)
                if c.loaded is False and _queue_ahead(c) == 0:
                    e += (self.cold_penalty - 1.0) * c_load
                est[id(c)] = e

        def by_cost(tier: list[Candidate]) -> list[Candidate]:
            return sorted(tier, key=lambda c: est[id(c)])

        def two_of_the_best(tier: list[Candidate]) -> list[Candidate]:
            ordered = by_cost(tier)
            limit = est[id(ordered[0])] * self.slack + self.slack_seconds
            size = 1
            while size < len(ordered) and size < self.pool and est[id(ordered[size])] <= limit:
                size += 1
            if size > 1:
                i, j = rng.sample(range(size), 2)
                first = min(i, j)  # ordered by estimate: the lower index wins
                ordered.insert(0, ordered.pop(first))
            return ordered

        return _ranked(tiers, two_of_the_best, by_cost)


POLICIES: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "power_of_two": PowerOfTwo,
    "expected_wait": ExpectedWait,
    "random": RandomChoice,
}
DEFAULT_POLICY = "expected_wait"
