"""Pollers that fail alone (the node_exporter shape): a source that raises is logged once and
retried while the others go on; readiness follows the health source once every source has
run; the runner source degrades cleanly when it cannot see Ollama's children; polling
llama-server never keeps it awake."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from exporter.config import resolve
from exporter.server import Sidecar
from exporter.upstream import llamacpp, procfs, runners
from exporter.upstream import ollama as ollama_poller
from exporter.upstream.fetch import Fetcher
from exporter.upstream.view import ServerQueue, UpstreamView
from tests.helpers import LlamaServer, Llmtap, Metrics, Simulator, running
from tests.test_upstream import until


async def broken_queue(*args: Any) -> Any:
    raise KeyError("n_ctx")  # what a server answering an unexpected shape could provoke


async def readyz(sidecar: Sidecar) -> int:
    assert sidecar.admin_address is not None
    url = f"http://127.0.0.1:{sidecar.admin_address.port}/readyz"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status


def scrape(sidecar: Sidecar) -> Metrics:
    return Metrics(generate_latest(sidecar.registry).decode())


async def test_a_raising_source_fails_alone_and_readiness_follows_health(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llamacpp, "queue", broken_queue)
    sim = Simulator("--ttft", "0.01")
    settings = resolve({"upstream": sim.url, "upstream_kind": "llama.cpp",
                        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
                        "health_interval": "0.05", "inventory_interval": "0.1"}, env={})
    sidecar = Sidecar(settings)
    try:
        with capture_logs() as logs:
            await sidecar.start()
            probed = sidecar.monitor.last_probe
            await asyncio.sleep(0.6)  # about a dozen ticks of every source
        m = scrape(sidecar)
        assert m.value("llmtap_upstream_poll_success", source="queue") == 0
        assert m.value("llmtap_upstream_poll_success", source="health") == 1
        assert m.value("llmtap_upstream_poll_success", source="inventory") == 1
        assert m.value("llmtap_upstream_poll_duration_seconds", source="health") > 0
        failing = [e for e in logs if e["event"] == "upstream poll failing"]
        assert len(failing) == 1 and failing[0]["source"] == "queue"
        assert failing[0]["problem"] == "KeyError: 'n_ctx'"
        assert sidecar.monitor.last_probe is not None and probed is not None
        assert sidecar.monitor.last_probe > probed  # health went on polling
        assert await readyz(sidecar) == 200

        sim.stop()  # the upstream goes away: health says so, readiness follows
        assert await until(lambda: not sidecar.monitor.up, within=5)
        assert await readyz(sidecar) == 503
        m = scrape(sidecar)
        assert m.value("llmtap_upstream_up") == 0
        assert m.value("llmtap_upstream_poll_success", source="health") == 0
    finally:
        await sidecar.stop()
        sim.stop()


async def test_a_health_source_that_stops_leaves_readyz_not_ready() -> None:
    """A frozen `up` must not keep /readyz ready: the probe must be fresh."""
    with running(Simulator("--ttft", "0.01")) as sim:
        settings = resolve({"upstream": sim.url, "listen": "127.0.0.1:0",
                            "admin_listen": "127.0.0.1:0", "health_interval": "0.05"}, env={})
        sidecar = Sidecar(settings)
        await sidecar.start()
        try:
            assert await readyz(sidecar) == 200
            health = sidecar.pollers.sources["health"]

            async def hang() -> bool:
                await asyncio.sleep(3600)
                return True

            health.poll = hang
            assert await until(lambda: not sidecar.monitor.fresh(), within=10)
            assert await readyz(sidecar) == 503
        finally:
            await sidecar.stop()


@pytest.mark.parametrize("held", ["inventory", "loaded"])
async def test_readiness_waits_for_every_poller_and_enforced_pins_for_the_model_list(
        monkeypatch: pytest.MonkeyPatch, held: str) -> None:
    """Until every poller has run once since the upstream came up, /readyz is 503: before
    the model list every label is `other` and no pin is checked, before /api/ps no cold load
    can be told. With --enforce-pins, requests before the list get a 503 to retry (never an
    unchecked build); once it is read they are served. One real Ollama-dialect poll of the
    simulator (/api/tags or /api/ps) is held back by wrapping it."""
    listed = asyncio.Event()
    real_poll = getattr(ollama_poller, held)

    async def held_poll(fetch: Fetcher) -> Any:
        await listed.wait()
        return await real_poll(fetch)

    monkeypatch.setattr(ollama_poller, held, held_poll)
    with running(Simulator("--ttft", "0.01")) as sim:
        async with aiohttp.ClientSession() as session:
            async with session.get(sim.url + "/api/tags") as resp:
                tags = {m["name"]: m["digest"] for m in (await resp.json())["models"]}
            settings = resolve({"upstream": sim.url, "listen": "127.0.0.1:0",
                                "admin_listen": "127.0.0.1:0", "health_interval": "0.05",
                                "pin": f"sim-small=sha256:{tags['sim-small:latest'][:16]}",
                                "enforce_pins": "true"}, env={})
            sidecar = Sidecar(settings)
            starting = asyncio.create_task(sidecar.start())
            try:
                assert await until(lambda: sidecar.monitor.up and sidecar.proxy_address
                                   and sidecar.admin_address)
                assert sidecar.admin_address is not None and sidecar.proxy_address is not None
                admin = f"http://127.0.0.1:{sidecar.admin_address.port}"
                proxy = f"http://127.0.0.1:{sidecar.proxy_address.port}"
                async with session.get(admin + "/readyz") as resp:
                    assert resp.status == 503
                    assert "not yet read the upstream's state" in (await resp.json())["reason"]
                body = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}],
                        "stream": False}
                async with session.post(proxy + "/api/chat", json=body) as resp:
                    if held == "inventory":
                        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
                        assert "not read the upstream's model list" in \
                            (await resp.json())["error"]
                    else:
                        assert resp.status == 200  # the pin was checked: it matches
                assert sim.stats()["completed"] == (0 if held == "inventory" else 1)
                listed.set()
                await starting
                assert await readyz(sidecar) == 200
                async with session.post(proxy + "/api/chat", json=body) as resp:
                    assert resp.status == 200  # the pin matches: served
            finally:
                listed.set()
                await starting
                await sidecar.stop()


async def test_an_upstream_password_is_never_shown() -> None:
    """Credentials in --upstream stay out of the logs, /readyz and the state."""
    with running(Simulator("--ttft", "0.01")) as sim:
        secret_url = sim.url.replace("://", "://user:s3cret-pw@")
        settings = resolve({"upstream": secret_url, "listen": "127.0.0.1:0",
                            "admin_listen": "127.0.0.1:0", "health_interval": "0.05"}, env={})
        sidecar = Sidecar(settings)
        with capture_logs() as logs:
            await sidecar.start()
        try:
            assert sidecar.admin_address is not None
            admin = f"http://127.0.0.1:{sidecar.admin_address.port}"
            async with aiohttp.ClientSession() as session:
                shown = [await (await session.get(admin + path)).text()
                         for path in ("/readyz", "/llmtap/v1/state")]
            assert sim.url in shown[0] and sim.url in shown[1]
            assert any(line.get("upstream") == sim.url for line in logs)
            assert "s3cret-pw" not in repr(logs) + "".join(shown)
        finally:
            await sidecar.stop()


def test_runner_command_lines_as_ollama_0_34_starts_them() -> None:
    argv = ["/usr/lib/ollama/llama-server", "--model", "/m/blobs/sha256-b179", "--port",
            "40089", "--host", "127.0.0.1", "--no-webui", "--offline", "-c", "4096", "-np", "1"]
    assert runners.runner_from(7, argv) == runners.Runner(7, 40089, "/m/blobs/sha256-b179")
    assert runners.runner_from(7, ["/usr/bin/ollama", "runner", "--model", "x", "--port",
                                   "1"]) is None  # 0.2x runners have no /slots
    assert runners.runner_from(7, ["llama-server", "--model", "x"]) is None


def test_proc_reading_degrades_on_a_missing_or_foreign_proc(tmp_path: Path) -> None:
    assert procfs.listening_inodes(11434, tmp_path) == set()
    assert procfs.owner_of({"123"}, tmp_path) is None
    assert procfs.children_of(1, tmp_path) == []
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text("42 (llama server) (x) S 7 42 42 0")
    assert procfs.parent_of(42, tmp_path) == 7  # comm with spaces and parentheses
    assert procfs.command_line(42, tmp_path) is None


async def test_runners_unseen_are_said_once_and_their_gauges_absent() -> None:
    """Ollama on another host, or its process out of sight: the runner source says why once
    (log and state), shows nothing, and the other sources are not touched."""
    view = UpstreamView()
    view.model_queues = {"stale": ServerQueue(slots_total=1)}
    fetch = Fetcher("http://192.0.2.1:11434")
    source = runners.RunnerSource("http://192.0.2.1:11434", fetch, view)
    with capture_logs() as logs:
        assert await source.poll("ollama", True) is None
        assert await source.poll("ollama", True) is None
    assert source.blind == "the upstream is not on this host (loopback)"
    assert view.model_queues is None
    assert [e["why"] for e in logs] == [source.blind]
    assert await source.poll("llama.cpp", True) is None  # not Ollama: nothing to look for
    found, why, _ = runners.find_runners(_unused_port())
    assert found == [] and why is not None and "no socket listens" in why
    await fetch.close()


def _unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def sleepy_server() -> AsyncIterator[LlamaServer]:
    server = LlamaServer("--sleep-idle-seconds", "2")
    try:
        yield server
    finally:
        server.stop()


async def test_polling_never_wakes_a_sleeping_llama_server(sleepy_server: LlamaServer) -> None:
    """--sleep-idle-seconds: llama-server sleeps when idle. Asking its /slots is work that
    wakes it and keeps it awake (measured), so llmtap asks only while requests are in flight:
    with polls every 0.1 s it still falls asleep, and stays asleep until a request comes."""
    with running(Llmtap(sleepy_server.url, "--health-interval", "0.1",
                        "--inventory-interval", "0.2")) as tap:
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "Hi", "n_predict": 2}
            async with session.post(tap.url + "/completion", json=body) as resp:
                assert resp.status == 200
            slept = await until(
                lambda: _count(sleepy_server, "server is entering sleeping state"), 15)
            assert slept, "llama-server never fell asleep under llmtap's polls"
            woke_before = _count(sleepy_server, "server is exiting sleeping state")
            await asyncio.sleep(1.5)  # fifteen more rounds of polls
            assert _count(sleepy_server, "server is exiting sleeping state") == woke_before
            m = tap.metrics()
            assert m.value("llmtap_upstream_slots_busy") == 0
            assert m.value("llmtap_upstream_poll_success", source="queue") == 1
            started = time.monotonic()
            async with session.post(tap.url + "/completion", json=body) as resp:
                assert resp.status == 200  # a request wakes it, as it should
            assert _count(sleepy_server, "server is exiting sleeping state") == woke_before + 1
            print(f"answer from sleep in {time.monotonic() - started:.2f} s")


def _count(server: LlamaServer, text: str) -> int:
    return server.log.read_text(errors="replace").count(text)
