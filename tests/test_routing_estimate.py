"""What the expected-wait estimate is made of, end to end: the sidecar's new per-model figures
(service time, prefill rate, arrival rate), the router's candidate built from them, and the
route-wide spill decision that must not follow a single request's max_tokens."""

from __future__ import annotations

import time
from typing import Any

import pytest

from exporter.events import RequestInfo
from exporter.protocols import endpoint_for
from exporter.record import RequestRecord
from exporter.routing.config import BreakerSpec
from exporter.routing.registry import Breaker, Sidecar
from exporter.state import ARRIVAL_RATE_SECONDS, ArrivalRate, LiveState
from tests.test_router import _state as _queued


def _record(arrival: float, **timings: float) -> RequestRecord:
    record = RequestRecord("POST", "/api/chat", arrival)
    record.provider, record.operation, record.live_label = "ollama", "chat", "m"
    record.model_label = "m"
    record.server_timings.update(timings)
    return record


def test_sidecar_publishes_service_time_prefill_rate_and_arrival_rate() -> None:
    live = LiveState()
    # Ollama: prompt_eval_duration over the evaluated prompt (prompt_eval_count less the
    # cached part), service = prompt + generation time (seconds, as the dialect gives them).
    ollama = _record(100.0, prompt_eval_duration=0.5, eval_duration=3.0, load_duration=0.01,
                     total_duration=3.6)
    ollama.input_tokens, ollama.cached_input_tokens = 1200, 200
    live.started(ollama)
    live.first_token(ollama)
    live.finished(ollama)
    # llama.cpp: prompt_ms / prompt_n (evaluated tokens only) and predicted_ms.
    llama = _record(101.0, prompt_ms=200.0, prompt_n=1000.0, predicted_ms=1800.0)
    live.started(llama)
    live.first_token(llama)
    live.finished(llama)
    entry = live.snapshot(now=101.0)["m"]
    ewma = entry["ewma"]
    assert ewma["service_seconds"] == pytest.approx(3.5 + 0.2 * (2.0 - 3.5))
    # A ratio of averages: (EWMA of seconds) / (EWMA of tokens).
    seconds, tokens = 0.5 + 0.2 * (0.2 - 0.5), 1000.0
    assert ewma["prefill_seconds"] == pytest.approx(seconds)
    assert ewma["prefill_seconds_per_token"] == pytest.approx(seconds / tokens)
    assert entry["arrivals"] == 2
    rate = ArrivalRate()
    rate.arrived(100.0)
    rate.arrived(101.0)
    assert entry["arrival_rate"] == pytest.approx(rate.rate(101.0), abs=1e-6)
    # Ten seconds without arrivals: the rate falls by e (a per-request EWMA never would).
    later = live.snapshot(now=101.0 + ARRIVAL_RATE_SECONDS)["m"]["arrival_rate"]
    assert later == pytest.approx(entry["arrival_rate"] / 2.718281828, rel=1e-3)


def test_arrival_rate_measures_a_steady_rate() -> None:
    rate = ArrivalRate()
    for i in range(600):  # 2 per second for 5 minutes
        rate.arrived(i * 0.5)
    assert rate.rate(299.5) == pytest.approx(2.0, rel=0.05)


def test_service_time_of_a_streamed_answer_without_server_timings() -> None:
    live = LiveState()
    record = _record(0.0)
    record.stream = True
    record.first_token, record.end = 0.4, 2.4
    live.started(record)
    live.first_token(record)
    live.finished(record)
    ewma = live.snapshot(now=3.0)["m"]["ewma"]
    assert ewma["service_seconds"] == pytest.approx(2.0)  # first token to the end
    assert ewma["prefill_seconds_per_token"] is None  # no timings, no rate


def _sidecar() -> Sidecar:
    return Sidecar("a", "http://a:1", "http://a:2", None, Breaker(BreakerSpec(), name="a"))


def _state(kind: str, entry: dict[str, Any], queue: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"upstream": {"kind": kind, "up": True, "models": ["m"], "queue": queue},
            "models": {"m": {"installed": True, "loaded": True, **entry}}}


def test_candidate_carries_the_sidecars_new_figures_and_the_states_age() -> None:
    sidecar = _sidecar()
    sidecar.polled(_state("ollama", {
        "in_flight": 2, "waiting": 1, "arrival_rate": 0.75,
        "ewma": {"ttft_seconds": 0.3, "tpot_seconds": 0.02, "service_seconds": 2.5,
                 "prefill_seconds": 0.2, "prefill_seconds_per_token": 0.0004}}), 100.0)
    c = sidecar.candidate("m", 100.4, stale_after=1.5)
    assert (c.service, c.prefill, c.prefill_per_token) == (2.5, 0.2, 0.0004)
    assert c.arrival_rate == 0.75 and c.state_age == pytest.approx(0.4)
    assert (c.in_flight, c.waiting, c.parallel) == (2, 1, 1)
    # Older sidecars publish none of it: all None, and the estimate falls back.
    sidecar.polled(_state("ollama", {"in_flight": 0, "waiting": 0, "ewma": {}}), 100.0)
    c = sidecar.candidate("m", 100.0, stale_after=1.5)
    assert (c.service, c.prefill, c.prefill_per_token, c.arrival_rate) == (None,) * 4


def test_candidate_parallelism_of_a_vllm_upstream() -> None:
    sidecar = _sidecar()
    busy = {"processing": 48.0, "deferred": 5.0, "slots_total": None}
    sidecar.polled(_state("openai", {"in_flight": 53, "waiting": 5}, busy), 0.0)
    assert sidecar.candidate("m", 0.0, 1.5).parallel == 48  # full: what runs is what fits
    room = {"processing": 10.0, "deferred": 0.0, "slots_total": None}
    sidecar.polled(_state("openai", {"in_flight": 10, "waiting": 0}, room), 0.0)
    assert sidecar.candidate("m", 0.0, 1.5).parallel > 1000  # a new one joins the batch
    llama = {"processing": 1.0, "deferred": 0.0, "slots_total": 4}
    sidecar.polled(_state("llama.cpp", {"in_flight": 1, "waiting": 0}, llama), 0.0)
    assert sidecar.candidate("m", 0.0, 1.5).parallel == 4


ROUTER = """
allow_unauthenticated_cloud: true
backends:
  - {name: a, proxy_url: "http://a:1", admin_url: "http://a:2"}
  - {name: b, proxy_url: "http://b:1", admin_url: "http://b:2"}
cloud:
  - {name: cloud, base_url: "http://c/v1", api_key_env: ROUTER_TEST_KEY,
     models: {auto-heavy: big}}
routes:
  - {model: auto, hybrid: {light: small, heavy: auto-heavy, slo_ttft: 2.0, hysteresis: 0.25}}
"""


def _decide(router: Any, max_tokens: int | None) -> Any:
    body: dict[str, Any] = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    if max_tokens is not None:
        body["options"] = {"num_predict": max_tokens}
    return router.decide("/api/chat", endpoint_for("POST", "/api/chat"),
                         RequestInfo(model="auto", max_tokens=max_tokens), body, False)


@pytest.mark.parametrize("ewma", [{}, {"service_seconds": 1.5}],
                         ids=["no service time (old sidecars)", "measured service time"])
def test_the_spill_state_does_not_follow_the_requests_max_tokens(
        monkeypatch: pytest.MonkeyPatch, ewma: dict[str, float]) -> None:
    """Measured before: with the fleet near the SLO, spilling flipped on, off and on again as
    max_tokens went None -> 1500 -> 16 -> None (the estimate charged the queue ahead at the
    incoming request's length)."""
    import yaml

    from exporter.routing.config import parse_config
    from exporter.routing.service import Router

    monkeypatch.setenv("ROUTER_TEST_KEY", "sk")
    router = Router(parse_config(yaml.safe_load(ROUTER)))
    now = time.monotonic()
    for in_flight in (1, 2, 3, 4):  # from under the SLO to over it
        for name in ("a", "b"):
            router.backends.sidecars[name].polled(_queued(in_flight, **ewma), now)
        seen = []
        for tokens in (None, 1500, 16, None):
            reason = _decide(router, tokens).reason
            seen.append((reason, router.decider.spilling.get("auto", False)))
        assert len(set(seen)) == 1, (in_flight, seen)
    # And it did spill once the queues were long enough, and stopped as they emptied.
    assert _decide(router, None).reason == "spill"
    for name in ("a", "b"):
        router.backends.sidecars[name].polled(_queued(0, **ewma), now)
    assert [_decide(router, t).reason for t in (None, 1500, 16)] == ["light"] * 3
