"""The router's parts on their own: config errors, classifier, Ollama <-> OpenAI translation,
circuit breaker, cloud budget and rate limit, DNS discovery, and decisions from given state."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from exporter.config import ConfigError
from exporter.events import RequestInfo
from exporter.protocols import endpoint_for
from exporter.routing.classifier import HEAVY, LIGHT, load_cascade
from exporter.routing.config import (
    BreakerSpec,
    ClassifierSpec,
    CloudSpec,
    HybridSpec,
    RouterConfig,
    parse_config,
)
from exporter.routing.ledger import MemoryLedger
from exporter.routing.registry import CLOSED, HALF_OPEN, OPEN, Breaker, Registry
from exporter.routing.spend import Cloud
from exporter.routing.translate import OllamaFromOpenAI, ollama_to_openai

EXAMPLE = """
listen: 0.0.0.0:8080
admin_listen: 0.0.0.0:9465
api_key_file: /etc/llmtap/router-keys
poll_interval: 0.5
backends:
  - name: local-a
    proxy_url: http://ollama-a:11435
    admin_url: http://ollama-a:9464
  - dns: llmtap-sidecars.llm.svc.cluster.local
    proxy_port: 11435
    admin_port: 9464
    refresh_interval: 10
cloud:
  - name: openai
    base_url: https://api.openai.com/v1
    api_key_env: OPENAI_API_KEY
    models: {auto-heavy: gpt-4o-mini}
    price_per_input_token: 0.00000015
    price_per_output_token: 0.0000006
    budget: 10.0
    rate_limit: 5
routes:
  - model: "*"
    policy: expected_wait
  - model: auto
    hybrid: {light: llama3.2, heavy: auto-heavy, slo_ttft: 2.0}
    residency: any
"""


def _config(text: str = EXAMPLE) -> Any:
    import yaml

    return parse_config(yaml.safe_load(text))


# --------------------------------------------------------------------------- config


def test_the_documented_example_parses_with_its_defaults() -> None:
    config = _config()
    assert str(config.listen) == "0.0.0.0:8080" and str(config.admin_listen) == "0.0.0.0:9465"
    assert config.poll_interval == 0.5 and config.stale_after == 1.5
    assert [b.name for b in config.backends] == ["local-a"]
    assert config.dns[0].dns == "llmtap-sidecars.llm.svc.cluster.local"
    assert config.dns[0].refresh_interval == 10.0
    cloud = config.cloud[0]
    assert cloud.models == {"auto-heavy": "gpt-4o-mini"} and cloud.budget == 10.0
    assert cloud.budget_period == "day" and cloud.rate_limit == 5.0
    hybrid = config.route_for("auto").hybrid
    assert hybrid is not None and hybrid.light == "llama3.2"
    assert config.route_for("anything").policy == "expected_wait"
    assert config.cloud_for("auto-heavy") is cloud


@pytest.mark.parametrize(("text", "message"), [
    ("backends: [{name: a, proxy_url: 'http://a:1', admin_url: 'http://a:2', speed: 3}]",
     "backends[0].speed: unknown key"),
    ("backends: [{name: a, admin_url: 'http://a:2'}]", "backends[0].proxy_url is required"),
    ("backends: [{name: a, proxy_url: 'ftp://a', admin_url: 'http://a:2'}]",
     "backends[0].proxy_url: expected an http"),
    ("backends: [{name: a, proxy_url: 'http://a:1', admin_url: 'http://a:2'}]\n"
     "routes: [{model: x, policy: fastest}]", "routes[0].policy: unknown policy 'fastest'"),
    ("backends: [{name: a, proxy_url: 'http://a:1', admin_url: 'http://a:2'}]\n"
     "routes: [{model: auto, hybrid: {light: l, heavy: nope}}]",
     "routes[0].hybrid.heavy: 'nope' is no cloud model alias"),
    ("backends: [{name: a, proxy_url: 'http://a:1', admin_url: 'http://a:2'}]\n"
     "poll_interval: fast", "poll_interval: expected float"),
    ("backends: [{name: a, proxy_url: 'http://a:1', admin_url: 'http://a:2'}]\n"
     "routes: [{model: x, residency: eu}]", "routes[0].residency: expected one of any, local"),
    ("listen: 1.2.3.4", "listen: expected HOST:PORT"),
    ("poll: 1", "poll: unknown key"),
    ("{}", "at least one backend"),
    ("backends: [{name: a, proxy_url: 'http://a:1', admin_url: 'http://a:2'},"
     " {name: a, proxy_url: 'http://b:1', admin_url: 'http://b:2'}]", "'a' is used twice"),
])
def test_config_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(text)
    assert message in str(caught.value), str(caught.value)


# --------------------------------------------------------------------------- classifier


def test_rule_classifier() -> None:
    """The rules as the cascade runs them (more in tests/test_classifier.py)."""
    cascade = load_cascade(RouterConfig(classifier=ClassifierSpec(
        long_prompt_chars=200, heavy_max_tokens=1000)))
    hybrid = HybridSpec(light="small", heavy="big")

    def classify(body: dict[str, Any]) -> str:
        verdict = cascade.quick(body, hybrid)
        assert verdict is not None
        return verdict.label

    def chat(text: str, **extra: Any) -> dict[str, Any]:
        return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}

    assert classify(chat("What is the capital of France?")) == LIGHT
    assert classify(chat("hi", max_tokens=4000)) == HEAVY  # heavy_max_tokens set: on
    assert classify({"prompt": "hi", "options": {"num_predict": 1000}}) == HEAVY
    assert classify(chat("x" * 300)) == HEAVY
    assert classify(chat("Fix this:\n```python\nprint(1)\n```")) == HEAVY
    assert classify(chat("def add(a, b):\n    return a + b")) == HEAVY
    assert classify(chat("Prove step by step that sqrt(2) is irrational")) == HEAVY
    assert classify({"prompt": "Tell me a joke", "system": "be brief"}) == LIGHT


def always_heavy(body: dict[str, Any], path: str) -> str:
    return HEAVY


def broken(body: dict[str, Any], path: str) -> str:
    raise RuntimeError("boom")


async def test_classifier_plugins_load_by_dotted_path() -> None:
    hybrid = HybridSpec(light="small", heavy="big")

    def cascade(plugin: str) -> Any:
        return load_cascade(RouterConfig(classifier=ClassifierSpec(plugin=plugin)))

    verdict = await cascade("tests.test_router:always_heavy").classify({}, "/api/chat", hybrid)
    assert verdict is not None and verdict.label == HEAVY
    verdict = await cascade("tests.test_router.broken").classify({}, "/api/chat", hybrid)
    assert verdict is not None and verdict.label == LIGHT  # a failing plugin keeps it local
    with pytest.raises(ConfigError, match=r"classifier\.plugin"):
        cascade("tests.test_router:missing")


# --------------------------------------------------------------------------- translation


def test_ollama_requests_become_openai_chat_completions() -> None:
    chat = ollama_to_openai("/api/chat", {
        "model": "auto", "messages": [{"role": "user", "content": "hi", "images": ["..."]}],
        "options": {"num_predict": 64, "temperature": 0.2, "stop": ["\n"]}, "format": "json",
    }, "gpt-x")
    assert chat == {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}],
                    "stream": True, "stream_options": {"include_usage": True},
                    "temperature": 0.2, "stop": ["\n"], "max_tokens": 64,
                    "response_format": {"type": "json_object"}}
    generate = ollama_to_openai("/api/generate", {"model": "auto", "prompt": "Why?",
                                                  "system": "Be short", "stream": False}, "g")
    assert generate == {"model": "g", "stream": False, "messages": [
        {"role": "system", "content": "Be short"}, {"role": "user", "content": "Why?"}]}


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


STREAM = _sse(
    {"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hello"}}]},
    {"id": "c1", "choices": [{"index": 0, "delta": {"content": " there"}}]},
    {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
    {"id": "c1", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}},
)


@pytest.mark.parametrize("piece", [1, 7, len(STREAM)])
def test_an_openai_stream_becomes_ollama_ndjson(piece: int) -> None:
    translator = OllamaFromOpenAI(chat=True, model="auto", started_ns=1_000)
    out = b""
    for i, start in enumerate(range(0, len(STREAM), piece)):
        out += translator.feed(STREAM[start:start + piece], 2_000 + i)
    out += translator.finish(10**9)  # already ended at [DONE]: nothing more
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [line["message"]["content"] for line in lines] == ["Hello", " there", ""]
    assert all(line["model"] == "auto" and line["created_at"].endswith("Z") for line in lines)
    assert [line["done"] for line in lines] == [False, False, True]
    final = lines[-1]
    assert final["done_reason"] == "length"
    assert final["prompt_eval_count"] == 11 and final["eval_count"] == 2
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[name], int) and final[name] >= 0
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]


def test_generate_streams_and_whole_answers_and_errors_translate() -> None:
    translator = OllamaFromOpenAI(chat=False, model="auto", started_ns=0)
    lines = translator.feed(STREAM, 5).splitlines()
    assert [orjson.loads(line)["response"] for line in lines] == ["Hello", " there", ""]
    whole = OllamaFromOpenAI(chat=True, model="auto", started_ns=0).whole({
        "choices": [{"message": {"role": "assistant", "content": "Hi",
                                 "tool_calls": [{"function": {"name": "f",
                                                              "arguments": '{"a": 1}'}}]},
                     "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1}}, 100)
    obj = orjson.loads(whole)
    assert obj["message"]["content"] == "Hi" and obj["done"] is True
    assert obj["message"]["tool_calls"] == [{"function": {"name": "f", "arguments": {"a": 1}}}]
    assert obj["prompt_eval_count"] == 3 and obj["eval_count"] == 1
    failing = OllamaFromOpenAI(chat=True, model="auto", started_ns=0)
    out = failing.feed(b'data: {"error": {"message": "quota exceeded"}}\n\n', 1)
    assert orjson.loads(out) == {"error": "quota exceeded"}


# --------------------------------------------------------------------------- breaker, cloud


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_circuit_breaker_ejects_probes_and_restores() -> None:
    clock = Clock()
    opened: list[int] = []
    breaker = Breaker(BreakerSpec(failures=2, cooldown=1.0, max_cooldown=3.0), clock,
                      on_open=lambda: opened.append(1))
    breaker.failure()
    assert breaker.state == CLOSED and breaker.eligible()
    breaker.failure()
    assert breaker.state == OPEN and not breaker.eligible() and opened == [1]
    breaker.success()  # a success inside the cooldown is not trusted yet
    assert breaker.state == OPEN
    clock.now += 1.0
    assert breaker.eligible()  # cooldown over: one probe may go
    breaker.dispatched()
    assert breaker.state == HALF_OPEN and not breaker.eligible()
    breaker.failure()  # the probe failed: out for twice as long
    assert breaker.state == OPEN and breaker.cooldown == 2.0
    clock.now += 1.5
    assert not breaker.eligible()
    clock.now += 0.5
    breaker.success()  # a request probe answered
    assert breaker.state == CLOSED and breaker.cooldown == 1.0 and breaker.failures == 0
    assert opened == [1]  # one ejection counted, however many failed probes


async def test_cloud_budget_and_rate_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    spec = CloudSpec(name="c", base_url="http://c/v1", api_key_env="ROUTER_TEST_KEY",
                     models={"heavy": "big"}, price_per_input_token=0.01,
                     price_per_output_token=0.02, budget=1.0, rate_limit=2)
    cloud = Cloud(spec, Breaker(BreakerSpec(), clock), MemoryLedger(clock))
    monkeypatch.delenv("ROUTER_TEST_KEY", raising=False)
    assert cloud.unusable() == "no_api_key"
    monkeypatch.setenv("ROUTER_TEST_KEY", "sk")
    assert cloud.unusable() == ""
    first = await cloud.admit(0.5, None)
    second = await cloud.admit(0.1, None)
    assert first.reservation and second.reservation
    assert cloud.unusable() == "rate_limited"  # burst of 2 spent
    assert (await cloud.admit(0.1, None)).declined == "rate_limited"
    clock.now += 0.5
    assert cloud.unusable() == ""  # 2/s refills one in half a second
    assert cloud.budget_left() == pytest.approx(0.4)  # both reservations held
    cloud.ledger.settle(first.reservation, cloud.cost(10, 20))  # it cost what it reserved
    cloud.ledger.settle(second.reservation, 0.0)  # this one nothing
    assert cloud.budget_left() == pytest.approx(0.5)
    assert cloud.unusable(need=0.6) == "budget_exhausted"  # no room for that much
    assert (await cloud.admit(0.6, None)).declined == "budget_exhausted"
    assert cloud.budget_left() == pytest.approx(0.5)  # a refusal holds nothing


# --------------------------------------------------------------------------- discovery


async def test_dns_discovery_adds_removes_and_survives_failures() -> None:
    answers: list[Any] = [["10.0.0.1", "10.0.0.2"], ["10.0.0.2", "fd00::3"], OSError("no")]

    async def resolve(host: str) -> list[str]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    config = _config("backends: [{dns: sidecars.local, proxy_port: 11435, admin_port: 9464}]")
    registry = Registry(config, resolver=resolve)
    spec = config.dns[0]
    await registry.refresh_dns(spec)
    assert sorted(registry.sidecars) == ["sidecars.local/10.0.0.1", "sidecars.local/10.0.0.2"]
    assert registry.sidecars["sidecars.local/10.0.0.1"].proxy_url == "http://10.0.0.1:11435"
    await registry.refresh_dns(spec)
    assert sorted(registry.sidecars) == ["sidecars.local/10.0.0.2", "sidecars.local/fd00::3"]
    assert registry.sidecars["sidecars.local/fd00::3"].admin_url == "http://[fd00::3]:9464"
    await registry.refresh_dns(spec)  # the lookup failed: the fleet stays as it was
    assert len(registry.sidecars) == 2


async def test_dns_discovery_with_the_event_loops_resolver() -> None:
    config = _config("backends: [{dns: localhost, proxy_port: 1, admin_port: 2}]")
    registry = Registry(config)
    await registry.refresh_dns(config.dns[0])
    assert "localhost/127.0.0.1" in registry.sidecars


# --------------------------------------------------------------------------- decisions


ROUTER = """
allow_unauthenticated_cloud: true
backends:
  - {name: a, proxy_url: "http://a:1", admin_url: "http://a:2"}
  - {name: b, proxy_url: "http://b:1", admin_url: "http://b:2"}
cloud:
  - {name: cloud, base_url: "http://c/v1", api_key_env: ROUTER_TEST_KEY,
     models: {auto-heavy: big}}
routes:
  - {model: auto, hybrid: {light: small, heavy: auto-heavy, slo_ttft: 1.0, hysteresis: 0.5}}
  - {model: private, hybrid: {light: small, heavy: auto-heavy}, residency: local}
"""


def _state(waiting: int, ttft: float = 0.1, tpot: float = 0.01,
           **ewma: float) -> dict[str, Any]:
    """A sidecar's state: `waiting` requests in flight for small:latest, none yet answered;
    `ewma` adds measured figures (service_seconds, ...)."""
    return {"upstream": {"kind": "ollama", "up": True, "models": ["small:latest"]},
            "models": {"small:latest": {"in_flight": waiting, "waiting": waiting,
                                        "installed": True, "loaded": True,
                                        "ewma": {"ttft_seconds": ttft, "tpot_seconds": tpot,
                                                 **ewma}}}}


def _decide(router: Any, model: str, text: str = "hi", local: bool = False) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return router.decide("/api/chat", endpoint_for("POST", "/api/chat"),
                         RequestInfo(model=model), body, local)


def test_decisions_heavy_light_spill_hysteresis_and_residency(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.routing.service import Router

    monkeypatch.setenv("ROUTER_TEST_KEY", "sk")
    router = Router(_config(ROUTER))
    a, b = router.backends.sidecars["a"], router.backends.sidecars["b"]
    now = time.monotonic()
    a.polled(_state(0, ttft=0.05), now)
    b.polled(_state(0, ttft=0.5), now)

    light = _decide(router, "auto")
    assert (light.reason, light.klass, light.targets[0].backend) == ("light", LIGHT, "a")
    assert light.targets[0].model == "small" and light.targets[-1].backend == "cloud"
    heavy = _decide(router, "auto", "Prove step by step that P != NP")
    assert (heavy.reason, heavy.targets[0].backend, heavy.targets[0].model) == \
        ("heavy", "cloud", "big")
    # Both local backends queue deep: E[TTFT] over the 1 s SLO, light requests spill.
    a.polled(_state(20), now)
    b.polled(_state(20), now)
    spill = _decide(router, "auto")
    assert (spill.reason, spill.targets[0].backend) == ("spill", "cloud")
    # Local-only never leaves, heavy or overloaded; by header or by the route's rule.
    for decision in (_decide(router, "auto", local=True),
                     _decide(router, "auto", "Prove step by step", local=True),
                     _decide(router, "private")):
        assert decision.reason == "local_only"
        assert {t.backend for t in decision.targets} == {"a", "b"}
    # Load falls to just under the SLO: still spilling (hysteresis), until well under it.
    a.polled(_state(1, ttft=0.9, tpot=0.001), now)
    assert _decide(router, "auto").reason == "spill"
    a.polled(_state(0, ttft=0.1), now)
    assert _decide(router, "auto").reason == "light"
    # The cloud's budget or key gone: heavy requests queue locally and say why.
    monkeypatch.delenv("ROUTER_TEST_KEY")
    no_key = _decide(router, "auto", "Prove step by step")
    assert (no_key.reason, no_key.targets[0].backend) == ("no_api_key", "a")
    # Stale state counts as saturated: it never looks under the SLO.
    a.polled_at = b.polled_at = now - 60
    monkeypatch.setenv("ROUTER_TEST_KEY", "sk")
    assert _decide(router, "auto").reason == "spill"


def test_unknown_models_and_dialects_are_refused_or_filtered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.routing.service import Router

    router = Router(_config(ROUTER))
    now = time.monotonic()
    router.backends.sidecars["a"].polled(_state(0), now)
    llama = {"upstream": {"kind": "llama.cpp", "up": True, "models": ["smol.gguf"]},
             "models": {"smol.gguf": {"in_flight": 0, "waiting": 0, "installed": True,
                                      "ewma": {"ttft_seconds": 0.01}}}}
    router.backends.sidecars["b"].polled(llama, now)
    unknown = _decide(router, "nope")
    assert unknown.targets == [] and unknown.reason == "no_backend"
    assert _decide(router, "small").targets[0].backend == "a"  # llama-server: no Ollama API
    def openai(model: str) -> list[str]:
        decision = router.decide("/v1/chat/completions",
                                 endpoint_for("POST", "/v1/chat/completions"),
                                 RequestInfo(model=model), {"model": model}, False)
        return [t.backend for t in decision.targets]

    # llama-server would answer any name with its one model: it gets only its own.
    assert openai("anything") == []
    assert openai("smol") == ["b"]


def test_sidecar_state_publishes_cold_load_time() -> None:
    """The router's load cost: an EWMA of the cold loads the sidecar saw, per model."""
    from exporter.record import RequestRecord
    from exporter.state import LiveState

    live = LiveState()
    for loaded, load in ((False, 4.0), (True, 0.5), (False, 2.0)):
        record = RequestRecord("POST", "/api/chat", 0.0)
        record.provider, record.operation, record.live_label = "ollama", "chat", "m"
        record.model_was_loaded = loaded
        record.server_timings["load_duration"] = load
        record.model_label = "m"
        live.started(record)
        record.waiting = True
        live.finished(record)
    ewma = live.snapshot()["m"]["ewma"]
    assert ewma["load_seconds"] == pytest.approx(4.0 + 0.2 * (2.0 - 4.0))  # warm ones skipped


@pytest.mark.parametrize(("header", "local"), [
    (b"", False), (b"any", False), (b"ANY", False), (b"any, any", False),
    (b"local", True), (b"Local", True), (b"local, any", True), (b"any, local", True),
    (b"local;strict", True), (b"  local  ", True), (b"eu, local", True),
    (b"eu", None), (b"anywhere", None), (b"localish", None), (b"any;strict", None),
])
def test_residency_fails_closed(header: bytes, local: bool | None) -> None:
    """Any `local` token in any instance of the header means local (repeated fields arrive
    joined by commas: a gateway's appended `local` cannot be undone by the client's `any`);
    a value that says neither is refused (400), never read as `any`."""
    from exporter.routing.upstream import residency_local

    assert residency_local(header) is local


def test_the_cloud_last_resort_survives_the_attempt_limit() -> None:
    """With three local backends or more, the cloud appended as the last resort was cut by
    the limit of three tries and never reached."""
    from exporter.routing.decide import Target
    from exporter.routing.upstream import MAX_ATTEMPTS, tries

    spec = CloudSpec(name="cloud", base_url="http://127.0.0.1:9", api_key_env="NONE",
                     models={"m": "m"})
    cloud = Cloud(spec, Breaker(BreakerSpec()), MemoryLedger())
    local = [Target(f"local-{i}", "m") for i in range(5)]
    chosen = tries([*local, Target("cloud", "m", cloud=cloud)])
    assert len(chosen) == MAX_ATTEMPTS
    assert [t.backend for t in chosen] == ["local-0", "local-1", "cloud"]
    assert tries(local) == local[:MAX_ATTEMPTS]  # no cloud: as before
    assert tries(local[:2]) == local[:2]


def test_answering_polls_neither_clear_nor_close_what_failing_requests_did() -> None:
    """On main a successful poll reset the failure count: 240 failed requests in 60 s with
    the admin port answering gave 0 ejections."""
    clock = Clock()
    breaker = Breaker(BreakerSpec(failures=3, cooldown=1.0), clock)
    for _ in range(3):
        breaker.failure()
        breaker.success(liveness=True)  # the sidecar's admin port answers in between
    assert breaker.state == OPEN and breaker.opened_by == "requests"
    clock.now += 5
    breaker.success(liveness=True)
    assert breaker.state == OPEN  # only a request probe brings it back
    breaker.dispatched()
    breaker.success()
    assert breaker.state == CLOSED
    # Unreachable (failed polls, refused connects) is liveness: a poll answering ends it.
    for _ in range(3):
        breaker.failure(liveness=True)
    assert breaker.state == OPEN and breaker.opened_by == "liveness"
    clock.now += 1
    breaker.success(liveness=True)
    assert breaker.state == CLOSED


def test_probes_have_a_deadline_and_cancelled_or_429_probes_free_the_slot() -> None:
    clock = Clock()
    spec = BreakerSpec(failures=1, cooldown=1.0, max_cooldown=8.0, probe_timeout=5.0)
    breaker = Breaker(spec, clock)
    breaker.failure()
    clock.now += 1
    breaker.dispatched()
    assert breaker.state == HALF_OPEN and not breaker.eligible()
    clock.now += 5  # the probe never answered: a failure, out for twice as long
    assert not breaker.eligible() and breaker.state == OPEN and breaker.cooldown == 2.0
    clock.now += 2
    breaker.dispatched()
    breaker.released()  # the client cancelled the probe: it proved nothing
    assert breaker.state == OPEN and breaker.eligible() and breaker.cooldown == 2.0
    breaker.success()
    assert breaker.state == CLOSED
    breaker.cool_down(3.0)  # a 429 with Retry-After: 3: out for 3 s, not broken
    assert not breaker.eligible() and breaker.failures == 0
    clock.now += 3
    assert breaker.eligible()
    breaker.dispatched()
    breaker.success()
    assert breaker.state == CLOSED and breaker.cooldown == 1.0


def test_what_an_answer_says_of_its_backend() -> None:
    """A sidecar's 503 is a busy server, not a broken one; its 500 and 502 are failures; a
    cloud's 429 keeps it out for its Retry-After without a failure."""
    from exporter.routing.decide import Target
    from exporter.routing.registry import Sidecar
    from exporter.routing.upstream import judge

    clock = Clock()
    sidecar = Sidecar("s", "http://x", "http://x", None, Breaker(BreakerSpec(failures=1), clock))
    local = Target("s", "m", sidecar=sidecar)
    judge(local, 503, [])
    assert sidecar.breaker.state == CLOSED
    judge(local, 500, [])
    assert sidecar.breaker.state == OPEN
    spec = CloudSpec(name="c", base_url="http://127.0.0.1:9", api_key_env="NONE",
                     models={"m": "m"})
    cloud = Cloud(spec, Breaker(BreakerSpec(failures=1, cooldown=1.0), clock),
                  MemoryLedger())
    judge(Target("c", "m", cloud=cloud), 429, [(b"Retry-After", b"7")])
    assert cloud.breaker.state == OPEN and cloud.breaker.cooldown == 7.0
    assert cloud.breaker.failures == 0
    clock.now += 7
    assert cloud.breaker.eligible()  # usable again after its Retry-After


def test_a_cloud_without_client_keys_is_refused_unless_meant() -> None:
    """Anyone who can reach a keyless router could spend its cloud budget."""
    import yaml

    raw = yaml.safe_load(ROUTER)
    del raw["allow_unauthenticated_cloud"]
    with pytest.raises(ConfigError, match="allow_unauthenticated_cloud"):
        parse_config(raw)
    assert parse_config({**raw, "api_key_file": "/etc/keys"}).api_key_file == "/etc/keys"
    assert parse_config({**raw, "allow_unauthenticated_cloud": True}).cloud
    del raw["cloud"]
    raw["routes"] = []
    assert not parse_config(raw).api_key_file  # no cloud: keys are the operator's choice


def test_a_llama_server_gets_only_the_models_it_serves() -> None:
    """llama-server answers any model name with its own: on main `qwen2.5:7b` was ranked
    first to a llama-server serving phi-3, and the cloud alias `gpt-4o-mini` went to it."""
    from exporter.routing.registry import Sidecar

    sidecar = Sidecar("l", "http://l:1", "http://l:2", None, Breaker(BreakerSpec()), ("phi",))
    sidecar.polled({"upstream": {"kind": "llama.cpp", "up": True,
                                 "models": ["/models/phi-3-mini.gguf"]},
                    "models": {}}, time.monotonic())
    has = {model: sidecar.entry(model)[1] for model in
           ("qwen2.5:7b", "gpt-4o-mini", "phi-3-mini", "/models/phi-3-mini.gguf", "phi", "")}
    assert has == {"qwen2.5:7b": False, "gpt-4o-mini": False, "phi-3-mini": True,
                   "/models/phi-3-mini.gguf": True, "phi": True, "": True}
    config = _config(EXAMPLE.replace("    admin_url: http://ollama-a:9464\n",
                                     "    admin_url: http://ollama-a:9464\n"
                                     "    aliases: [phi, small]\n"))
    assert config.backends[0].aliases == ("phi", "small")


def test_no_local_only_request_ever_reaches_a_cloud(monkeypatch: pytest.MonkeyPatch) -> None:
    """A property over random residency headers, routes, prompts and fleet states (backends
    up, down, stale or ejected, any load; the cloud keyed or not, spent or not, failing or
    not): whatever the router decides, a request that is local-only (by its header, its
    route, or the keep-local gate finding a secret or personal data in it) has no cloud among
    its targets, nor among the attempts made of them; whether decide() is handed the async
    cascade's verdict (as RoutedUpstream.open does), classifies itself, or the classifier
    after the gate is a plugin that calls everything heavy."""
    import asyncio

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from exporter.routing.keep_local import KeepLocalGate
    from exporter.routing.service import Router
    from exporter.routing.upstream import residency_local, tries

    monkeypatch.setenv("ROUTER_TEST_KEY", "sk")
    router = Router(_config(ROUTER))
    heavy_router = Router(_config(ROUTER + "classifier: {plugin: 'tests.test_router:"
                                           "always_heavy'}\n"))
    heavy_router.backends = router.backends  # one fleet, two classifiers
    heavy_router.decider.backends = router.backends
    gate = KeepLocalGate()
    cloud = router.backends.clouds["cloud"]
    secrets = st.sampled_from(["", " card 4111 1111 1111 1111", " key sk-" + "a1" * 12,
                               " mail bob@example.com", " iban GB82WEST12345698765432",
                               " call +44 20 7946 0958", " order 4111 1111 1111 1112"])
    token = st.sampled_from([b"local", b"LOCAL", b"any", b"Any", b"strict", b"eu", b"",
                             b"local;strict", b"  "])
    header = st.lists(token, max_size=4).map(b", ".join)
    fleet = st.tuples(st.sampled_from(["up", "down", "stale", "ejected", "never"]),
                      st.integers(0, 60), st.floats(0.001, 30))

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(header, st.sampled_from(["auto", "private", "auto-heavy", "small", "big", "x"]),
           st.sampled_from(["hi", "Prove step by step that 97 is prime", "x" * 9000]),
           secrets, fleet, fleet, st.booleans(), st.booleans(), st.booleans(),
           st.sampled_from(["quick", "async", "plugin"]))
    def decide(value: bytes, model: str, text: str, secret: str, a: tuple[str, int, float],
               b: tuple[str, int, float], keyed: bool, spent: bool, failing: bool,
               path: str) -> None:
        local = residency_local(value)
        if local is None:
            return  # a 400 before any decision
        now = time.monotonic()
        for name, (health, waiting, ttft) in (("a", a), ("b", b)):
            sidecar = router.backends.sidecars[name]
            sidecar.breaker = Breaker(BreakerSpec())
            sidecar.state, sidecar.polled_at = None, None
            if health != "never":
                state = _state(waiting, ttft=ttft)
                state["upstream"]["up"] = health != "down"
                sidecar.polled(state, now - (60 if health == "stale" else 0))
            if health == "ejected":
                for _ in range(3):
                    sidecar.breaker.failure()
        monkeypatch.setenv("ROUTER_TEST_KEY", "sk" if keyed else "")
        cloud.breaker = Breaker(BreakerSpec())
        if failing:
            for _ in range(3):
                cloud.breaker.failure()
        if spent:
            monkeypatch.setattr(cloud, "budget_left", lambda: 0.0)
        else:
            monkeypatch.setattr(cloud, "budget_left", lambda: None)
        text += secret
        decider = heavy_router.decider if path == "plugin" else router.decider
        if path == "quick":
            decision = _decide(router, model, text, local)
        else:
            body = {"model": model, "messages": [{"role": "user", "content": text}]}
            verdict = asyncio.run(decider.classifier.classify(
                body, "/api/chat", decider.config.route_for(model).hybrid))
            decision = decider.decide("/api/chat", endpoint_for("POST", "/api/chat"),
                                      RequestInfo(model=model), body, local,
                                      classification=verdict)
        local_only = local or model == "private" or gate.check(text) != ""
        assert decision.local_only == local_only
        if local_only:
            assert all(t.cloud is None for t in decision.targets), (value, model, decision)
            assert all(t.cloud is None for t in tries(decision.targets))

    decide()


def test_a_final_cloud_429_cools_down_for_its_retry_after() -> None:
    """The last attempt's 429 is relayed to the client; the accounting still reads its
    Retry-After (it saw no headers before, and used one default cooldown)."""
    from prometheus_client import CollectorRegistry

    from exporter.record import RequestRecord
    from exporter.routing.accounting import RouterAccounting
    from exporter.routing.decide import Decision, Target
    from exporter.routing.metrics import RouterMetrics

    clock = Clock()
    spec = CloudSpec(name="c", base_url="http://127.0.0.1:9", api_key_env="NONE",
                     models={"m": "m"})
    cloud = Cloud(spec, Breaker(BreakerSpec(cooldown=1.0), clock), MemoryLedger())
    target = Target("c", "m", cloud=cloud, answer_headers=[(b"retry-after", b"30")])
    target.started()
    record = RequestRecord("POST", "/v1/chat/completions", 0.0)
    record.status = 429
    record.route = Decision("m", "expected_wait", "cloud_model", targets=[target],
                            chosen=target)
    RouterAccounting(RouterMetrics(CollectorRegistry()), access_log=False).finished(record)
    assert cloud.breaker.state == OPEN and cloud.breaker.cooldown == 30.0
    assert cloud.in_flight == 0
