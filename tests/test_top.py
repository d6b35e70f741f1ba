"""`llmtap top` for real: run under tmux in an 80x24 terminal against a live sidecar (the
simulator behind a real llmtap) with traffic, read the screen with `capture-pane`.

tmux is Debian's package, installed by scripts/test: missing, the test fails (never skips).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from exporter.top.scrape import Counts
from exporter.top.window import Window, quantile
from tests.helpers import Llmtap, Simulator, free_port


def test_quantile_reads_buckets_as_prometheus_does() -> None:
    buckets = [(0.1, 2.0), (0.5, 6.0), (1.0, 8.0), (float("inf"), 8.0)]
    assert quantile(0.25, buckets) == pytest.approx(0.1)  # rank 2: the first bucket's top
    assert quantile(0.5, buckets) == pytest.approx(0.3)  # rank 4: halfway through (0.1, 0.5]
    assert quantile(0.95, [(1.0, 1.0), (float("inf"), 10.0)]) == 1.0  # past the last bound
    assert quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None


def test_the_window_is_the_last_minute_and_survives_a_restart() -> None:
    window = Window(seconds=60)
    old = Counts({0.1: 100.0, float("inf"): 100.0}, output_tokens=5000)
    window.add(0.0, {"m": old})
    window.add(30.0, {"m": Counts({0.1: 100.0, 1.0: 104.0, float("inf"): 104.0}, 5400)})
    recent = window.recent("m")
    assert recent.requests == 4 and recent.tokens_per_second == pytest.approx(400 / 30)
    assert recent.ttft_p50 is not None and 0.1 < recent.ttft_p50 <= 1.0  # only the new four
    window.add(40.0, {"m": Counts({0.1: 1.0, float("inf"): 1.0}, 10)})  # restarted: reset
    assert window.recent("m").requests == 0


@pytest.fixture
def tmux() -> Iterator[str]:
    binary = shutil.which("tmux")
    if binary is None:
        raise RuntimeError("tmux is missing: scripts/test installs it (Debian package tmux)")
    socket = f"llmtap-top-{free_port()}"
    yield socket
    subprocess.run([binary, "-L", socket, "kill-server"], capture_output=True)


def _tmux(socket: str, *args: str) -> None:
    subprocess.run(["tmux", "-L", socket, *args], check=True)


def _screen(socket: str) -> str:
    return subprocess.run(["tmux", "-L", socket, "capture-pane", "-p", "-t", "top"],
                          capture_output=True, text=True, check=True).stdout


async def _until(socket: str, pattern: str, within: float = 15.0) -> str:
    deadline = time.monotonic() + within
    while True:
        screen = _screen(socket)
        if re.search(pattern, screen):
            return screen
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not on the screen within {within}s:\n{screen}")
        await asyncio.sleep(0.2)


@pytest.fixture
async def slow_url() -> AsyncIterator[str]:
    """An admin port that takes 30 s to answer."""
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/llmtap/v1/state", slow)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def _stream(url: str, tokens: int) -> None:
    body = {"model": "sim-small", "stream": True, "options": {"num_predict": tokens},
            "messages": [{"role": "user", "content": "tell me a story"}]}
    async with aiohttp.ClientSession() as session, \
            session.post(url + "/api/chat", data=orjson.dumps(body)) as resp:
        await resp.read()


async def test_top_shows_a_live_sidecar_under_tmux(tmux: str, slow_url: str) -> None:
    sim = Simulator("--models", "sim-small", "--ttft", "0.05", "--tokens-per-second", "50",
                    "--output-tokens", "400", "--parallel", "4", "--seed", "3")
    tap = Llmtap(sim.url)
    closed = f"http://127.0.0.1:{free_port()}"
    try:
        for _ in range(3):  # answered before top starts: inside its first minute all the same
            await _stream(tap.url, 10)
        command = (f"{sys.executable} -m exporter top {tap.admin} {closed} {sim.url} "
                   f"{slow_url}; echo TOP-EXITED $?; sleep 60")
        _tmux(tmux, "new-session", "-d", "-s", "top", "-x", "80", "-y", "24", command)
        long: list[asyncio.Task[Any]] = [
            asyncio.create_task(_stream(tap.url, 400)) for _ in range(3)]
        screen = await _until(tmux, r"sim-small:latest\s+3\s+0\s+\d+ms")
        row = next(line for line in screen.splitlines() if "sim-small:latest" in line)
        cells = row.split()
        # in flight 3 (the long streams), none waiting, TTFT p50 from the simulator's 50 ms
        # (the 0.04-0.1 s bucket), tokens flowing, loaded.
        assert cells[2:4] == ["3", "0"], row
        p50 = int(cells[4].removesuffix("ms"))
        assert 40 <= p50 <= 100, row
        assert float(cells[6]) > 0 and cells[7] == "yes", row
        assert all(len(line) <= 80 for line in screen.splitlines())
        assert f"{closed.removeprefix('http://')}: no answer" in screen
        assert f"{sim.url.removeprefix('http://')}: not llmtap" in screen
        await _until(tmux, re.escape(slow_url.removeprefix("http://")) + r": slow")
        _tmux(tmux, "send-keys", "-t", "top", "s")
        await _until(tmux, r"sorted by waiting")
        _tmux(tmux, "send-keys", "-t", "top", "q")
        screen = await _until(tmux, r"TOP-EXITED \d+")
        assert "TOP-EXITED 0" in screen and "Traceback" not in screen
        for task in long:
            task.cancel()
        await asyncio.gather(*long, return_exceptions=True)
    finally:
        tap.stop()
        sim.stop()


async def test_top_shows_a_router_its_backends_and_their_models(tmux: str) -> None:
    from tests.helpers import LlmtapRouter

    sim = Simulator("--models", "sim-small", "--ttft", "0.02", "--output-tokens", "4")
    cloud = Simulator("--models", "gpt-fake", "--ttft", "0.01", "--output-tokens", "4")
    tap = Llmtap(sim.url, "--health-interval", "0.2")
    router = LlmtapRouter(
        "allow_unauthenticated_cloud: true\npoll_interval: 0.2\nbackends:\n"
        f"  - {{name: local-a, proxy_url: '{tap.url}', admin_url: '{tap.admin}'}}\n"
        f"cloud:\n  - {{name: fakecloud, base_url: '{cloud.url}/v1', api_key_env: K,\n"
        "     models: {frontier: gpt-fake}, price_per_input_token: 0.001, budget: 5}\n",
        env={"K": "sk"})
    try:
        await _stream(router.url, 4)  # through the router, to the sidecar
        command = f"{sys.executable} -m exporter top {router.admin}; sleep 60"
        _tmux(tmux, "new-session", "-d", "-s", "top", "-x", "80", "-y", "24", command)
        screen = await _until(tmux, r"fakecloud \(cloud\)")
        assert re.search(r"local-a\s+closed\s+0\s+server up", screen), screen
        assert re.search(r"fakecloud \(cloud\)\s+closed\s+0\s+spent 0\.00 of 5\.00", screen)
        # The router's sidecar, read from the admin URL the router gives, under its name.
        await _until(tmux, r"local-a\s+sim-small:latest")
    finally:
        router.stop()
        tap.stop()
        cloud.stop()
        sim.stop()
