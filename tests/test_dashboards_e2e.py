"""Every dashboard query, evaluated by a real Prometheus scraping real llmtaps.

Prometheus (Debian's package, installed by scripts/test) scrapes the llmtap in front of the
real llama-server, the one in front of the simulator (Ollama-only series) and a router over
the latter (with the simulator as its cloud); after some traffic, each query of each panel,
variables substituted, must parse and return data.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import Llmtap, LlmtapRouter, Process, Simulator, free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
SCRAPE = "1s"
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval would be at a 1 s scrape, with margin
# Queries that cannot have data in this test, and why. Anything else must return data.
NO_DATA_HERE = {
    ("llmtap-overview.json", "llmtap's own health", "spans dropped/s"):
        "tracing is not configured in this test, so llmtap_spans_dropped_total is absent",
    ("llmtap-overview.json", "GPU memory used", "{{instance}} GPU {{gpu}}"):
        "this machine has no NVIDIA GPU",
}
GPU_ONLY = "llmtap-gpu.json"  # every panel but 'Sampler up' needs a GPU


def prometheus() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise RuntimeError("prometheus is not installed: run `bash scripts/test`, which "
                           "installs Debian's prometheus package")
    return path


def substitute(expr: str) -> str:
    for var in ("$job", "$instance", "$model"):
        expr = expr.replace(var, ".*")
    return expr.replace("$__rate_interval", RATE_INTERVAL)


def queries() -> list[tuple[str, str, str, str]]:
    out = []
    for path in sorted((ROOT / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((path.name, panel["title"], target["legendFormat"],
                            substitute(target["expr"])))
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                # Grafana's label_values(SERIES, LABEL) is the values of LABEL on SERIES.
                match = re.fullmatch(r"label_values\((.*), (\w+)\)", var["definition"])
                assert match, var["definition"]
                out.append((path.name, f"variable {var['name']}", "",
                            substitute(f"count by ({match[2]}) ({match[1]})")))
    return out


def router_over(sim: Simulator, sim_tap: Llmtap) -> LlmtapRouter:
    return LlmtapRouter(
        "allow_unauthenticated_cloud: true\n"
        f"backends: [{{name: local, proxy_url: '{sim_tap.url}', admin_url: '{sim_tap.admin}'}}]\n"
        f"cloud: [{{name: cloud, base_url: '{sim.url}/v1', api_key_env: DASH_CLOUD_KEY,\n"
        "          models: {auto-heavy: sim-large}, price_per_input_token: 0.000001,\n"
        "          price_per_output_token: 0.000002, budget: 100}]\n"
        "routes: [{model: auto, hybrid: {light: sim-small, heavy: auto-heavy}}]\n",
        env={"DASH_CLOUD_KEY": "sk-dash"})


async def traffic(session: aiohttp.ClientSession, sim_tap: Llmtap, llama_tap: Llmtap,
                  router: LlmtapRouter) -> None:
    chat = [{"role": "user", "content": "hi"}]
    for text in ("hi", "Prove step by step that 7 is prime"):  # light (local), heavy (cloud)
        async with session.post(router.url + "/api/chat", json={
                "model": "auto", "messages": [{"role": "user", "content": text}]}) as resp:
            await resp.read()
    for _ in range(3):
        for model in ("sim-small", "sim-large"):
            async with session.post(sim_tap.url + "/api/chat",
                                    json={"model": model, "messages": chat}) as resp:
                await resp.read()
        async with session.post(sim_tap.url + "/api/chat",
                                json={"model": "missing", "messages": chat}) as resp:
            await resp.read()  # an error, for the errors panel
        async with session.post(llama_tap.url + "/v1/chat/completions",
                                json={"model": "x", "messages": chat, "max_tokens": 4,
                                      "stream": True}) as resp:
            await resp.read()
        async with session.post(llama_tap.url + "/completion",
                                json={"prompt": "Hi", "n_predict": 4, "stream": True}) as resp:
            await resp.read()


async def test_every_dashboard_query_returns_data(sim: Simulator, sim_tap: Llmtap,
                                                  llama_tap: Llmtap) -> None:
    work = Path(tempfile.mkdtemp(prefix="llmtap-prom-"))
    port = free_port()
    router = router_over(sim, sim_tap)
    targets = [sim_tap.admin.removeprefix("http://"), llama_tap.admin.removeprefix("http://"),
               router.admin.removeprefix("http://")]
    (work / "prometheus.yml").write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE}\n"
        f"  evaluation_interval: {SCRAPE}\n"
        "scrape_configs:\n"
        "  - job_name: llmtap\n"
        f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n")
    server = Process([prometheus(), f"--config.file={work / 'prometheus.yml'}",
                      f"--storage.tsdb.path={work / 'data'}",
                      f"--web.listen-address=127.0.0.1:{port}",
                      "--enable-feature=exemplar-storage"])
    base = f"http://127.0.0.1:{port}"
    try:
        await asyncio.get_running_loop().run_in_executor(
            None, wait_http, base + "/-/ready", 60, server.proc, server.log)
        async with aiohttp.ClientSession() as session:
            await traffic(session, sim_tap, llama_tap, router)
            await asyncio.sleep(5)  # several scrapes after the traffic
            await traffic(session, sim_tap, llama_tap, router)
            await asyncio.sleep(4)
            missing: list[str] = []
            checked = 0
            for board, title, legend, expr in queries():
                async with session.get(base + "/api/v1/query", params={"query": expr}) as r:
                    answer: dict[str, Any] = await r.json()
                assert answer["status"] == "success", f"{board} / {title}: {answer}"
                has_data = bool(answer["data"]["result"])
                expected_empty = (board == GPU_ONLY and title != "Sampler up") or \
                    (board, title, legend) in NO_DATA_HERE
                checked += 1
                if not has_data and not expected_empty:
                    missing.append(f"{board} / {title} / {legend}: {expr}")
            assert checked > 40
            assert not missing, "queries without data:\n" + "\n".join(missing)
    finally:
        server.stop()
        router.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("key", sorted(NO_DATA_HERE))
def test_every_no_data_exception_names_a_real_query(key: tuple[str, str, str]) -> None:
    assert key in {(b, t, legend) for b, t, legend, _ in queries()}, key

