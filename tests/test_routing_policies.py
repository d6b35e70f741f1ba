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
    ResidencyFirst,
    RoundRobin,
    expected_ttft,
    fleet_ttfts,
    server_parallel,
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
                             "expected_wait", "residency_first", "random"}
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
    # Two of ours ahead on one slot, none seen running: one whole service of (0.3 + 100 x
    # 0.02) = 2.3 for the second, all of the first's (it has just begun), plus own 0.3.
    busy = local("a", ttft=0.3, tpot=0.02, router_in_flight=2)
    assert expected_ttft(busy, REQ) == pytest.approx(2 * 2.3 + 0.3)
    # The poll saw the first one decoding: half of it is left on average.
    running = local("a", ttft=0.3, tpot=0.02, router_in_flight=2, in_flight=2, waiting=1,
                    router_in_flight_at_poll=2)
    assert expected_ttft(running, REQ) == pytest.approx(1.5 * 2.3 + 0.3)
    # Two slots, two ahead: one service's worth / 2 slots.
    assert expected_ttft(local("a", ttft=0.3, tpot=0.02, router_in_flight=2, parallel=2),
                         REQ) == pytest.approx(1.0 * 2.3 / 2 + 0.3)
    # Cold: plus the measured load; unknown residency: half of it.
    assert expected_ttft(local("a", ttft=0.3, tpot=0.02, loaded=False, load_seconds=6.0),
                         REQ) == pytest.approx(6.3)
    assert expected_ttft(local("a", ttft=0.3, tpot=0.02, loaded=None, load_seconds=6.0),
                         REQ) == pytest.approx(3.3)
    # A TTFT EWMA inflated by past queueing counts at most one decode's worth.
    assert expected_ttft(local("a", ttft=30.0, tpot=0.02), REQ) == pytest.approx(2.0)
    # Cloud: its TTFT EWMA.
    assert expected_ttft(local("a", is_cloud=True, ttft=0.9), REQ) == pytest.approx(0.9)


def test_the_queue_is_its_measured_service_time_not_the_requests_max_tokens() -> None:
    # One of ours ahead, decoding: half of the measured 3 s service time, whatever the
    # incoming request asks for, and its prompt at the measured prefill rate.
    c = local("a", service=3.0, prefill=0.4, router_in_flight=1, in_flight=1, waiting=0,
              router_in_flight_at_poll=1)
    for tokens in (16, 256, 1500):
        req = RequestTraits(model="m", expected_output_tokens=tokens)
        assert expected_ttft(c, req) == pytest.approx(0.5 * 3.0 + 0.4)
    # Without a service time, the assumption for requests in general fills in.
    bare = local("a", router_in_flight=1, in_flight=1, waiting=0, router_in_flight_at_poll=1)
    assert expected_ttft(bare, REQ) == pytest.approx(0.5 * (0.2 + 100 * 0.02) + 0.2)


def test_prefill_is_the_prompt_at_the_backends_measured_rate() -> None:
    fast = local("fast", prefill_per_token=0.0002, prefill=0.1, service=1.0,
                 router_in_flight=1, in_flight=1, waiting=0, router_in_flight_at_poll=1)
    slow = local("slow", prefill_per_token=0.002, prefill=1.0, service=4.0)
    long_prompt = RequestTraits(model="m", prompt_tokens=4000)
    short_prompt = RequestTraits(model="m", prompt_tokens=100)
    assert expected_ttft(fast, long_prompt) == pytest.approx(0.5 * 1.0 + 0.8)
    assert expected_ttft(slow, long_prompt) == pytest.approx(8.0)
    assert expected_ttft(slow, short_prompt) == pytest.approx(0.2)
    ew = ExpectedWait()
    # A long prompt waits behind one request on the fast prefill rather than prefill slowly;
    # a short one takes the idle slow backend.
    assert ew.rank([slow, fast], long_prompt, random.Random(0))[0].backend == "fast"
    assert ew.rank([fast, slow], short_prompt, random.Random(0))[0].backend == "slow"
    # Prompt length unknown: the backend's typical prompt time.
    assert expected_ttft(slow, RequestTraits(model="m")) == pytest.approx(1.0)


def test_queue_ahead_uses_own_counts_and_others_as_polled() -> None:
    # Polled 4 in flight of which 3 were ours; 2 of ours left now -> 2 + 1 others = 3 ahead.
    c = local("a", ttft=0.0, tpot=0.01, in_flight=4, router_in_flight_at_poll=3,
              router_in_flight=2)
    # All four were past their first token at the poll: half of the first is left.
    assert expected_ttft(c, REQ) == pytest.approx(2.5 * 1.0)
    # Without the snapshot: the larger of own in flight and polled + sent since.
    c = local("a", ttft=0.0, tpot=0.01, in_flight=4, router_sent_since_poll=1,
              router_in_flight=2)
    assert expected_ttft(c, REQ) == pytest.approx(4.5 * 1.0)


def test_other_clients_sends_since_the_poll_count_as_queued_ahead() -> None:
    # Alone (no fleet): the arrival rate x the state's age, less what this router sent.
    c = local("a", service=2.0, prefill=0.2, arrival_rate=2.0, state_age=0.5,
              router_in_flight_at_poll=0)
    assert expected_ttft(c, REQ) == pytest.approx(1.0 * 2.0 + 0.2)  # one unseen, just begun
    sent = local("a", service=2.0, prefill=0.2, arrival_rate=2.0, state_age=0.5,
                 router_in_flight_at_poll=0, router_in_flight=1, router_sent_since_poll=1)
    assert expected_ttft(sent, REQ) == pytest.approx(1.0 * 2.0 + 0.2)  # that one was ours

    def fleet(busy_ours: bool, ages: tuple[float, float]) -> list[float]:
        # Two idle backends and a busy one; the busy one's requests are another router's
        # (so others send here) or this router's (so nobody else does).
        own = 4 if busy_ours else 0
        busy = local("busy", service=2.0, prefill=0.2, in_flight=4, waiting=3,
                     router_in_flight=own, router_in_flight_at_poll=own)
        idle = [local(n, service=2.0, prefill=0.2, arrival_rate=1.0, state_age=age,
                      router_in_flight_at_poll=0) for n, age in zip("ab", ages, strict=True)]
        return fleet_ttfts([*idle, busy], REQ)

    # Another router's: its 1 request expected since the polls (2 x 1/s x 0.5 s) went where
    # it cost least, half on each idle backend: half a service ahead on each.
    a, b, _ = fleet(busy_ours=False, ages=(0.5, 0.5))
    assert a == pytest.approx(0.5 * 2.0 + 0.2) and b == pytest.approx(a)
    # This router alone: nobody else sends.
    a, b, _ = fleet(busy_ours=True, ages=(0.5, 0.5))
    assert a == pytest.approx(0.2) and b == pytest.approx(0.2)
    # A sidecar polled just now has shown what was sent to it: the older state takes it all.
    a, b, _ = fleet(busy_ours=False, ages=(0.0, 1.0))
    assert a == pytest.approx(0.2) and b == pytest.approx(1.0 * 2.0 + 0.2)


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
    counts = firsts("expected_wait", cands, n=900)
    # Two of the pool of three drawn, the better estimate wins: a 2/3, b 1/3, c never.
    assert set(counts) == {"a", "b"}
    assert 510 < counts["a"] < 690


def test_equal_estimates_do_not_favour_config_order_and_the_pool_has_no_cap() -> None:
    # Eight equal idle backends: every one is picked first about equally often (a capped
    # pool, or ties in config order, would give the first few everything).
    cands = [local(f"b{i}") for i in range(8)]
    counts = firsts("expected_wait", cands, n=1600)
    assert set(counts) == {f"b{i}" for i in range(8)}
    assert all(140 < n < 260 for n in counts.values())
    # And the rest of the ranking is shuffled too (retries spread as well).
    seconds = Counter(ExpectedWait().rank(cands, REQ, random.Random(i))[1].backend
                      for i in range(800))
    assert len(seconds) == 8


def test_residency_first_orders_loaded_then_fewest_outstanding() -> None:
    cands = [local("cold-idle", loaded=False), local("unknown", loaded=None),
             local("warm-busy", in_flight=3), local("warm", in_flight=1),
             local("warm-sent", in_flight=0, router_sent_since_poll=2)]
    ranked = names(ResidencyFirst().rank(cands, REQ, random.Random(0)))
    assert ranked[:3] == ["warm", "warm-sent", "warm-busy"]
    assert set(ranked[3:]) == {"cold-idle", "unknown"}  # then the rest, fewest outstanding
    tied = [local("a", in_flight=1), local("b", in_flight=1), local("c", loaded=False)]
    counts = firsts("residency_first", tied)
    assert set(counts) == {"a", "b"} and min(counts.values()) > 150


def test_server_parallel_from_the_polled_state() -> None:
    assert server_parallel("llama.cpp", {"slots_total": 4}) == 4
    assert server_parallel("ollama", {}) == 1
    # vLLM: requests waiting mean the batch is full (what runs is what fits); none waiting,
    # no limit in sight.
    assert server_parallel("openai", {"processing": 12.0, "deferred": 3.0}) == 12
    assert server_parallel("openai", {"processing": 12.0, "deferred": 0.0}) > 1000
    assert server_parallel("openai", {}) == 1  # an OpenAI-compatible server without gauges


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
