"""llmtap in front of the synthetic server: byte-identical relay, SDKs, queue, cancellation."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import ollama
import orjson
import pytest

from tests.helpers import Llmtap, Simulator, free_port, running

CHAT = [{"role": "user", "content": "Why is the sky blue?"}]
EMBED_INPUT = ["the sky is blue", "grass is green"]

BODIES: list[tuple[str, dict[str, Any]]] = [
    ("/api/chat", {"model": "sim-small", "messages": CHAT}),
    ("/api/chat", {"model": "sim-small", "messages": CHAT, "stream": False}),
    ("/api/generate", {"model": "sim-large", "prompt": "Tell me a story"}),
    ("/api/generate", {"model": "sim-large", "prompt": "Tell me a story", "stream": False}),
    ("/api/embed", {"model": "sim-small", "input": EMBED_INPUT}),
    ("/api/embeddings", {"model": "sim-small", "prompt": "the sky is blue"}),
    ("/v1/chat/completions", {"model": "sim-small", "messages": CHAT, "stream": True,
                              "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"model": "sim-small", "messages": CHAT}),
    ("/v1/completions", {"model": "sim-large", "prompt": "Once", "stream": True}),
    ("/v1/completions", {"model": "sim-large", "prompt": "Once", "max_tokens": 5}),
    ("/v1/embeddings", {"model": "sim-small", "input": EMBED_INPUT}),
    ("/completion", {"prompt": "Hello", "n_predict": 8, "stream": True}),
    ("/completion", {"prompt": "Hello", "n_predict": 8}),
    ("/infill", {"input_prefix": "def f(", "input_suffix": "):", "stream": True}),
]


async def post(base: str, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as session, \
            session.post(base + path, data=orjson.dumps(body),
                         headers={"Content-Type": "application/json"}) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


def _case_id(path: str, body: dict[str, Any]) -> str:
    streamed = body.get("stream", path in ("/api/chat", "/api/generate"))
    return f"{path}-{'stream' if streamed else 'whole'}"


@pytest.mark.parametrize(("path", "body"), BODIES, ids=[_case_id(p, b) for p, b in BODIES])
async def test_relay_is_byte_identical(sim: Simulator, sim_tap: Llmtap, path: str,
                                       body: dict[str, Any]) -> None:
    direct = await post(sim.url, path, body)
    relayed = await post(sim_tap.url, path, body)
    assert direct[0] == 200, direct
    assert relayed == direct


async def test_ollama_sdk_chat_and_generate(sim_tap: Llmtap) -> None:
    # Ollama lists "sim-small:latest"; llmtap labels by that canonical name.
    labels = {"gen_ai_provider_name": "ollama", "gen_ai_request_model": "sim-small:latest"}
    before = sim_tap.metrics()
    client = ollama.AsyncClient(host=sim_tap.url)
    reported_in = reported_out = 0
    answers = []

    whole = await client.chat(model="sim-small", messages=CHAT, stream=False)
    answers.append(whole.message.content)
    reported_in += whole.prompt_eval_count or 0
    reported_out += whole.eval_count or 0
    parts = [part async for part in await client.chat(model="sim-small", messages=CHAT,
                                                      stream=True)]
    answers.append("".join(p.message.content or "" for p in parts))
    reported_in += parts[-1].prompt_eval_count or 0
    reported_out += parts[-1].eval_count or 0
    gen = await client.generate(model="sim-small", prompt="Hello there", stream=False)
    answers.append(gen.response)
    reported_in += gen.prompt_eval_count or 0
    reported_out += gen.eval_count or 0
    gen_parts = [p async for p in await client.generate(model="sim-small", prompt="Hello there",
                                                         stream=True)]
    answers.append("".join(p.response or "" for p in gen_parts))
    reported_in += gen_parts[-1].prompt_eval_count or 0
    reported_out += gen_parts[-1].eval_count or 0
    assert all(answers) and reported_out > 0

    after = sim_tap.metrics()

    def delta(name: str, **extra: str) -> float:
        return after.value(name, **labels, **extra) - before.value(name, **labels, **extra)

    assert delta("gen_ai_server_time_to_first_token_seconds_count") == 4
    assert delta("gen_ai_server_request_duration_seconds_count", error_type="") == 4
    assert delta("gen_ai_server_time_per_output_token_seconds_count") == 2  # streamed ones
    assert delta("gen_ai_client_token_usage_sum", gen_ai_token_type="input") == reported_in
    assert delta("gen_ai_client_token_usage_sum", gen_ai_token_type="output") == reported_out
    assert after.value("llmtap_requests_in_flight") == 0
    assert after.value("llmtap_requests_waiting") == 0


async def test_random_model_names_cannot_create_series(sim_tap: Llmtap) -> None:
    async with aiohttp.ClientSession() as session:
        for i in range(25):
            async with session.post(sim_tap.url + "/api/chat",
                                    json={"model": f"made-up-{i}", "messages": CHAT}) as resp:
                assert resp.status == 404  # the upstream does not have it
                await resp.read()
    metrics = sim_tap.metrics()
    models = metrics.label_values("gen_ai_server_request_duration_seconds_count",
                                  "gen_ai_request_model")
    assert models <= {"sim-small:latest", "sim-large:latest", "other"}
    assert metrics.value("gen_ai_server_request_duration_seconds_count",
                         gen_ai_request_model="other", error_type="404") >= 25


async def test_unobserved_paths_are_relayed_and_counted(sim: Simulator, sim_tap: Llmtap) -> None:
    before = sim_tap.metrics().value("llmtap_passthrough_requests_total")
    async with aiohttp.ClientSession() as session:
        async with session.get(sim.url + "/api/tags") as direct:
            want = await direct.read()
        async with session.get(sim_tap.url + "/api/tags") as relayed:
            assert relayed.status == 200
            assert await relayed.read() == want
    assert sim_tap.metrics().value("llmtap_passthrough_requests_total") == before + 1


async def test_state_endpoint_reports_models_and_upstream(sim_tap: Llmtap) -> None:
    async with aiohttp.ClientSession() as session, \
            session.post(sim_tap.url + "/api/chat",
                         json={"model": "sim-large", "messages": CHAT}) as resp:
        await resp.read()
    state = sim_tap.state()
    assert state["upstream"]["kind"] == "ollama" and state["upstream"]["up"] is True
    large = state["models"]["sim-large:latest"]
    assert large["in_flight"] == 0 and large["waiting"] == 0
    assert large["ewma"]["ttft_seconds"] > 0 and large["ewma"]["tpot_seconds"] > 0
    assert "messages" not in orjson.dumps(state).decode()


async def _stream_all(session: aiohttp.ClientSession, url: str, first: asyncio.Event) -> None:
    async with session.post(url + "/api/chat",
                            json={"model": "sim-small", "messages": CHAT}) as resp:
        async for _ in resp.content.iter_any():
            first.set()


async def test_queue_depth_is_visible_as_waiting() -> None:
    """One request at a time per model (Ollama's default): N concurrent → N-1 waiting."""
    n = 4
    with running(Simulator("--parallel", "1", "--ttft", "0.05", "--tokens-per-second", "20",
                           "--output-tokens", "30")) as sim, running(Llmtap(sim.url)) as tap:
        async with aiohttp.ClientSession() as session:
            firsts = [asyncio.Event() for _ in range(n)]
            tasks = [asyncio.create_task(_stream_all(session, tap.url, e)) for e in firsts]
            await asyncio.wait([asyncio.create_task(e.wait()) for e in firsts],
                               return_when=asyncio.FIRST_COMPLETED, timeout=10)
            seen = None
            for _ in range(50):  # the gauges are read from live state at scrape time
                m = tap.metrics()
                seen = (m.value("llmtap_requests_in_flight"), m.value("llmtap_requests_waiting"))
                if seen == (n, n - 1):
                    break
                await asyncio.sleep(0.02)
            assert seen == (n, n - 1)
            assert tap.state()["models"]["sim-small:latest"]["waiting"] == n - 1
            await asyncio.gather(*tasks)
        m = tap.metrics()
        assert (m.value("llmtap_requests_in_flight"), m.value("llmtap_requests_waiting")) == (0, 0)
        assert m.value("gen_ai_server_time_to_first_token_seconds_count") == n


async def _cancel_after(url: str, body: dict[str, Any], after_first_chunk: bool,
                        delay: float) -> float:
    """Send a request, then drop the connection; returns time.monotonic() of the drop."""
    got_chunk = asyncio.Event()

    async def run() -> None:
        async with aiohttp.ClientSession() as session, \
                session.post(url + "/api/chat", json=body) as resp:
            async for _ in resp.content.iter_any():
                got_chunk.set()

    task = asyncio.create_task(run())
    if after_first_chunk:
        await asyncio.wait_for(got_chunk.wait(), 10)
    await asyncio.sleep(delay)
    dropped = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return dropped


@pytest.mark.parametrize("phase", ["waiting-for-first-byte", "mid-stream"])
async def test_client_disconnect_closes_upstream_request(phase: str) -> None:
    with running(Simulator("--parallel", "1", "--ttft", "0.05", "--tokens-per-second", "10",
                           "--output-tokens", "100")) as sim, running(Llmtap(sim.url)) as tap:
        body: dict[str, Any]
        if phase == "mid-stream":
            body = {"model": "sim-small", "messages": CHAT}
            dropped = await _cancel_after(tap.url, body, after_first_chunk=True, delay=0.2)
        else:
            # A whole (non-streamed) answer sends no byte until it is done, ~10 s from now.
            body = {"model": "sim-small", "messages": CHAT, "stream": False}
            dropped = await _cancel_after(tap.url, body, after_first_chunk=False, delay=0.4)
        stats: dict[str, Any] = {}
        for _ in range(100):
            stats = sim.stats()
            if stats["cancelled"]:
                break
            await asyncio.sleep(0.02)
        assert stats["cancelled"] == 1, stats  # the upstream saw its request go away
        assert stats["completed"] == 0 and stats["active"] == 0
        closed_after = stats["last_cancel_monotonic"] - dropped
        print(f"\n{phase}: upstream request closed {closed_after * 1000:.1f} ms after the "
              "client disconnected")
        assert closed_after < 2.0
        for _ in range(50):
            m = tap.metrics()
            if m.value("gen_ai_server_request_duration_seconds_count", error_type="cancelled"):
                break
            await asyncio.sleep(0.02)
        assert m.value("gen_ai_server_request_duration_seconds_count",
                       error_type="cancelled") == 1
        assert m.value("gen_ai_server_request_duration_seconds_count") == 1
        assert (m.value("llmtap_requests_in_flight"), m.value("llmtap_requests_waiting")) == (0, 0)


async def test_unreachable_upstream_gives_502_in_the_clients_dialect() -> None:
    port = free_port()
    dead = f"http://127.0.0.1:{port}"
    with running(Llmtap(dead, "--upstream-kind", "ollama", ready=False)) as tap:
        status, ctype, body = await post(tap.url, "/api/chat",
                                         {"model": "m", "messages": CHAT})
        assert (status, ctype) == (502, "application/json")
        assert "cannot connect to the model server" in orjson.loads(body)["error"]
        # What failed, never where: the internal address is in the log, not the answer.
        assert str(port) not in body.decode() and "127.0.0.1" not in body.decode()
        assert any(str(port) in line.get("error", "") for line in tap.json_lines())
        status, _, body = await post(tap.url, "/v1/chat/completions",
                                     {"model": "m", "messages": CHAT})
        error = orjson.loads(body)["error"]
        assert status == 502 and error["type"] == "upstream_unavailable" and error["message"]
        async with aiohttp.ClientSession() as session, \
                session.get(tap.admin + "/readyz") as ready:
            assert ready.status == 503
        m = tap.metrics()
        assert m.value("gen_ai_server_request_duration_seconds_count",
                       error_type="upstream_connect") == 2
        assert m.value("llmtap_upstream_up") == 0
        assert (m.value("llmtap_requests_in_flight"), m.value("llmtap_requests_waiting")) == (0, 0)


def test_demo_runs_end_to_end() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "exporter", "demo", "--listen", "127.0.0.1:0",
         "--admin-listen", "127.0.0.1:0", "--requests", "8", "--exit"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.startswith("sim-")}
    assert set(rows) == {"sim-small:latest", "sim-large:latest"}
    assert sum(int(row[1]) for row in rows.values()) == 8  # every request counted
    assert "/metrics" in proc.stdout
