"""The routing simulator at small scale (seconds): many router replicas herd with the old pick
and not with the shipped one; the simulated sidecar keeps what the real one keeps."""

from __future__ import annotations

import statistics

import pytest

from benchmarks.routing import simulate
from benchmarks.routing.engine import Scenario, _Sim
from exporter.routing.policies import POLICIES


def test_many_replicas_herd_with_the_old_pick_and_not_with_the_new_one() -> None:
    # 16 replicas polling 32 equal backends at the same instants, 70% load: with a pool of
    # at most 3 and ties in config order, every replica sends to the same few idle backends.
    scn = simulate.herd(replicas=16, aligned=True, requests=600)
    olds, news = [], []
    for seed in (1, 2, 3):
        old = simulate.simulate(scn, simulate.OldPick, seed).mean_ttft
        new = simulate.simulate(scn, "expected_wait", seed).mean_ttft
        two = simulate.simulate(scn, "power_of_two", seed).mean_ttft
        assert old > new and new < two, (seed, old, new, two)
        olds.append(old)
        news.append(new)
    assert statistics.fmean(olds) > 1.2 * statistics.fmean(news), (olds, news)


def test_replicas_sharing_their_in_flight_counts_route_like_one_router() -> None:
    # The same traffic (one seed) through 1 router and through 16 in phase that share their
    # counts (the router's shared_state): the herd is gone, the mean TTFT within 10%.
    one = simulate.herd(replicas=1, aligned=True, requests=600)
    shared = simulate.herd(replicas=16, aligned=True, requests=600, shared=True)
    alone = simulate.herd(replicas=16, aligned=True, requests=600)
    for seed in (1, 2, 3):
        single = simulate.simulate(one, "expected_wait", seed).mean_ttft
        many = simulate.simulate(shared, "expected_wait", seed).mean_ttft
        apart = simulate.simulate(alone, "expected_wait", seed).mean_ttft
        assert many <= 1.1 * single < apart, (seed, single, many, apart)


def test_the_replicas_own_counts_and_poll_phases() -> None:
    scn = simulate.herd(replicas=4, aligned=False, requests=200, backends=4)
    sim = _Sim(scn, POLICIES["expected_wait"], 0)
    sim.run()
    assert len(sim.policies) == 4 and len({id(p) for p in sim.policies}) == 4
    # Each replica counts only its own requests; together they are everything in flight.
    for b, backend in enumerate(sim.backends):
        assert sum(cands[0][b].router_in_flight for cands in sim.cands) == \
            backend.runners[0].in_flight
    assert {req.replica for req in sim.measured} == {0, 1, 2, 3}


def test_the_simulated_sidecar_measures_what_the_real_one_does() -> None:
    scn = simulate.fleet(0.5, requests=300)
    sim = _Sim(scn, POLICIES["expected_wait"], 3)
    sim.run()
    run = sim.backends[3].runners[0]  # llama on the 2x backend
    assert run.service is not None and run.prompt_seconds is not None
    per_token = run.prompt_seconds / (run.prompt_tokens or 1)
    # 0.5 ms per prompt token at 1x, at most halved by a busy co-resident model: 0.25-0.5 ms.
    assert 0.0002 < per_token < 0.0006
    # The service time is prompt + decode: about (500 x 0.5 ms + 150 x 25 ms) / 2 at 2x.
    assert 1.0 < run.service < 4.0
    seen = sim.cands[0][0][3]
    assert seen.service == run.service or seen.state_age > 0  # seen at the last poll


def test_prompt_lengths_are_log_normal_and_the_router_is_told_them_roughly() -> None:
    scn = Scenario(speeds=(1.0,), models=simulate.FLEET_MODELS[:1], load=0.5, requests=2000)
    sim = _Sim(scn, POLICIES["random"], 0)
    reqs = [sim._new_request(0, measured=True) for _ in range(4000)]
    assert statistics.fmean(r.prompt for r in reqs) == pytest.approx(500, rel=0.1)
    assert statistics.median(r.prompt for r in reqs) < 400  # a long tail
    assert all(0.74 <= (r.told or 0) / r.prompt <= 1.26 for r in reqs if r.prompt >= 20)
    assert reqs[0].prefill == pytest.approx(reqs[0].prompt * 0.0005)


def test_quick_comparison_includes_residency_first() -> None:
    cells = simulate.compare([0.6], ["poisson"], seeds=[0, 1], requests=400,
                             policies=("residency_first", "expected_wait"))
    text = "\n".join(simulate.verdict(cells))
    assert "| poisson | 60% | residency_first |" in text
