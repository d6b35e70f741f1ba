"""The router's classification (issue 17): the async interface and its deadline, the
keep-local gate, the last-turn rules, the shipped model offline, `llmtap classify`, the
training tools (tasks, checks, the fit and its curve)."""

from __future__ import annotations

import asyncio
import json
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
from exporter.routing.config import ClassifierSpec, HybridSpec, RouterConfig, parse_config
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
            ({"threshold": 1.5}, "classifier.threshold"),
            ({"deadline": 0}, "classifier.deadline"),
            ({"embeddings": {"url": "nope"}}, "classifier.embeddings.url"),
            ({"modle": "builtin"}, "classifier.modle: unknown key")]:
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "classifier": section})
    with pytest.raises(ConfigError, match=r"classifier\.model"):
        load_cascade(parse_config({**base, "classifier": {"model": "/no/such/model.json"}}))
    spec = parse_config({**base, "classifier": {"model": "builtin", "threshold": 0.7,
                                                "deadline": 0.02}}).classifier
    assert (spec.model, spec.threshold, spec.deadline, spec.heavy_max_tokens) == \
        ("builtin", 0.7, 0.02, None)


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
    from exporter.routing.learn.tasks import FAMILIES, generate

    tasks = list(generate(per_family=12))
    assert tasks == list(generate(per_family=12))
    assert {t["family"] for t in tasks} == set(FAMILIES) and len(FAMILIES) >= 10
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


def test_the_labelled_set_and_the_shipped_model_agree() -> None:
    """The benchmark's data is small and its length alone does not give the label away."""
    assert LABELS.stat().st_size < 1_000_000
    records = [json.loads(line) for line in LABELS.read_text().splitlines()]
    from exporter.routing.learned import load_model
    from exporter.routing.turns import prompt_text

    model = load_model("builtin")
    assert model.meta["trained_against"]["tasks"] == len(records)
    right = [r["local_correct"] for r in records]
    assert 0.05 < sum(right) / len(right) < 0.95
    length = curve([float(len(prompt_text(r["body"]))) for r in records], right)
    assert normalised_apgr(length) < 0.3


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
        path = tmp_path / "server-model.json"
        path.write_text(json.dumps(model.to_json()))
        config = parse_config({
            "backends": [{"name": "a", "proxy_url": "http://a:1", "admin_url": "http://a:2"}],
            "classifier": {"model": str(path), "deadline": 5, "embeddings": {"url": url}}})
        cascade = load_cascade(config)
        assert isinstance(cascade.model, LearnedClassifier)
        verdict = await cascade.classify(chat("What is 3 + 4?"), PATH, HYBRID)
        assert verdict is not None and verdict.reason == "model"
        await cascade.model.embedder.close()
        await embedder.close()
    finally:
        server.stop()


def np_norms(vectors: Any) -> list[float]:
    import numpy as np

    return [float(x) for x in np.linalg.norm(vectors, axis=1)]
