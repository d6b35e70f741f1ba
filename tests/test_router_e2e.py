"""The router end to end: real sidecars in front of simulators of different speeds and a real
llama-server, a fake cloud (the simulator speaking OpenAI on loopback), and `llmtap route` as
a subprocess. Decisions are read from the router's metrics and access log and from what each
simulator saw (/sim/stats), never from wall-clock assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import orjson
import pytest

from tests.helpers import (
    LlamaServer,
    Llmtap,
    LlmtapRouter,
    Metrics,
    Process,
    Simulator,
    wait_http,
)

SIDECAR_ARGS = ("--health-interval", "0.2", "--inventory-interval", "1")
DECISIONS = "llmtap_router_decisions_total"
SHORT = {"num_predict": 8}


class Router(LlmtapRouter):
    async def metrics(self) -> Metrics:  # type: ignore[override]
        async with aiohttp.ClientSession() as session, \
                session.get(self.admin + "/metrics") as resp:
            return Metrics(await resp.text())

    async def state(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, \
                session.get(self.admin + "/llmtap/v1/router") as resp:
            state: dict[str, Any] = orjson.loads(await resp.read())
            return state


def sidecar_yaml(name: str, tap: Llmtap) -> str:
    return f'  - {{name: {name}, proxy_url: "{tap.url}", admin_url: "{tap.admin}"}}\n'


async def chat(base: str, model: str, text: str = "Why is the sky blue?",
               path: str = "/api/chat", headers: dict[str, str] | None = None,
               **extra: Any) -> tuple[int, bytes]:
    if path == "/completion":
        body: dict[str, Any] = {"prompt": text, **extra}
    else:
        body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    async with aiohttp.ClientSession() as session, \
            session.post(base + path, data=orjson.dumps(body),
                         headers={"Content-Type": "application/json", **(headers or {})}
                         ) as resp:
        return resp.status, await resp.read()


async def until(check: Any, within: float = 10.0, every: float = 0.1) -> None:
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within}s: {check.__doc__ or check}")
        await asyncio.sleep(every)


def decisions(metrics: Metrics, **labels: str) -> float:
    return metrics.value(DECISIONS, **labels)


@contextlib.contextmanager
def processes(*procs: Process) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in reversed(procs):
            proc.stop()


async def occupy(tap: Llmtap, model: str, n: int, tokens: int) -> list[asyncio.Task[Any]]:
    """Load a backend directly (as other clients of that sidecar would), not via the router."""
    tasks = [asyncio.create_task(chat(tap.url, model, options={"num_predict": tokens}))
             for _ in range(n)]
    await asyncio.sleep(0.6)  # the sidecar counts them and the router polls it (every 0.2 s)
    return tasks


# --------------------------------------------------------------------------- local fleet


@pytest.fixture(scope="module")
def fleet(llama_server: LlamaServer) -> Iterator[dict[str, Any]]:
    """Two fast simulators, a slow one, one that is busy, a real llama-server; a sidecar in
    front of each; one router over all five."""
    # Long answers unless a request asks fewer: occupy() holds them for 0.5 s per request.
    fast = Simulator("--models", "m1,m3", "--ttft", "0.005", "--tokens-per-second", "400",
                     "--output-tokens", "400", "--seed", "1")
    fast2 = Simulator("--models", "m1", "--ttft", "0.005", "--tokens-per-second", "400",
                      "--output-tokens", "400", "--seed", "2")
    slow = Simulator("--models", "m1", "--ttft", "0.3", "--tokens-per-second", "50",
                     "--output-tokens", "8", "--seed", "3")
    busy = Simulator("--models", "m3", "--ttft", "3", "--max-queue", "0", "--seed", "4")
    sims = [fast, fast2, slow, busy]
    taps = [Llmtap(sim.url, *SIDECAR_ARGS) for sim in sims]
    llama_tap = Llmtap(llama_server.url, *SIDECAR_ARGS)
    names = ["fast", "fast2", "slow", "busy"]
    config = ("poll_interval: 0.2\nbreaker: {failures: 2, cooldown: 0.5, max_cooldown: 1}\n"
              "backends:\n" + "".join(sidecar_yaml(n, t) for n, t in zip(names, taps,
                                                                          strict=True))
              + sidecar_yaml("llama", llama_tap)
              + "routes:\n  - {model: '*', policy: expected_wait}\n"
                "  - {model: m3, policy: round_robin}\n")
    router = Router(config)
    with processes(*sims, *taps, llama_tap, router):
        yield {"router": router, "llama_tap": llama_tap,
               **{n: s for n, s in zip(names, sims, strict=True)},
               **{n + "_tap": t for n, t in zip(names, taps, strict=True)}}


@pytest.mark.llamacpp
async def test_router_prefers_faster_and_less_loaded_backends(fleet: dict[str, Any]) -> None:
    router: Router = fleet["router"]
    # Measurements first: each sidecar serves two requests directly, so its state has EWMAs.
    for name in ("fast", "fast2", "slow"):
        for _ in range(2):
            assert (await chat(fleet[name + "_tap"].url, "m1", options=SHORT))[0] == 200
    for _ in range(2):
        assert (await chat(fleet["llama_tap"].url, "", "Hi", "/completion",
                           n_predict=4))[0] == 200

    async def measured() -> bool:
        """the router sees TTFT measurements of every backend"""
        state = await router.state()
        return all(s["state_age_s"] is not None and s["upstream_up"]
                   for s in state["sidecars"])

    await until(measured)
    await asyncio.sleep(0.5)  # loaded flags and EWMAs polled
    before = await router.metrics()
    for _ in range(8):
        status, _ = await chat(router.url, "m1", path="/v1/chat/completions", max_tokens=16)
        assert status == 200
    after = await router.metrics()
    got = {name: decisions(after, backend=name, route="*") - decisions(before, backend=name,
                                                                        route="*")
           for name in ("fast", "fast2", "slow", "llama")}
    print("sequential, idle fleet:", got)
    assert got["fast"] + got["fast2"] >= 7, got  # the 5 ms simulators, not the 300 ms one
    assert got["slow"] == 0, got

    # Load `fast` from outside the router: its queue shows in its sidecar's state.
    tasks = await occupy(fleet["fast_tap"], "m1", 4, 200)
    before = await router.metrics()
    for _ in range(4):
        status, _ = await chat(router.url, "m1", path="/v1/chat/completions", max_tokens=16)
        assert status == 200
    after = await router.metrics()
    loaded = {name: decisions(after, backend=name, route="*") - decisions(before, backend=name,
                                                                           route="*")
              for name in ("fast", "fast2", "slow", "llama")}
    print("fast busy with 4 long requests:", loaded)
    assert loaded["fast"] == 0 and loaded["fast2"] >= 3, loaded
    await asyncio.gather(*tasks)

    # llama.cpp's native API can only go to the llama-server; a real token stream comes back.
    status, body = await chat(router.url, "", "Say hello", "/completion", n_predict=6,
                              stream=True)
    assert status == 200 and b'"stop":true' in body
    after_llama = await router.metrics()
    assert decisions(after_llama, backend="llama") - decisions(after, backend="llama") == 1
    state = await router.state()
    llama = next(s for s in state["sidecars"] if s["name"] == "llama")
    assert llama["kind"] == "llama.cpp"
    estimates = after_llama.value("llmtap_router_estimated_ttft_seconds_count")
    assert estimates >= 12  # estimated vs actual TTFT recorded per routed request


@pytest.mark.llamacpp
async def test_a_busy_503_is_retried_on_the_next_backend(fleet: dict[str, Any]) -> None:
    router: Router = fleet["router"]
    busy: Simulator = fleet["busy"]
    # Hold busy's one slot (TTFT 3 s, no queue): anything else it gets is Ollama's 503.
    holder = asyncio.create_task(chat(fleet["busy_tap"].url, "m3"))
    await asyncio.sleep(0.5)
    rejected = busy.stats()["rejected"]
    before = await router.metrics()
    # Round robin: some of these try busy first.
    results = [await chat(router.url, "m3", options=SHORT) for _ in range(4)]
    assert [status for status, _ in results] == [200] * 4
    after = await router.metrics()
    retried = after.value("llmtap_router_retries_total", backend="busy", reason="busy") - \
        before.value("llmtap_router_retries_total", backend="busy", reason="busy")
    assert retried >= 1
    assert busy.stats()["rejected"] - rejected == retried  # each 503 came from the server
    assert decisions(after, route="m3", backend="fast") - \
        decisions(before, route="m3", backend="fast") == 4
    holder.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await holder


@pytest.mark.llamacpp
async def test_a_killed_backend_is_ejected_and_brought_back(fleet: dict[str, Any]) -> None:
    router: Router = fleet["router"]
    tap: Llmtap = fleet["fast2_tap"]
    ejections = (await router.metrics()).value("llmtap_router_backend_ejections_total",
                                               backend="fast2")
    tap.stop()
    # Requests keep succeeding meanwhile: one that picks the dead sidecar first is retried.
    for _ in range(6):
        assert (await chat(router.url, "m1", path="/v1/chat/completions", max_tokens=8))[0] \
            == 200

    async def ejected() -> bool:
        """fast2 ejected"""
        m = await router.metrics()
        return m.value("llmtap_router_backend_ejections_total", backend="fast2") > ejections \
            and m.value("llmtap_router_backend_up", backend="fast2") == 0

    await until(ejected)
    # The same sidecar comes back on the same ports.
    revived = Process([sys.executable, "-m", "exporter", "serve", "--upstream",
                       fleet["fast2"].url, "--listen", f"127.0.0.1:{tap.port}",
                       "--admin-listen", f"127.0.0.1:{tap.admin_port}", *SIDECAR_ARGS])
    try:
        revived.wait_until_up(lambda: wait_http(tap.admin + "/readyz", 30, revived.proc,
                                                revived.log))

        async def back() -> bool:
            """fast2 back in rotation"""
            m = await router.metrics()
            return m.value("llmtap_router_backend_up", backend="fast2") == 1

        await until(back)
        # A restarted sidecar has no latency averages yet: a few requests of its own give it
        # some, and the router's next polls (every 0.2 s) see them. Until then expected_wait
        # rightly prefers the backend it has measured (seen in CI: all 6 went to fast).
        for _ in range(3):
            assert (await chat(tap.url, "m1", path="/v1/chat/completions", max_tokens=8))[0] \
                == 200
        await asyncio.sleep(0.6)
        started = fleet["fast2"].stats()["started"]
        # Concurrent: the router's own in-flight counts spread them over both fast backends.
        await asyncio.gather(*(chat(router.url, "m1", path="/v1/chat/completions",
                                    max_tokens=8) for _ in range(6)))
        assert fleet["fast2"].stats()["started"] > started  # it serves again
    finally:
        revived.stop()


# --------------------------------------------------------------------------- hybrid


@pytest.fixture(scope="module")
def hybrid() -> Iterator[dict[str, Any]]:
    """One local simulator (one request at a time) and a fake cloud, behind a hybrid route."""
    # 8 tokens at 20/s: each local answer holds the one slot for ~0.4 s.
    local = Simulator("--models", "m1", "--ttft", "0.02", "--tokens-per-second", "20",
                      "--output-tokens", "8", "--parallel", "1", "--seed", "5")
    cloud = Simulator("--models", "gpt-fake", "--ttft", "0.01", "--tokens-per-second", "1000",
                      "--output-tokens", "5", "--parallel", "16", "--seed", "6")
    tap = Llmtap(local.url, *SIDECAR_ARGS)
    config = (
        "poll_interval: 0.2\nallow_unauthenticated_cloud: true\nbackends:\n"
        + sidecar_yaml("local", tap)
        + "cloud:\n"
          f"  - {{name: fakecloud, base_url: '{cloud.url}/v1', api_key_env: FAKE_CLOUD_KEY,\n"
          "     models: {auto-heavy: gpt-fake}, price_per_input_token: 0.001,\n"
          "     price_per_output_token: 0.01, budget: 0.3, rate_limit: 50,\n"
          "     max_output_tokens: 5}\n"
          "routes:\n"
          "  - {model: auto, hybrid: {light: m1, heavy: auto-heavy, slo_ttft: 0.5}}\n"
          "  - {model: private, hybrid: {light: m1, heavy: auto-heavy, slo_ttft: 0.5},\n"
          "     residency: local}\n")
    router = Router(config, env={"FAKE_CLOUD_KEY": "sk-fake"})
    with processes(local, cloud, tap, router):
        yield {"router": router, "local": local, "cloud": cloud, "tap": tap}


async def test_hybrid_heavy_to_cloud_spill_under_overload_and_local_only_stays(
        hybrid: dict[str, Any]) -> None:
    router: Router = hybrid["router"]
    cloud: Simulator = hybrid["cloud"]
    for _ in range(2):  # measurements for the local backend's estimate
        assert (await chat(hybrid["tap"].url, "m1"))[0] == 200
    await asyncio.sleep(0.5)

    status, _ = await chat(router.url, "auto", "What is the capital of France?")
    assert status == 200
    assert cloud.stats()["started"] == 0  # light, fleet idle: local

    # Heavy, through the real Ollama SDK: answered by the cloud, seen as Ollama NDJSON.
    client = ollama.AsyncClient(host=router.url)
    parts = [part async for part in await client.chat(
        model="auto", stream=True,
        messages=[{"role": "user", "content": "Prove step by step that 17 is prime"}])]
    final = parts[-1]
    assert final.done and final.done_reason == "stop" and final.eval_count == 5
    assert final.prompt_eval_count and final.total_duration
    assert "".join(p.message.content or "" for p in parts).strip()
    assert cloud.stats()["started"] == 1

    # Overload: the local server busy with 3 long answers, E[TTFT] far over the 0.5 s SLO.
    tasks = await occupy(hybrid["tap"], "m1", 3, 100)
    light = asyncio.create_task(chat(router.url, "auto", "Hi there"))
    local_only = asyncio.create_task(chat(router.url, "auto", "Hi there",
                                          headers={"x-llmtap-residency": "local"}))
    heavy_local = asyncio.create_task(chat(router.url, "auto", "Prove step by step",
                                           headers={"x-llmtap-residency": "local"}))
    private = asyncio.create_task(chat(router.url, "private", "Hi"))
    results = await asyncio.gather(light, local_only, heavy_local, private, *tasks)
    assert [status for status, _ in results] == [200] * 7
    assert cloud.stats()["started"] == 2  # the one spill; no local-only request left
    m = await router.metrics()
    assert m.value("llmtap_router_spills_total", route="auto", backend="fakecloud") == 1
    assert decisions(m, route="auto", backend="fakecloud", reason="spill") == 1
    assert decisions(m, route="auto", backend="local", reason="local_only") == 2
    assert decisions(m, route="private", backend="local", reason="local_only") == 1
    assert m.value("llmtap_router_classifications_total", route="auto", label="heavy",
                   reason="reasoning") == 2
    assert m.value("llmtap_router_cloud_tokens_total", backend="fakecloud", type="output") == 10
    spent = m.value("llmtap_router_cloud_cost_total", backend="fakecloud")
    assert spent > 0.1
    access = [line for line in router.json_lines("route")]
    spill = next(line for line in access if line["reason"] == "spill")
    assert spill["backend"] == "fakecloud" and spill["estimate_ms"] is not None
    assert spill["alternatives"] == ["local"]

    # Each cloud answer reserves at most ~0.15 (its body's bytes as input tokens, 5 output
    # tokens) and costs ~0.06: after one more heavy answer, the 0.3 budget has no room for
    # another reservation: then heavy ones queue locally.
    await chat(router.url, "auto", "Prove step by step that 19 is prime")
    status, _ = await chat(router.url, "auto", "Prove step by step that 23 is prime")
    assert status == 200
    m = await router.metrics()
    assert decisions(m, route="auto", backend="local", reason="budget_exhausted") == 1
    reserve = len(orjson.dumps({"model": "auto", "messages": [
        {"role": "user", "content": "Prove step by step that 23 is prime"}]})) * 0.001 + 0.05
    assert 0 < m.value("llmtap_router_cloud_budget_remaining", backend="fakecloud") < reserve
    assert cloud.stats()["started"] == 3


async def test_residency_fails_closed_end_to_end(hybrid: dict[str, Any]) -> None:
    """Heavy requests whose residency header holds `local` anywhere stay local, whatever the
    client added; a value that says neither local nor any is a 400 in the client's dialect,
    and reaches no backend."""
    router: Router = hybrid["router"]
    cloud: Simulator = hybrid["cloud"]
    started = cloud.stats()["started"]
    for value in ("local, any", "local;strict", "any, local"):
        status, _ = await chat(router.url, "auto", "Prove step by step that 29 is prime",
                               headers={"x-llmtap-residency": value})
        assert status == 200, value
    assert cloud.stats()["started"] == started
    status, body = await chat(router.url, "auto", "Hi", headers={"x-llmtap-residency": "eu"})
    assert status == 400 and "x-llmtap-residency" in orjson.loads(body)["error"]
    status, body = await chat(router.url, "auto", "Hi", path="/v1/chat/completions",
                              headers={"x-llmtap-residency": "anywhere"})
    assert status == 400 and orjson.loads(body)["error"]["type"] == "invalid_request"


async def test_hybrid_keep_local_gate_holds_secrets_and_cards_back() -> None:
    """Issue 17: a heavy request the hybrid route would send to the cloud goes there; the
    same request with a card number, or an API key in its system prompt, stays on the local
    fleet; on a route that is not hybrid (the cloud alias asked for by name) a request with
    an e-mail address is refused rather than sent. Read from the fake cloud's own counter,
    the router's metrics and its access log."""
    local = Simulator("--models", "m1", "--ttft", "0.01", "--tokens-per-second", "500",
                      "--output-tokens", "4", "--seed", "7")
    cloud = Simulator("--models", "gpt-fake", "--ttft", "0.01", "--tokens-per-second", "1000",
                      "--output-tokens", "4", "--parallel", "8", "--seed", "8")
    tap = Llmtap(local.url, *SIDECAR_ARGS)
    config = ("poll_interval: 0.2\nallow_unauthenticated_cloud: true\nbackends:\n"
              + sidecar_yaml("local", tap)
              + f"cloud:\n  - {{name: fakecloud, base_url: '{cloud.url}/v1', "
                "api_key_env: FAKE_CLOUD_KEY, models: {auto-heavy: gpt-fake}}\n"
                "routes:\n  - {model: auto, hybrid: {light: m1, heavy: auto-heavy}}\n")
    router = Router(config, env={"FAKE_CLOUD_KEY": "sk-fake"})
    heavy = "Prove step by step that 31 is prime."
    with processes(local, cloud, tap, router):
        assert (await chat(tap.url, "m1", options=SHORT))[0] == 200
        await asyncio.sleep(0.5)  # the router has polled the sidecar
        assert (await chat(router.url, "auto", heavy))[0] == 200
        assert cloud.stats()["started"] == 1  # heavy: the cloud, as the route says
        card = heavy + " Then charge my card 4111 1111 1111 1111 for the answer."
        status, _ = await chat(router.url, "auto", card)
        assert status == 200
        body = {"model": "auto", "stream": True, "messages": [
            {"role": "system", "content": "Use the key sk-proj-" + "q7" * 16},
            {"role": "user", "content": heavy}]}
        async with aiohttp.ClientSession() as session, session.post(
                router.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200 and b"data:" in await resp.read()
        status, _ = await chat(router.url, "auto-heavy", "Mail the summary to ana@example.org",
                               path="/v1/chat/completions")
        assert status == 503  # only the cloud serves that alias, and this may not leave
        assert cloud.stats()["started"] == 1
        m = await router.metrics()
        assert decisions(m, route="auto", backend="local", reason="local_only") == 2
        assert decisions(m, backend="fakecloud") == 1
        for reason in ("cards", "secrets"):
            assert m.value("llmtap_router_classifications_total", route="auto",
                           label="local", reason=reason) == 1
        assert m.value("llmtap_router_classifications_total", label="local",
                       reason="emails") == 1
        lines = [line for line in router.json_lines("route") if line.get("class") == "local"]
        assert {line["class_reason"] for line in lines} == {"cards", "secrets"}
        assert all(line["local_only"] and line["backend"] == "local" for line in lines)


async def test_models_lists_and_errors_in_the_clients_dialect(hybrid: dict[str, Any]) -> None:
    router: Router = hybrid["router"]
    async with aiohttp.ClientSession() as session:
        async with session.get(router.url + "/v1/models") as resp:
            ids = {m["id"] for m in (await resp.json())["data"]}
        async with session.get(router.url + "/api/tags") as resp:
            names = {m["name"] for m in (await resp.json())["models"]}
    assert {"auto", "auto-heavy", "m1:latest"} <= ids and ids == names
    status, body = await chat(router.url, "no-such-model")
    assert status == 404 and "no-such-model" in orjson.loads(body)["error"]
    status, body = await chat(router.url, "no-such-model", path="/v1/chat/completions")
    assert status == 404 and orjson.loads(body)["error"]["type"] == "model_not_found"


async def test_sidecars_found_in_dns(hybrid: dict[str, Any]) -> None:
    """A `dns` backend: every address the name resolves to is a sidecar (here: localhost)."""
    tap: Llmtap = hybrid["tap"]
    router = Router(f"poll_interval: 0.2\nbackends:\n  - {{dns: localhost, proxy_port: "
                    f"{tap.port}, admin_port: {tap.admin_port}, refresh_interval: 1}}\n")
    with processes(router):
        state = await router.state()
        assert "localhost/127.0.0.1" in {s["name"] for s in state["sidecars"]}
        assert (await chat(router.url, "m1", options=SHORT))[0] == 200
        m = await router.metrics()
        assert decisions(m, backend="localhost/127.0.0.1", reason="policy") == 1


async def test_readiness_is_the_router_not_the_fleet() -> None:
    """A router whose whole fleet is down stays ready (alive, valid config): were it not,
    Kubernetes would take every router pod out of its Service and clients would get
    connection errors instead of the router's clear 503 in their dialect."""
    from tests.helpers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    config = ("poll_interval: 0.2\nbackends:\n"
              f'  - {{name: gone, proxy_url: "{dead}", admin_url: "{dead}"}}\n')
    router = Router(config)  # starting waits for /readyz 200: that is the point
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(router.admin + "/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["backends_usable"] is False
        status, body = await chat(router.url, "m1")
        assert status in (404, 502, 503) and orjson.loads(body)["error"]
    finally:
        router.stop()


async def test_a_backend_failing_every_request_is_ejected_though_its_admin_answers() -> None:
    """The issue's fault test, scaled to the suite: 3 backends, one whose model server
    answers 500 at once to every request while its sidecar's admin port stays healthy,
    2 requests a second (20 s here; LLMTAP_FAULT_SECONDS=120 runs the issue's length). At
    most 5 client-visible errors
    (its 500s are retried elsewhere before any byte), the backend is ejected, and then gets
    at most one probe per cooldown. On main: 240 failures in 60 s, 0 ejections."""
    from aiohttp import web

    hits: list[float] = []

    async def fail(request: web.Request) -> web.Response:
        hits.append(time.monotonic())
        return web.json_response({"error": "boom"}, status=500)

    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": "m1:latest", "model": "m1:latest",
                                              "digest": "0" * 64, "details": {}}]})

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.34.4"})

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", tags)
    app.router.add_post("/api/chat", fail)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    bad_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    good = [Simulator("--models", "m1", "--ttft", "0.005", "--tokens-per-second", "400",
                      "--output-tokens", "4", "--seed", str(seed)) for seed in (11, 12)]
    taps = [Llmtap(sim.url, *SIDECAR_ARGS) for sim in good]
    bad_tap = Llmtap(bad_url, *SIDECAR_ARGS, ready=False)
    cooldown = 2.0
    router: Router | None = None
    try:
        await bad_tap.ready()
        config = (f"poll_interval: 0.2\nbreaker: {{failures: 3, cooldown: {cooldown}, "
                  f"max_cooldown: {cooldown}}}\nbackends:\n"
                  + sidecar_yaml("good1", taps[0]) + sidecar_yaml("good2", taps[1])
                  + sidecar_yaml("bad", bad_tap)
                  + "routes:\n  - {model: '*', policy: round_robin}\n")
        router = await asyncio.to_thread(Router, config)
        errors = sent = 0
        seconds = float(os.environ.get("LLMTAP_FAULT_SECONDS", "20"))
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            status, _ = await chat(router.url, "m1", options={"num_predict": 4})
            errors += status != 200
            sent += 1
            await asyncio.sleep(0.5)
        m = await router.metrics()
        print(f"\nfault test: {sent} requests in {seconds:.0f} s, {errors} client errors, "
              f"{len(hits)} requests reached the failing server, ejections "
              f"{m.value('llmtap_router_backend_ejections_total', backend='bad'):.0f}, "
              f"retries {m.value('llmtap_router_retries_total', backend='bad', reason='busy'):.0f}")
        assert errors <= 5, errors
        assert m.value("llmtap_router_backend_ejections_total", backend="bad") >= 1
        assert len(hits) >= 3
        # After the ejection (the third failure), at most one probe per cooldown.
        ejected_at = hits[2]
        later = [t for t in hits[3:] if t > ejected_at]
        windows = (time.monotonic() - ejected_at) / cooldown
        assert len(later) <= windows + 1, (len(later), windows)
    finally:
        if router is not None:
            router.stop()
        for proc in (*taps, bad_tap, *good):
            proc.stop()
        await runner.cleanup()


async def test_the_front_door_is_locked(tmp_path: Path) -> None:
    """With api_key_file, a request without a valid key gets a 401 in its dialect and
    reaches no backend: the cloud budget is not spent. With one, it is served."""
    from exporter.auth import key_file_line, new_key

    key = new_key()
    keys = tmp_path / "keys"
    keys.write_text(key_file_line("app", key) + "\n")
    local = Simulator("--models", "m1", "--ttft", "0.01", "--output-tokens", "3")
    cloud = Simulator("--models", "gpt-fake", "--ttft", "0.01", "--output-tokens", "3")
    tap = Llmtap(local.url, *SIDECAR_ARGS)
    config = (f"api_key_file: {keys}\npoll_interval: 0.2\nbackends:\n"
              + sidecar_yaml("local", tap)
              + f"cloud:\n  - {{name: fakecloud, base_url: '{cloud.url}/v1', "
                "api_key_env: FAKE_CLOUD_KEY,\n     models: {heavy-model: gpt-fake}, "
                "price_per_input_token: 0.001, budget: 1}\n")
    router = Router(config, env={"FAKE_CLOUD_KEY": "sk-fake"})
    with processes(local, cloud, tap, router):
        for model, path in (("heavy-model", "/v1/chat/completions"), ("m1", "/api/chat")):
            status, body = await chat(router.url, model, path=path)
            assert status == 401, (model, body)
            status, _ = await chat(router.url, model, path=path,
                                   headers={"Authorization": "Bearer wrong"})
            assert status == 401
        assert cloud.stats()["started"] == 0 and local.stats()["started"] == 0
        m = await router.metrics()
        assert m.value("llmtap_router_cloud_cost_total", backend="fakecloud") == 0
        assert m.value("llmtap_auth_rejected_total") == 4
        status, _ = await chat(router.url, "heavy-model", path="/v1/chat/completions",
                               headers={"Authorization": f"Bearer {key}"})
        assert status == 200 and cloud.stats()["started"] == 1
        m = await router.metrics()
        assert m.value("llmtap_key_requests_total", key="app", error_type="") == 1
        assert m.label_values("llmtap_key_requests_total", "key") == {"app"}


async def test_a_hung_backend_fails_over_within_the_attempt_timeout() -> None:
    """first_byte_timeout (600 s) covered the whole chain of attempts, so a hung backend
    never failed over. Each attempt now has attempt_timeout to its answer's head."""
    from aiohttp import web

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.34.4"})

    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": "m1:latest", "model": "m1:latest",
                                              "digest": "0" * 64, "details": {}}]})

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", tags)
    app.router.add_post("/api/chat", hang)
    runner = web.AppRunner(app, shutdown_timeout=0.2)  # the hung handler is not waited for
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    hung_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    good = Simulator("--models", "m1", "--ttft", "0.005", "--output-tokens", "3")
    good_tap = Llmtap(good.url, *SIDECAR_ARGS)
    hung_tap = Llmtap(hung_url, *SIDECAR_ARGS, ready=False)
    router: Router | None = None
    try:
        await hung_tap.ready()
        config = ("poll_interval: 0.2\nattempt_timeout: 0.5\nbackends:\n"
                  + sidecar_yaml("hung", hung_tap) + sidecar_yaml("good", good_tap)
                  + "routes:\n  - {model: '*', policy: round_robin}\n")
        router = await asyncio.to_thread(Router, config)
        for _ in range(4):
            started = time.monotonic()
            status, _ = await chat(router.url, "m1", options={"num_predict": 3})
            assert status == 200 and time.monotonic() - started < 5
        m = await router.metrics()
        assert m.value("llmtap_router_retries_total", backend="hung", reason="timeout") >= 1
    finally:
        if router is not None:
            router.stop()
        for proc in (good_tap, hung_tap, good):
            proc.stop()
        await runner.cleanup()
