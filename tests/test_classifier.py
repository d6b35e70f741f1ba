"""The router's classification (issue 17): the async interface and its deadline, the
keep-local gate, the last-turn rules, the shipped model offline, `llmtap classify`, the
training tools (tasks, checks, the fit and its curve)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from exporter.events import RequestInfo
from exporter.protocols import endpoint_for
from exporter.record import RequestRecord
from exporter.routing.classifier import HEAVY, LIGHT, LOCAL, Classification, load_cascade
from exporter.routing.config import (
    ClassifierSpec,
    HybridSpec,
    RouterConfig,
    Target,
    parse_config,
)
from exporter.routing.keep_local import KeepLocalGate, iban_valid, luhn
from exporter.routing.learn import checks
from exporter.routing.learn.curve import apgr, curve, normalised_apgr, share_for
from exporter.routing.rules import Rules

ROOT = Path(__file__).resolve().parent.parent
LABELS = ROOT / "benchmarks" / "routing" / "classifier_labels.jsonl"
HYBRID = HybridSpec(light="small", heavy="big")
PATH = "/v1/chat/completions"


def chat(*turns: str, **extra: Any) -> dict[str, Any]:
    """A chat whose turns alternate user, assistant, user, ..."""
    roles = ["user", "assistant"]
    return {"model": "auto", "messages": [{"role": roles[i % 2], "content": t}
                                          for i, t in enumerate(turns)], **extra}


def cascade(**spec: Any) -> Any:
    return load_cascade(RouterConfig(classifier=ClassifierSpec(**spec)))


# --------------------------------------------------------------------------- plugins


async def slow_plugin(body: dict[str, Any], path: str) -> str:
    await asyncio.sleep(5)
    return HEAVY


async def async_heavy(body: dict[str, Any], path: str) -> Classification:
    return Classification(HEAVY, 0.9, "plugin")


def raising_plugin(body: dict[str, Any], path: str) -> str:
    raise RuntimeError("boom")


THREADS: list[str] = []


def sync_plugin(body: dict[str, Any], path: str) -> tuple[str, float]:
    THREADS.append(threading.current_thread().name)
    time.sleep(0.2)  # blocking: it must not block the event loop
    return HEAVY, 0.8


def sync_hang(body: dict[str, Any], path: str) -> str:
    time.sleep(1.0)
    return HEAVY


def always_heavy(body: dict[str, Any], path: str) -> str:
    return HEAVY


async def test_a_slow_plugin_costs_at_most_the_deadline_then_the_fallback() -> None:
    slow = cascade(plugin="tests.test_classifier:slow_plugin", deadline=0.05)
    start = time.perf_counter()
    verdict = await slow.classify(chat("hello"), PATH, HYBRID)
    assert time.perf_counter() - start < 0.5
    assert verdict == Classification(LIGHT, None, "timeout")
    # The route's own fallback, where it says heavy.
    verdict = await slow.classify(chat("hello"), PATH, HybridSpec("s", "b", fallback=HEAVY))
    assert verdict == Classification(HEAVY, None, "timeout")
    # A blocking sync plugin is cut at the deadline too (its thread finishes on its own).
    hang = cascade(plugin="tests.test_classifier:sync_hang", deadline=0.05)
    start = time.perf_counter()
    assert (await hang.classify(chat("hello"), PATH, HYBRID)).reason == "timeout"
    assert time.perf_counter() - start < 0.5


async def test_a_plugin_hung_for_good_does_not_queue_requests_without_bound() -> None:
    from exporter.routing.classifier import Cascade, Plugin
    from exporter.routing.keep_local import KeepLocalGate
    from exporter.routing.threads import Threads

    threads = Threads(workers=2, max_busy=4)
    hung = Cascade(ClassifierSpec(deadline=0.02), KeepLocalGate(), Plugin(sync_hang, threads))
    verdicts = await asyncio.gather(*(hung.classify(chat("hi"), PATH, HYBRID)
                                      for _ in range(6)))
    assert sorted(v.reason if v else "" for v in verdicts) == \
        ["overloaded"] * 2 + ["timeout"] * 4
    assert threads.busy == 2  # two still sleeping (the two queued were cancelled unrun)
    await asyncio.to_thread(threads.executor.shutdown, wait=True)
    assert threads.busy == 0


async def test_a_raising_plugin_falls_back_and_is_counted() -> None:
    from prometheus_client import CollectorRegistry

    from exporter.routing.accounting import RouterAccounting
    from exporter.routing.metrics import RouterMetrics
    from exporter.routing.service import Router

    config = parse_config({
        "allow_unauthenticated_cloud": True,
        "backends": [{"name": "a", "proxy_url": "http://a:1", "admin_url": "http://a:2"}],
        "cloud": [{"name": "c", "base_url": "http://c/v1", "api_key_env": "NOPE_KEY",
                   "models": {"big": "big"}}],
        "routes": [{"model": "auto", "hybrid": {"light": "small", "heavy": "big"}}],
        "classifier": {"plugin": "tests.test_classifier:raising_plugin"}})
    router = Router(config)
    body = chat("hello")
    verdict = await router.decider.classifier.classify(body, PATH, config.routes[0].hybrid)
    assert verdict == Classification(LIGHT, None, "error")
    decision = router.decider.decide(PATH, endpoint_for("POST", PATH), RequestInfo(model="auto"),
                                     body, False, classification=verdict)
    assert decision.klass == LIGHT and decision.classification == verdict
    metrics = RouterMetrics(CollectorRegistry())
    record = RequestRecord("POST", PATH, 0.0)
    record.route = decision
    RouterAccounting(metrics, access_log=False).finished(record)
    assert metrics.classifications.labels("auto", LIGHT, "error")._value.get() == 1


async def test_a_sync_plugin_runs_on_the_classifiers_thread_not_the_loop() -> None:
    THREADS.clear()
    plugin = cascade(plugin="tests.test_classifier:sync_plugin", deadline=1.0)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    verdict = await plugin.classify(chat("hello"), PATH, HYBRID)
    ticker.cancel()
    assert verdict == Classification(HEAVY, 0.8, "plugin")
    assert THREADS and THREADS[0].startswith("llmtap-classify")
    assert ticks >= 5  # the loop kept running while the plugin slept
    fast = cascade(plugin="tests.test_classifier:async_heavy")
    assert await fast.classify(chat("hello"), PATH, HYBRID) == Classification(HEAVY, 0.9,
                                                                               "plugin")


async def test_the_gate_runs_first_on_every_route_and_non_hybrid_routes_say_nothing() -> None:
    heavy = cascade(plugin="tests.test_classifier:always_heavy")
    card = chat("charge 4111 1111 1111 1111 please")
    assert await heavy.classify(card, PATH, HYBRID) == Classification(LOCAL, None, "cards")
    assert await heavy.classify(card, PATH, None) == Classification(LOCAL, None, "cards")
    assert await heavy.classify(chat("hello"), PATH, None) is None
    assert (await heavy.classify(chat("hello"), PATH, HYBRID)).label == HEAVY
    # Anywhere in the body: a tool call's arguments, an earlier turn, the system prompt.
    tool = {"model": "auto", "messages": [
        {"role": "assistant", "tool_calls": [{"function": {
            "name": "pay", "arguments": '{"iban": "DE89 3704 0044 0532 0130 00"}'}}]},
        {"role": "user", "content": "done?"}]}
    assert (await heavy.classify(tool, PATH, HYBRID)).reason == "ibans"
    big = chat("x " * 40_000 + " my key is AKIAIOSFODNN7EXAMPLE")  # scanned on a thread
    assert (await heavy.classify(big, PATH, None)).reason == "secrets"


# --------------------------------------------------------------------------- the gate


@pytest.mark.parametrize(("text", "found"), [
    ("my card: 4111 1111 1111 1111, exp 12/29", "cards"),
    ("4242-4242-4242-4242", "cards"),
    ("amex 378282246310005", "cards"),
    ("IBAN DE89 3704 0044 0532 0130 00", "ibans"),
    ("pay GB82WEST12345698765432 today", "ibans"),
    ("OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwxyz0123", "secrets"),
    ("AKIAIOSFODNN7EXAMPLE", "secrets"),
    ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "secrets"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA", "secrets"),
    ("password: hunter2hunter2", "secrets"),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     "secrets"),
    ("write to jane.doe@example.co.uk", "emails"),
    ("call me on +44 20 7946 0958", "phones"),
    ("US office: (555) 123-4567", "phones"),
])
def test_the_gate_finds_secrets_and_personal_data(text: str, found: str) -> None:
    assert KeepLocalGate().check(text) == found


@pytest.mark.parametrize("text", [
    "order number 4111 1111 1111 1112",  # fails Luhn
    "GB82WEST12345698765431",  # fails mod 97
    "What is 123456789 * 987654321?",
    "What is 12 * 34 - 567?",
    "at 2024-01-15 12:30:45, id 1700000000000",
    "@dataclass\ndef f(): pass",
    "pi is 3.14159265358979",
    "Who proved Fermat's last theorem?",
    "the sk-learn docs",
    "version 10.2.3.4, build 2024-05",
])
def test_the_gate_leaves_ordinary_text_alone(text: str) -> None:
    assert KeepLocalGate().check(text) == ""


def test_luhn_iban_and_which_detectors_run() -> None:
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    assert luhn("79927398713")  # the textbook example
    assert iban_valid("DE89370400440532013000") and not iban_valid("DE89370400440532013001")
    only_cards = KeepLocalGate(["cards"])
    assert only_cards.check("bob@example.com +44 20 7946 0958") == ""
    assert only_cards.check("4111111111111111") == "cards"
    assert KeepLocalGate([]).check("4111111111111111") == ""
    with pytest.raises(ValueError):
        KeepLocalGate(["cardz"])
    config = parse_config({"backends": [{"name": "a", "proxy_url": "http://a:1",
                                         "admin_url": "http://a:2"}],
                           "keep_local": ["secrets", "cards"]})
    assert config.keep_local == ("secrets", "cards")
    from exporter.config import ConfigError

    with pytest.raises(ConfigError, match="keep_local: unknown detector 'mail'"):
        parse_config({"backends": [{"name": "a", "proxy_url": "http://a:1",
                                    "admin_url": "http://a:2"}], "keep_local": ["mail"]})


def test_the_gate_is_linear_on_hostile_input() -> None:
    gate = KeepLocalGate()
    for hostile in ("1" * 200_000, "1 " * 100_000, "a@" * 100_000, "+1" * 100_000,
                    "A1" * 100_000):
        start = time.perf_counter()
        gate.check(hostile)
        assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------- rules


def test_the_rules_read_the_last_turn() -> None:
    rules = Rules(ClassifierSpec())
    # The false positives:
    assert rules(chat("Who proved Fermat's last theorem?")) == ""
    assert rules(chat("hi", max_tokens=4096)) == ""  # a cap is not a need
    snippet = chat("Show me hello world in Python",
                   "```python\nprint('hello world')\n```", "thanks! and what is 2 + 2?")
    assert rules(snippet) == ""  # the code was in an earlier assistant turn
    # ... and its false negative:
    assert rules(chat("design a lock-free MPMC queue with bounded capacity")) == "reasoning"
    # What stays heavy:
    assert rules(chat("Prove step by step that sqrt(2) is irrational")) == "reasoning"
    assert rules(chat("Can you prove that there are infinitely many primes?")) == "reasoning"
    assert rules(chat("Fix this:\n```python\nprint(1)\n```")) == "code"
    assert rules(chat("earlier", "ok", "def add(a, b):\n    return a - b\nwhat is wrong?")) \
        == "code"
    assert rules(chat("x" * 9000)) == "long_prompt"
    long_context = {"model": "auto", "messages": [{"role": "system", "content": "y" * 9000},
                                                  {"role": "user", "content": "summarise"}]}
    assert rules(long_context) == "long_prompt"
    assert rules({"prompt": "Tell me a joke", "system": "be brief"}) == ""
    # heavy_max_tokens, where an operator turns it on.
    capped = Rules(ClassifierSpec(heavy_max_tokens=1000))
    assert capped({"prompt": "hi", "options": {"num_predict": 1000}}) == "max_tokens"


async def test_rules_and_gate_through_the_cascade_without_a_model() -> None:
    plain = cascade()
    assert await plain.classify(chat("Who proved Fermat's last theorem?"), PATH, HYBRID) == \
        Classification(LIGHT, None, "rules")
    assert await plain.classify(chat("debug my race condition"), PATH, HYBRID) == \
        Classification(HEAVY, None, "reasoning")
    no_rules = cascade(rules=False)
    assert (await no_rules.classify(chat("debug this"), PATH, HYBRID)).label == LIGHT


# --------------------------------------------------------------------------- shipped model


def test_the_shipped_model_loads_and_classifies_offline(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """No network and an empty home (no cache to fall back on): the weights and tokenizer
    come from the wheel, and nothing is written anywhere."""
    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from exporter.routing.learned import BUILTIN, LearnedClassifier, load_model

    model = load_model("builtin")
    assert model.embedder["kind"] == "wordllama" and model.embedder["config"] == "l2_supercat"
    assert model.meta["trained_against"]["tasks"] > 500
    assert BUILTIN.stat().st_size < 64_000
    learned = cascade(model="builtin")
    verdicts = asyncio.run(_classify_all(learned, [
        chat("hi"), chat("What is the capital of France?"),
        chat("What is 48 * 73 - 519? Reply with the number only."),
        chat("Write a Python function rle(s) that run-length encodes s.")]))
    p = [v.p_heavy for v in verdicts]
    assert all(v.reason == "model" for v in verdicts)
    assert all(x is not None and 0 <= x <= 1 for x in p)
    assert (p[0] or 0) < (p[2] or 0)  # chit-chat below hard arithmetic
    assert list(tmp_path.iterdir()) == []
    assert isinstance(learned.model, LearnedClassifier)


async def _classify_all(c: Any, bodies: list[dict[str, Any]]) -> list[Classification]:
    return [await c.classify(b, PATH, HYBRID) for b in bodies]


def test_llmtap_classify_reads_bodies_and_writes_one_line_each(tmp_path: Path) -> None:
    lines = [json.dumps(chat("hi")), json.dumps(chat("Prove step by step that 7 is prime")),
             json.dumps(chat("my card is 4111 1111 1111 1111")), "not json",
             json.dumps({"prompt": "What is 2 + 2?"})]
    done = subprocess.run([sys.executable, "-m", "exporter", "classify"], cwd=ROOT,
                          input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=60)
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(out) == 5 and all(set(o) == {"label", "p_heavy", "reason"} for o in out)
    assert out[0]["label"] in (LIGHT, HEAVY) and out[0]["reason"] == "model"
    assert out[1] == {"label": HEAVY, "p_heavy": None, "reason": "reasoning"}
    assert out[2] == {"label": LOCAL, "p_heavy": None, "reason": "cards"}
    assert out[3] == {"label": None, "p_heavy": None, "reason": "invalid_json"}
    assert done.returncode == 1  # one line was not a request
    # With a config: its classifier (here: rules only) and keep_local list.
    config = tmp_path / "router.yaml"
    config.write_text("backends: [{name: a, proxy_url: 'http://a:1', admin_url: 'http://a:2'}]\n"
                      "keep_local: [secrets]\n")
    done = subprocess.run([sys.executable, "-m", "exporter", "classify", "--config",
                           str(config)], cwd=ROOT, input="\n".join([lines[0], lines[2]]) + "\n",
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        {"label": LIGHT, "p_heavy": None, "reason": "rules"},
        {"label": LIGHT, "p_heavy": None, "reason": "rules"}]


def test_classifier_config_errors() -> None:
    from exporter.config import ConfigError

    base = {"backends": [{"name": "a", "proxy_url": "http://a:1", "admin_url": "http://a:2"}]}
    for section, message in [
            ({"plugin": "x:y", "model": "builtin"}, "plugin and model"),
            ({"deadline": 0}, "classifier.deadline"),
            ({"embeddings": {"url": "nope"}}, "classifier.embeddings.url"),
            ({"modle": "builtin"}, "classifier.modle: unknown key")]:
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "classifier": section})
    with pytest.raises(ConfigError, match=r"classifier\.model"):
        load_cascade(parse_config({**base, "classifier": {"model": "/no/such/model.json"}}))
    spec = parse_config({**base, "classifier": {"model": "builtin", "threshold": 0.7,
                                                "deadline": 0.02}}).classifier
    assert (spec.model, spec.target, spec.deadline, spec.heavy_max_tokens) == \
        ("builtin", Target("threshold", 0.7), 0.02, None)


CLOUD = {"name": "c", "base_url": "https://api.example.com/v1", "api_key_env": "K",
         "models": {"big": "frontier-1"}}
BASE: dict[str, Any] = {"backends": [{"name": "a", "proxy_url": "http://a:1", "admin_url": "http://a:2"}],
        "cloud": [CLOUD], "allow_unauthenticated_cloud": True}


def _route(**hybrid: Any) -> dict[str, Any]:
    return {"model": "auto", "hybrid": {"light": "small", "heavy": "big", **hybrid}}


def test_a_threshold_target_says_one_thing_clearly() -> None:
    """threshold, cloud_share or quality: at most one, each in [0, 1], in the classifier
    section or a hybrid route; a share or quality target needs a learned model."""
    from exporter.config import ConfigError

    cases: list[tuple[dict[str, Any], str]] = [
            ({"classifier": {"model": "builtin", "threshold": 0.5, "cloud_share": 0.3}},
             r"classifier: threshold and cloud_share are ways to say one thing"),
            ({"classifier": {"model": "builtin", "cloud_share": 0.3, "quality": 0.9}},
             r"cloud_share and quality"),
            ({"classifier": {"model": "builtin", "cloud_share": 1.2}},
             r"classifier\.cloud_share: expected a share of requests in \[0, 1\]"),
            ({"classifier": {"model": "builtin", "quality": -0.1}}, r"classifier\.quality"),
            ({"classifier": {"model": "builtin", "quality": "high"}},
             r"classifier\.quality: expected float"),
            ({"classifier": {"threshold": 1.5}}, r"classifier\.threshold: expected a probab"),
            ({"classifier": {"cloud_share": 0.3}},
             r"classifier\.cloud_share: .*no classifier\.model is set"),
            ({"classifier": {"plugin": "x:y", "quality": 0.9}},
             r"classifier\.quality: .*a plugin's p\(heavy\) has none"),
            ({"routes": [_route(cloud_share=0.2, quality=0.9)]},
             r"routes\[0\]\.hybrid: cloud_share and quality"),
            ({"routes": [_route(quality=0.95)]},
             r"routes\[0\]\.hybrid\.quality: .*no classifier\.model"),
            ({"routes": [_route(cloud_share=2)]}, r"routes\[0\]\.hybrid\.cloud_share")]
    for raw, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_config({**BASE, **raw})
    config = parse_config({**BASE, "classifier": {"model": "builtin", "quality": 0.9},
                           "routes": [_route(cloud_share=0.25), _route(threshold=0.6),
                                      _route()]})
    assert config.classifier.target == Target("quality", 0.9)
    assert [r.hybrid.target for r in config.routes if r.hybrid] == \
        [Target("cloud_share", 0.25), Target("threshold", 0.6), None]


def test_a_target_picks_its_threshold_from_the_models_calibration() -> None:
    from exporter.routing.learned import Calibration, Model

    cal = Calibration(shares=(0.0, 0.25, 0.5, 0.75, 1.0),
                      thresholds=(1.0, 0.8, 0.6, 0.3, 0.1),
                      quality=(0.4, 0.7, 0.9, 0.95, 1.0))
    assert cal.threshold(Target("cloud_share", 0.5)) == pytest.approx(0.6)
    assert cal.threshold(Target("cloud_share", 0.375)) == pytest.approx(0.7)  # between
    assert cal.threshold(Target("cloud_share", 0.0)) == float("inf")  # nothing heavy
    assert cal.threshold(Target("cloud_share", 1.0)) == 0.0  # everything heavy
    assert cal.share_for_quality(0.9) == pytest.approx(0.5)
    assert cal.share_for_quality(0.8) == pytest.approx(0.375)
    assert cal.share_for_quality(0.3) == 0.0  # the local model alone reaches it
    assert cal.threshold(Target("quality", 0.95)) == pytest.approx(0.3)
    assert cal.threshold(Target("quality", 0.8)) == pytest.approx(0.7)
    assert cal.threshold(Target("threshold", 0.42)) == 0.42
    with pytest.raises(ValueError, match="rise"):
        Calibration((0.0, 0.5, 0.4), (1.0, 0.5, 0.2), (0.4, 0.5, 0.6))
    # A model file's calibration survives the round trip; without one only a threshold.
    import numpy as np

    model = Model(np.zeros(3, dtype=np.float32), 0.0, 0.5, {"kind": "server", "dim": 0},
                  calibration=cal)
    again = Model.from_json(model.to_json())
    assert again.calibration == cal and again.threshold_for(None) == 0.5
    bare = Model(np.zeros(3, dtype=np.float32), 0.0, 0.5, {"kind": "server", "dim": 0})
    from exporter.config import ConfigError

    with pytest.raises(ConfigError, match="no calibration"):
        bare.threshold_for(Target("quality", 0.9))
    assert bare.threshold_for(Target("threshold", 0.2)) == 0.2


def test_the_shipped_model_turns_each_routes_target_into_its_threshold() -> None:
    """A larger cloud share or quality target is a lower threshold; a route's own target
    decides that route's label; every figure comes from the model file's calibration."""
    from exporter.routing.learned import LearnedClassifier, load_model

    model = load_model("builtin")
    cal = model.calibration
    assert cal is not None and cal.shares[0] == 0 and cal.shares[-1] == 1
    assert list(cal.quality) == sorted(cal.quality) and cal.quality[-1] == pytest.approx(1)
    config = parse_config({**BASE, "classifier": {"model": "builtin", "cloud_share": 0.1},
                           "routes": [_route(cloud_share=0.8), _route(quality=0.99)]})
    c = load_cascade(config)
    assert isinstance(c.model, LearnedClassifier)
    low, high = c.model.threshold, c.threshold_for(Target("cloud_share", 0.8))
    assert low == pytest.approx(cal.for_share(0.1)) and high < low
    assert c.threshold_for(Target("quality", 0.99)) <= \
        c.threshold_for(Target("quality", 0.9))
    body = chat("What is 48 * 73 - 519? Reply with the number only.")

    def verdict(hybrid: HybridSpec) -> Classification:
        answer = asyncio.run(c.classify(body, PATH, hybrid))
        assert answer is not None
        return answer

    p = verdict(HYBRID).p_heavy
    assert p is not None
    wide = HybridSpec(light="small", heavy="big", target=Target("threshold", p))
    narrow = HybridSpec(light="small", heavy="big", target=Target("threshold",
                                                                  min(1.0, p + 1e-3)))
    assert verdict(wide).label == HEAVY and verdict(narrow).label == LIGHT


# --------------------------------------------------------------------------- training


def test_checks_read_rambling_answers_fairly() -> None:
    assert checks.check_number("7 + 5 = 12\n\nThis is a classic example", 12)
    assert checks.check_number("The answer is 1,234.", 1234)
    assert not checks.check_number("7 + 5 = 13", 12)
    assert checks.check_choice("19 is larger than 1.", "19", ["19", "1"], "first")
    assert checks.check_choice("The day after Sunday is Monday.", "Monday",
                               ["Monday", "Sunday"], "last")
    assert not checks.check_choice("yes and no", "yes", ["yes", "no"])
    assert checks.check_token("POCKET", "POCKET") and not checks.check_token("Pocket", "POCKET")
    assert checks.check_json('Sure: {"name": "Ben", "age": 30} done', {"name": "ben", "age": 30})
    assert not checks.check_json('{"name": "Ben"}', {"name": "Ben", "age": 30})
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    assert checks.check_code(good, "assert add(2, 3) == 5")
    assert not checks.check_code(good.replace("+", "-"), "assert add(2, 3) == 5")
    start = time.perf_counter()
    assert not checks.check_code("def f():\n    while True: pass\nf()", "", timeout=1.0)
    assert time.perf_counter() - start < 4


def test_the_task_generator_is_varied_and_reproducible() -> None:
    from exporter.routing.learn.tasks import FAMILIES, every_family, generate

    tasks = list(generate(per_family=12))
    assert tasks == list(generate(per_family=12))
    assert {t["family"] for t in tasks} == set(every_family()) and len(every_family()) >= 30
    # The third batch is appended: the first 23 families' tasks are what they were.
    assert tasks[:12 * len(FAMILIES)] == list(generate(per_family=12, families=FAMILIES))
    assert {t["level"] for t in tasks} == {1, 2, 3, 4}
    framed = [t["body"]["messages"] for t in tasks]
    assert any(m[0]["role"] == "system" for m in framed)
    assert any(len(m) >= 3 for m in framed)  # multi-turn chats
    assert any("```" in str(m[:-1]) for m in framed)  # code in an earlier turn


def test_the_curve_and_apgr_have_their_anchors() -> None:
    correct = [True, False, False, True, False, False, False, True]  # w = 3/8
    perfect = curve([0.0 if c else 1.0 for c in correct], correct)
    assert apgr(perfect) == pytest.approx((1 + 3 / 8) / 2)
    assert normalised_apgr(perfect) == pytest.approx(1.0)
    flat = curve([0.5] * 8, correct)  # one tie group: the straight line = random
    assert apgr(flat) == pytest.approx(0.5) and normalised_apgr(flat) == pytest.approx(0.0)
    assert share_for(perfect, 1.0) == pytest.approx(5 / 8)
    # Normalised APGR is the accuracy ratio of this gain curve, 2 AUC - 1 (AUC: how often a
    # heavy item scores above a light one, ties half): a target of 0.5 is an AUC of 0.75.
    rng = random.Random(3)
    right = [rng.random() < 0.3 for _ in range(400)]
    scores = [round(rng.gauss(0.0 if r else 0.8, 1.0), 1) for r in right]  # with ties
    heavy = [s for s, r in zip(scores, right, strict=True) if not r]
    light = [s for s, r in zip(scores, right, strict=True) if r]
    auc = sum((h > li) + 0.5 * (h == li) for h in heavy for li in light) / (
        len(heavy) * len(light))
    assert normalised_apgr(curve(scores, right)) == pytest.approx(2 * auc - 1, abs=1e-9)


def test_the_labelled_set_and_the_shipped_model_agree() -> None:
    """The benchmark's data is small and its length alone does not give the label away."""
    assert LABELS.stat().st_size < 2_000_000
    records = [json.loads(line) for line in LABELS.read_text().splitlines()]
    from exporter.routing.learned import load_model
    from exporter.routing.turns import prompt_text

    model = load_model("builtin")
    assert model.meta["trained_against"]["tasks"] == len(records)
    right = [r["local_correct"] for r in records]
    assert 0.05 < sum(right) / len(right) < 0.95
    length = curve([float(len(prompt_text(r["body"]))) for r in records], right)
    assert normalised_apgr(length) < 0.3
    # They are the tasks `llmtap classifier tasks` writes (its defaults), labelled.
    from exporter.routing.learn.tasks import generate

    made = [{k: t[k] for k in ("id", "family", "level", "body", "check")}
            for t in generate(per_family=100)]
    assert made == [{k: r[k] for k in ("id", "family", "level", "body", "check")}
                    for r in records]


@pytest.mark.llamacpp
async def test_a_model_trained_on_the_servers_own_embeddings(tmp_path: Path) -> None:
    """The other embedder: the real llama-server's /v1/embeddings (SmolLM2, mean-pooled),
    used to fit a model and then to classify through the cascade, as classifier.embeddings
    configures it."""
    from exporter.routing.embedding import ServerEmbedder
    from exporter.routing.learn import fit
    from exporter.routing.learn.tasks import generate
    from exporter.routing.learned import LearnedClassifier
    from tests.helpers import LlamaServer

    server = LlamaServer("--embeddings", "--pooling", "mean")
    try:
        url = server.url + "/v1/embeddings"
        embedder = ServerEmbedder(url)
        vectors = await embedder.embed(["hello there", "What is 48 * 73?"])
        assert vectors.shape[0] == 2 and vectors.shape[1] >= 64
        assert np_norms(vectors) == pytest.approx([1.0, 1.0], abs=1e-4)
        records = [{**t, "local_correct": t["level"] == 1}
                   for t in generate(per_family=4) if t["family"] in ("arithmetic", "units")]
        model = fit.train(records, ServerEmbedder(url))
        assert model.embedder == {"kind": "server", "model": "", "dim": vectors.shape[1]}
        assert "last" in model.blocks  # it reads the server's embeddings
        path = tmp_path / "server-model.json"
        path.write_text(json.dumps(model.to_json()))
        config = parse_config({
            "backends": [{"name": "a", "proxy_url": "http://a:1", "admin_url": "http://a:2"}],
            "classifier": {"model": str(path), "deadline": 5, "embeddings": {"url": url}}})
        cascade = load_cascade(config)
        assert isinstance(cascade.model, LearnedClassifier)
        verdict = await cascade.classify(chat("What is 3 + 4?"), PATH, HYBRID)
        assert verdict is not None and verdict.reason == "model"
        assert isinstance(cascade.model.embedder, ServerEmbedder)
        await cascade.model.embedder.close()
        await embedder.close()
    finally:
        server.stop()


def np_norms(vectors: Any) -> list[float]:
    import numpy as np

    return [float(x) for x in np.linalg.norm(vectors, axis=1)]


async def test_a_hung_or_dead_embeddings_server_costs_at_most_the_deadline(
        tmp_path: Path) -> None:
    """The learned model's own path under the deadline: an embeddings endpoint that accepts
    the connection and never answers, and one that refuses it, each cost the request at most
    `classifier.deadline` and give it the route's fallback."""
    import numpy as np

    from exporter.routing.learned import Model

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts (the kernel does) and never answers
    hung_port = listener.getsockname()[1]
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    model = Model(np.zeros(0, dtype=np.float32), 0.0, 0.5, {"kind": "server", "dim": 4},
                  blocks=("last", "context", "scalars", "cues"))
    model.weights = np.zeros(model.width(4), dtype=np.float32)
    path = tmp_path / "server-model.json"
    path.write_text(json.dumps(model.to_json()))
    try:
        for port, reasons in ((hung_port, {"timeout"}), (dead_port, {"error", "timeout"})):
            config = parse_config({
                "backends": [{"name": "a", "proxy_url": "http://a:1", "admin_url": "http://a:2"}],
                "classifier": {"model": str(path), "deadline": 0.05,
                               "embeddings": {"url": f"http://127.0.0.1:{port}/v1/embeddings"}}})
            c = load_cascade(config)
            for fallback in (LIGHT, HEAVY):
                start = time.perf_counter()
                verdict = await c.classify(chat("What is 2 + 2?"), PATH,
                                           HybridSpec("small", "big", fallback=fallback))
                assert time.perf_counter() - start < 0.3
                assert verdict is not None and verdict.label == fallback
                assert verdict.reason in reasons and verdict.p_heavy is None
            await c.close()
    finally:
        listener.close()


def test_docs_show_the_benchmarks_curve_and_the_command_that_made_it() -> None:
    """docs/routing.md's classifier figures are the results page's, row for row, and name
    the command that made them."""
    results = (ROOT / "benchmarks" / "routing" / "classifier_results.md").read_text()
    docs = (ROOT / "docs" / "routing.md").read_text()
    section = docs[docs.index("#### How well it routes"):docs.index("### Ollama clients")]
    assert "python -m benchmarks.routing.classifier_bench" in section
    assert "python -m benchmarks.routing.classifier_bench" in results

    def rows(text: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("|") and len(cells) >= 4:
                found.setdefault(cells[0], cells[1:])
        return found

    # The results page's headline table (the first on the page) gives the normalised APGR
    # and the cloud share for 95% quality leaving one family out; its summary table gives
    # the normalised APGR of the same routers on the two fixed splits.
    headline = rows(results[:results.index("q@s:")])
    splits = rows(results[results.index("## Normalised APGR, three ways"):
                          results.index("## The second batch")])
    shown = rows(section)
    pairs = [("learned, families never seen", "learned (out of family)"),
             ("cascade (rules, then learned)", "cascade: rules, then learned"),
             ("cue prior alone", "cue prior alone (nothing fitted)"),
             ("rules (this version)", "rules (this version)"),
             ("prompt length", "prompt length"),
             ("last-turn length", "last-turn length"),
             ("random", "random (20 seeds, mean)")]
    for name, key in pairs:
        assert name in shown, name
        normalised, share = headline[key][1], headline[key][2]
        assert shown[name][:4] == [normalised, share, *splits[key][1:3]], (name, shown[name])
    own = "learned on the local model's own embeddings"
    assert shown[own][0] == splits[own][0] and shown[own][2:4] == splits[own][1:3]
    reading = re.search(r"own embeddings .*?p50 ([\d.]+) ms, p99 ([\d.]+) ms", results)
    assert reading is not None and f"p50 {reading[1]} ms, p99 {reading[2]} ms" in section
    latency = re.search(r"p50 ([\d.]+) ms, p99 ([\d.]+) ms", results)
    assert latency is not None
    assert f"p50 {latency[1]} ms, p99 {latency[2]} ms" in section


def _right_and_wrong(spec: dict[str, Any]) -> tuple[str, str]:
    """A right answer built from a task's check, and a plainly wrong one."""
    kind, expected = spec["kind"], spec["expected"]

    def number(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    if kind == "number":
        return number(expected), number(expected + 1)
    if kind == "choice":
        assert expected in spec["options"]
        return expected, next(o for o in spec["options"] if o != expected)
    if kind == "yes_no":
        return expected, "no" if expected == "yes" else "yes"
    assert kind in ("word", "token") and expected
    return expected, expected[:-1] if len(expected) > 1 else expected * 2


def test_the_third_batch_of_families_checks_right_and_wrong_answers() -> None:
    from exporter.routing.learn.tasks_third import THIRD_FAMILIES, in_words, roman_numeral

    assert roman_numeral(1994) == "MCMXCIV" and roman_numeral(49) == "XLIX"
    assert in_words(45602, british=True) == "forty-five thousand six hundred and two"
    assert in_words(3007) == "three thousand seven" and in_words(90) == "ninety"
    assert len(THIRD_FAMILIES) == 10
    for name, make in THIRD_FAMILIES.items():
        rng = random.Random(f"third-{name}")
        for level in (1, 2, 3, 4):
            for _ in range(6):
                question, spec, max_tokens = make(rng, level)
                assert question and 8 <= max_tokens <= 64, (name, level)
                right, wrong = _right_and_wrong(spec)
                for answer in (right, f"Sure! The answer is {right}.",
                               f"{right}\n\nHope this helps with the rest of your homework."):
                    assert checks.check(answer, spec), (name, level, question, answer)
                assert not checks.check(wrong, spec), (name, level, question, wrong)
                assert not checks.check(f"The answer is {wrong}.", spec), (name, question)
        asked = {make(rng, 1 + i % 4)[0] for i in range(40)}
        assert len(asked) >= 3, name
