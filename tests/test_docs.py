"""The README stays true: every flag, env var and exported metric is documented."""

from __future__ import annotations

from pathlib import Path

from exporter.config import OPTIONS
from tests.helpers import (
    Llmtap,
    LlmtapRouter,
    Metrics,
    RedisServer,
    Simulator,
    catalogued_names,
)

ROOT_DIR = Path(__file__).resolve().parent.parent
README = (ROOT_DIR / "README.md").read_text()


def test_readme_documents_every_option() -> None:
    for option in OPTIONS:
        assert f"`{option.flag} " in README, option.flag
        assert f"`{option.env}`" in README, option.env


def test_readme_documents_every_metric_llmtap_exports(sim_tap: Llmtap) -> None:
    metrics: Metrics = sim_tap.metrics()
    families = {line.split()[2] for line in metrics.text.splitlines()
                 if line.startswith("# TYPE ")}
    assert families, "nothing exported"
    for family in families:  # counters' families lack the _total the README shows
        assert f"`{family}" in README, f"{family} is missing from the README's catalogue"


def test_openmetrics_when_asked(sim_tap: Llmtap) -> None:
    import urllib.request

    request = urllib.request.Request(
        sim_tap.admin + "/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert resp.read().rstrip().endswith(b"# EOF")


def test_operations_page_cites_tests_that_exist() -> None:
    """docs/operations.md states guarantees with the tests that prove them: every cited
    file and test must exist, or the page is making promises nothing checks."""
    import re

    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "operations.md").read_text()
    cited = re.findall(r"`(tests/[\w/]+\.py|alerts/[\w/]+\.yml|benchmarks/[\w/.]+)"
                       r"(?:::(\w+))?`", page)
    assert cited
    current = None
    for path, name in cited:
        assert (root / path).is_file(), path
        current = path
        if name:
            assert f"def {name}(" in (root / current).read_text(), f"{path}::{name}"
    for name in re.findall(r"`::(\w+)`", page):  # short form: same file as the cell's first
        assert any(f"def {name}(" in (root / p).read_text() for p, _ in cited
                   if p.endswith(".py")), name


def test_every_catalogued_metric_is_really_exported(sim: Simulator, sim_tap: Llmtap,
                                                    llama_tap: Llmtap,
                                                    redis_server: RedisServer,
                                                    tmp_path: Path) -> None:
    """The reverse of the check above: every name in the README's catalogue (which dashboards
    and alert rules are checked against) is in a live registry. GPU series come from the
    sampler over the fake NVML, the span counter from a Tracing instance, the names of the
    GenAI conventions' latest version from a sidecar opted in to them, the router's from
    `llmtap route` over the simulator's sidecar (with the simulator as its cloud); the
    vLLM-only KV cache gauge from the vLLM mapping test's upstream is named below."""
    import re
    import urllib.request

    from prometheus_client import CollectorRegistry, generate_latest

    from exporter.gpu import GpuCollector, GpuSampler
    from exporter.telemetry.tracing import Tracing
    from tests.fake_pynvml import FakeNvml
    from tests.test_gpu import two_gpus

    for tap, path, body in ((sim_tap, "/api/chat", b'{"model":"sim-small","messages":[]}'),
                            (llama_tap, "/completion", b'{"prompt":"Hi","n_predict":2}')):
        with urllib.request.urlopen(urllib.request.Request(tap.url + path, data=body),
                                    timeout=60) as resp:  # so request series exist
            resp.read()
    exported: set[str] = set()
    texts = [sim_tap.metrics().text, llama_tap.metrics().text,
             _router_metrics(sim, sim_tap, redis_server, tmp_path), _latest_metrics(sim)]
    registry = CollectorRegistry()
    sampler = GpuSampler(nvml=FakeNvml(two_gpus()))
    sampler.latest = sampler.sample_once()
    sampler.shutdown()
    registry.register(GpuCollector(sampler))
    tracing = Tracing(registry, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    try:
        texts.append(generate_latest(registry).decode())
    finally:
        tracing.shutdown()
    labels: set[str] = set()
    for text in texts:
        exported |= {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
        exported |= {line.split("{")[0].split()[0] for line in text.splitlines()
                     if line and not line.startswith("#")}
        labels |= set(re.findall(r"[{,]([a-z_]+)=", text))
    catalogued = catalogued_names()
    # Exported only with a configuration these sidecars do not have; tests/test_upstream.py
    # shows each: the KV cache gauge in front of vLLM, the mismatch gauge with --pin; the
    # sleeping gauge in front of llama.cpp's router (tests/test_llamacpp_router.py); the
    # per-key counters with API keys (tests/test_hardening.py).
    conditional = {"llmtap_upstream_kv_cache_usage_ratio", "llmtap_model_digest_mismatch",
                   "llmtap_model_sleeping", "llmtap_key_requests_total",
                   "llmtap_key_tokens_total"}
    missing = {name for name in catalogued - conditional - labels
               if name not in exported and name.removesuffix("_total") not in exported}
    assert not missing, f"catalogued but never exported: {sorted(missing)}"
    # Labels too: every label a dashboard or rule selects, groups or shows by must be one
    # llmtap exports (or Prometheus adds: job, instance, le).
    import json

    import yaml

    known_labels = labels | {"job", "instance", "le"}
    expressions: list[str] = []
    for board in (ROOT_DIR / "dashboards").glob("*.json"):
        doc = json.loads(board.read_text())
        for panel in doc["panels"]:
            for target in panel.get("targets", []):
                expressions.append(target["expr"])
                expressions += re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", ""))
        expressions += [v["definition"] for v in doc["templating"]["list"]
                        if v["type"] == "query"]
    for rules in (ROOT_DIR / "alerts").glob("*.yml"):
        for group in yaml.safe_load(rules.read_text())["groups"]:
            for rule in group["rules"]:
                expressions.append(rule["expr"])
                for text in rule.get("annotations", {}).values():
                    expressions += re.findall(r"\$labels\.(\w+)", text)
    used: set[str] = set()
    for expr in expressions:
        if re.fullmatch(r"\w+", expr):
            used.add(expr)  # a legend or annotation label
            continue
        used |= set(re.findall(r"[{,]\s*([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", expr))
        for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            used |= {name.strip() for name in grouping.split(",") if name.strip()}
        for label_values in re.findall(r"label_values\([^)]*\),\s*(\w+)\)", expr):
            used.add(label_values)
    unknown = used - known_labels
    assert not unknown, f"dashboards or rules use labels llmtap does not export: {unknown}"


def _latest_metrics(sim: Simulator) -> str:
    """A sidecar on the GenAI conventions' latest names (OTEL_SEMCONV_STABILITY_OPT_IN) after
    a chat that thinks and an embedding."""
    import urllib.request

    tap = Llmtap(sim.url, env={"OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental"})
    try:
        for path, body in (("/api/chat", b'{"model":"sim-small","think":true,'
                           b'"messages":[{"role":"user","content":"hi"}]}'),
                           ("/api/embed", b'{"model":"sim-small","input":"x"}')):
            with urllib.request.urlopen(urllib.request.Request(tap.url + path, data=body),
                                        timeout=30) as resp:
                resp.read()
        return tap.metrics().text
    finally:
        tap.stop()


def _router_metrics(sim: Simulator, sim_tap: Llmtap, redis_server: RedisServer,
                   tmp_path: Path) -> str:
    """A router's scrape after one light (local) and one heavy (cloud) request, with client
    keys and their limits, its state shared in Redis."""
    import urllib.request

    from exporter.auth import key_file_line, new_key

    key = new_key()
    (tmp_path / "keys").write_text(key_file_line("docs", key) + "\n")
    config = (
        f"api_key_file: {tmp_path / 'keys'}\nkey_limits: {{'*': {{budget: 10}}}}\n"
        f"shared_state: {{redis_url: '{redis_server.url}', prefix: docs}}\n"
        f"backends: [{{name: local, proxy_url: '{sim_tap.url}', admin_url: '{sim_tap.admin}'}}]\n"
        f"cloud: [{{name: cloud, base_url: '{sim.url}/v1', api_key_env: DOCS_CLOUD_KEY,\n"
        "          models: {auto-heavy: sim-large}, budget: 100}]\n"
        "routes: [{model: auto, hybrid: {light: sim-small, heavy: auto-heavy}}]\n")
    router = LlmtapRouter(config, env={"DOCS_CLOUD_KEY": "sk-docs"})
    try:
        for text in ("hi", "Prove step by step that 2 is prime"):
            body = b'{"model":"auto","messages":[{"role":"user","content":"%s"}]}' % \
                text.encode()
            with urllib.request.urlopen(urllib.request.Request(
                    router.url + "/v1/chat/completions", data=body,
                    headers={"Authorization": f"Bearer {key}"}), timeout=30) as resp:
                resp.read()
        return router.metrics().text
    finally:
        router.stop()
