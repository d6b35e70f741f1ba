"""Routing policies: each one's decisions, and the simulator that benchmarks them."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from benchmarks.routing import simulate
from exporter.routing.policies import (
    DEFAULT_POLICY,
    POLICIES,
    Candidate,
    ExpectedWait,
    LeastOutstanding,
    PowerOfTwo,
    RandomChoice,
    RequestTraits,
    RoundRobin,
    expected_ttft,
)

REQ = RequestTraits(model="llama3.1:8b", expected_output_tokens=100)


def local(name: str, **kw: object) -> Candidate:
    defaults: dict[str, object] = {"has_model": True, "loaded": True, "ttft": 0.2, "tpot": 0.02}
    defaults.update(kw)
    return Candidate(backend=name, **defaults)  # type: ignore[arg-type]


def names(ranked: list[Candidate]) -> list[str]:
    return [c.backend for c in ranked]


def firsts(policy_name: str, cands: list[Candidate], n: int = 400, seed: int = 1) -> Counter[str]:
    policy = POLICIES[policy_name]()
    rng = random.Random(seed)
    return Counter(policy.rank(cands, REQ, rng)[0].backend for _ in range(n))


def test_registry() -> None:
    assert set(POLICIES) == {"round_robin", "least_outstanding", "power_of_two",
                             "expected_wait", "random"}
    assert DEFAULT_POLICY == "expected_wait"
    for name, factory in POLICIES.items():
        assert factory().name == name


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_tiers_the_same_way(name: str) -> None:
    cands = [
        local("stale", stale=True),
        local("sick", healthy=False),
        local("lacks", has_model=False),
        local("cloud", is_cloud=True),
        local("maybe", has_model=None),
        local("a"),
        local("b", in_flight=3),
    ]
    ranked = names(POLICIES[name]().rank(cands, REQ, random.Random(3)))
    assert "sick" not in ranked and "lacks" not in ranked
    assert set(ranked[:2]) == {"a", "b"}
    assert ranked[2:] == ["maybe", "cloud", "stale"]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_only_stale_or_nothing(name: str) -> None:
    policy = POLICIES[name]()
    assert names(policy.rank([local("s", stale=True)], REQ, random.Random(0))) == ["s"]
    assert policy.rank([local("x", healthy=False)], REQ, random.Random(0)) == []
    assert policy.rank([], REQ, random.Random(0)) == []


def test_round_robin_rotates_per_model_and_ignores_load() -> None:
    rr = RoundRobin()
    cands = [local("a", in_flight=50), local("b"), local("c")]
    rng = random.Random(0)
    seen = [rr.rank(cands, REQ, rng)[0].backend for _ in range(6)]
    assert seen == ["a", "b", "c", "a", "b", "c"]
    # Another model has its own rotation.
    other = RequestTraits(model="qwen2.5:14b")
    assert rr.rank(cands, other, rng)[0].backend == "a"
    assert names(rr.rank(cands, REQ, rng)) == ["a", "b", "c"]


def test_least_outstanding_counts_sent_since_poll_and_breaks_ties_at_random() -> None:
    lo = LeastOutstanding()
    cands = [local("a", in_flight=2), local("b", in_flight=0, router_sent_since_poll=3),
             local("c", in_flight=1)]
    assert names(lo.rank(cands, REQ, random.Random(0))) == ["c", "a", "b"]
    tied = [local("a", in_flight=1), local("b", in_flight=1), local("c", in_flight=4)]
    counts = firsts("least_outstanding", tied)
    assert set(counts) == {"a", "b"} and min(counts.values()) > 120


def test_power_of_two_never_picks_the_worst_of_three() -> None:
    cands = [local("a", in_flight=0), local("b", in_flight=2), local("c", in_flight=5)]
    counts = firsts("power_of_two", cands, n=600)
    assert "c" not in counts
    # The least loaded wins whenever it is sampled: 2 of the 3 pairs.
    assert 330 < counts["a"] < 470
    ranked = names(PowerOfTwo().rank(cands, REQ, random.Random(5)))
    assert sorted(ranked) == ["a", "b", "c"]


def test_random_is_uniform_over_eligible() -> None:
    counts = firsts("random", [local("a"), local("b"), local("c", in_flight=9)], n=900)
    assert all(240 < counts[k] < 360 for k in "abc")
    assert len(RandomChoice().rank([local("a"), local("b")], REQ, random.Random(1))) == 2


def test_expected_ttft_formula() -> None:
    # Idle and loaded: just the prompt time, capped TTFT EWMA.
    assert expected_ttft(local("a", ttft=0.3, tpot=0.02), REQ) == pytest.approx(0.3)
    # Two ahead on one slot: 1.5 services of (0.3 + 100 x 0.02) = 3.45, plus own 0.3.
    busy = local("a", ttft=0.3, tpot=0.02, router_in_flight=2)
    assert expected_ttft(busy, REQ) == pytest.approx(1.5 * 2.3 + 0.3)
    # Two slots, two ahead: half a service / 2 slots.
    assert expected_ttft(local("a", ttft=0.3, tpot=0.02, router_in_flight=2, parallel=2),
                         REQ) == pytest.approx(0.5 * 2.3 / 2 + 0.3)
    # Cold: plus the measured load; unknown residency: half of it.
    assert expected_ttft(local("a", ttft=0.3, tpot=0.02, loaded=False, load_seconds=6.0),
                         REQ) == pytest.approx(6.3)
    assert expected_ttft(local("a", ttft=0.3, tpot=0.02, loaded=None, load_seconds=6.0),
                         REQ) == pytest.approx(3.3)
    # A TTFT EWMA inflated by past queueing counts at most one decode's worth.
    assert expected_ttft(local("a", ttft=30.0, tpot=0.02), REQ) == pytest.approx(2.0)
    # Cloud: its TTFT EWMA.
    assert expected_ttft(local("a", is_cloud=True, ttft=0.9), REQ) == pytest.approx(0.9)


def test_queue_ahead_uses_own_counts_and_others_as_polled() -> None:
    # Polled 4 in flight of which 3 were ours; 2 of ours left now -> 2 + 1 others = 3 ahead.
    c = local("a", ttft=0.0, tpot=0.01, in_flight=4, router_in_flight_at_poll=3,
              router_in_flight=2)
    assert expected_ttft(c, REQ) == pytest.approx(2.5 * 1.0)
    # Without the snapshot: the larger of own in flight and polled + sent since.
    c = local("a", ttft=0.0, tpot=0.01, in_flight=4, router_sent_since_poll=1,
              router_in_flight=2)
    assert expected_ttft(c, REQ) == pytest.approx(4.5 * 1.0)


def test_expected_wait_prefers_loaded_until_its_queue_costs_more_than_a_load() -> None:
    face_value = ExpectedWait(cold_penalty=1.0)
    warm = local("warm", router_in_flight=1)  # 0.5 x 2.2 + 0.2 = 1.3 s
    cold = local("cold", loaded=False, load_seconds=5.0)  # 5 + 0.2 = 5.2 s
    assert face_value.rank([cold, warm], REQ, random.Random(0))[0].backend == "warm"
    swamped = local("warm", router_in_flight=8)  # 7.5 x 2.2 + 0.2 = 16.7 s
    assert face_value.rank([cold, swamped], REQ, random.Random(0))[0].backend == "cold"
    # By default a load it would start counts 4x (eviction, reload, shared GPU): 20.2 s.
    default = ExpectedWait()
    assert default.rank([cold, swamped], REQ, random.Random(0))[0].backend == "warm"
    very = local("warm", router_in_flight=12)  # 11.5 x 2.2 + 0.2 = 25.5 s
    assert default.rank([cold, very], REQ, random.Random(0))[0].backend == "cold"


def test_expected_wait_charges_only_the_load_this_request_would_start() -> None:
    # A load already under way (a request of ours is there) is not penalised again.
    ew = ExpectedWait(cold_penalty=4.0)
    starting = local("starting", loaded=False, load_seconds=5.0, router_in_flight=1)
    fresh = local("fresh", loaded=False, load_seconds=5.0)
    assert ew.rank([fresh, starting], REQ, random.Random(0))[0].backend == "starting"


def test_expected_wait_weighs_queues_by_speed() -> None:
    # Same queue, one backend decodes twice as fast: it wins every time (outside the pool).
    fast = local("fast", tpot=0.01, ttft=0.1, router_in_flight=2)
    slow = local("slow", tpot=0.04, ttft=0.4, router_in_flight=1)
    counts = firsts("expected_wait", [slow, fast])
    assert counts == Counter({"fast": 400})
    assert counts == firsts("expected_wait", [fast, slow])


def test_expected_wait_spreads_over_near_equal_backends() -> None:
    # Within the slack of the best, two random choices: not always the same one (herding).
    cands = [local("a"), local("b", ttft=0.21), local("c", ttft=0.22), local("d", ttft=5.0,
             router_in_flight=3)]
    counts = firsts("expected_wait", cands, n=600)
    # Two of the pool of three drawn, the better estimate wins: a 2/3, b 1/3, c never.
    assert set(counts) == {"a", "b"}
    assert 330 < counts["a"] < 470


def test_expected_wait_fills_unknown_ewmas_from_the_fleet() -> None:
    ew = ExpectedWait()
    measured = [local("a", tpot=0.05, router_in_flight=1), local("b", tpot=0.05,
                router_in_flight=1)]
    # The newcomer has no measurements: it gets the fleet median, not an optimistic zero,
    # so with one request ahead it ranks by queue, not by missing data.
    newcomer = local("new", ttft=None, tpot=None, router_in_flight=2)
    assert ew.rank([*measured, newcomer], REQ, random.Random(0))[-1].backend == "new"


def test_quick_simulation_matches_theory() -> None:
    v = simulate.validate(quick=True)
    assert 6.0 < v.random[0] < 14.0  # M/M/1: 10
    assert 2.0 < v.two[0] < 3.6  # supermarket model, d = 2: 2.61
    assert v.two[0] < v.random[0] / 2


def test_quick_comparison_runs_the_real_policies() -> None:
    cells = simulate.compare([0.9], ["poisson"], seeds=2, requests=600)
    by = {c.policy: c for c in cells}
    assert set(by) == set(simulate.COMPARED)
    assert by["expected_wait"].stat("p99_ttft")[0] < by["round_robin"].stat("p99_ttft")[0]
    assert by["expected_wait"].stat("goodput")[0] > by["least_outstanding"].stat("goodput")[0]
    validation = simulate.Validation(40, 3, 100, (10.0, 1.0), (2.6, 0.1))
    text = simulate.render(validation, cells, 2, 600, "cmd", 1.0)
    assert "| 90% | expected_wait |" in text
