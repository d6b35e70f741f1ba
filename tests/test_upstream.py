"""Upstream state: inventory, loads and swaps, digest pins, server queues, pollers that fail."""

from __future__ import annotations

import asyncio
import statistics
import time
import urllib.request
from typing import Any

import aiohttp
import orjson

from exporter.upstream import promtext
from tests.helpers import LlamaServer, Llmtap, Simulator, running
from tests.test_relay_wire import RawUpstream, Reply, response

CHAT = [{"role": "user", "content": "hi"}]
NOT_FOUND = response(b'{"detail":"Not Found"}').replace(b"200 OK", b"404 Not Found", 1)
FAST_POLLS = ("--health-interval", "0.1", "--inventory-interval", "0.3")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return orjson.loads(resp.read())


async def chat(base: str, model: str, path: str = "/api/chat") -> tuple[int, Any]:
    body: dict[str, Any] = {"model": model, "messages": CHAT, "stream": False}
    async with aiohttp.ClientSession() as session, \
            session.post(base + path, json=body) as resp:
        return resp.status, orjson.loads(await resp.read())


async def until(check: Any, within: float = 5.0) -> Any:
    """Poll `check()` until it returns something truthy (pollers run on their own clock)."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def test_ollama_inventory_loads_and_model_swap() -> None:
    with running(Simulator("--cold-load", "0.3", "--max-loaded-models", "1", "--ttft", "0.01",
                           "--tokens-per-second", "500")) as sim, \
            running(Llmtap(sim.url, *FAST_POLLS)) as tap:
        tags = {m["name"]: m for m in get_json(sim.url + "/api/tags")["models"]}
        m = tap.metrics()
        for name, tag in tags.items():
            details = tag["details"]
            assert m.value("llmtap_model_info", gen_ai_request_model=name, digest=tag["digest"],
                           family=details["family"], parameter_size=details["parameter_size"],
                           quantization=details["quantization_level"]) == 1
            assert m.value("llmtap_model_loaded", gen_ai_request_model=name) == 0

        # First request for sim-small finds it unloaded: one cold load, its duration.
        status, answer = await chat(tap.url, "sim-small")
        assert status == 200 and answer["load_duration"] >= 0.3e9
        await chat(tap.url, "sim-small")  # resident now: a queue wait, not a load

        def small_loaded() -> Any:
            got = tap.metrics()
            return got if got.value("llmtap_model_loaded",
                                    gen_ai_request_model="sim-small:latest") == 1 else None

        m = await until(small_loaded)
        assert m, "the poller never saw sim-small loaded"
        ps = get_json(sim.url + "/api/ps")["models"]
        assert m.value("llmtap_model_vram_bytes", gen_ai_request_model="sim-small:latest") == \
            ps[0]["size_vram"]
        assert m.value("llmtap_model_load_duration_seconds_count") == 1
        assert m.value("llmtap_model_load_duration_seconds_sum") == answer["load_duration"] / 1e9
        assert m.value("llmtap_queue_wait_seconds_count") == 1

        # sim-large evicts sim-small (one model resident at a time): a swap.
        await chat(tap.url, "sim-large")

        def swapped() -> Any:
            got = tap.metrics()
            return got if (got.value("llmtap_model_loaded",
                                     gen_ai_request_model="sim-large:latest") == 1 and
                           got.value("llmtap_model_loaded",
                                     gen_ai_request_model="sim-small:latest") == 0) else None

        m = await until(swapped)
        assert m, "the poller never saw the swap"
        assert m.value("llmtap_model_loads_total", gen_ai_request_model="sim-large:latest") == 1
        assert m.value("llmtap_model_unloads_total",
                       gen_ai_request_model="sim-small:latest") == 1
        assert m.value("llmtap_model_load_duration_seconds_count") == 2
        state = tap.state()
        assert state["models"]["sim-large:latest"]["loaded"] is True
        assert state["models"]["sim-small:latest"]["loaded"] is False
        assert state["models"]["sim-large:latest"]["vram_bytes"] == tags[
            "sim-large:latest"]["size"]
        logged = [line["event"] for line in tap.json_lines()]
        assert "model unloaded" in logged and "model loaded" in logged


async def test_digest_change_flips_the_pin_and_enforcement_refuses_only_that_model() -> None:
    with running(Simulator("--ttft", "0.01", "--tokens-per-second", "500")) as sim:
        tags = {m["name"]: m for m in get_json(sim.url + "/api/tags")["models"]}
        pinned = tags["sim-small:latest"]["digest"]
        with running(Llmtap(sim.url, *FAST_POLLS, "--pin", f"sim-small=sha256:{pinned[:16]}",
                            "--enforce-pins", "true")) as tap:
            m = tap.metrics()
            assert m.value("llmtap_model_digest_mismatch",
                           gen_ai_request_model="sim-small:latest") == 0
            assert (await chat(tap.url, "sim-small"))[0] == 200

            async with aiohttp.ClientSession() as session, \
                    session.post(sim.url + "/api/pull", json={"model": "sim-small"}) as pull:
                assert pull.status == 200  # a new build of sim-small is installed

            def drifted() -> Any:
                got = tap.metrics()
                return got if got.value("llmtap_model_digest_mismatch",
                                        gen_ai_request_model="sim-small:latest") == 1 else None

            m = await until(drifted)
            assert m, "the pin mismatch never showed"
            status, body = await chat(tap.url, "sim-small")
            assert status == 409 and "pinned to digest sha256:" in body["error"]
            status, body = await chat(tap.url, "sim-small", "/v1/chat/completions")
            assert status == 409 and body["error"]["type"] == "model_pin_mismatch"
            assert (await chat(tap.url, "sim-large"))[0] == 200  # others keep working
            events = {line["event"] for line in tap.json_lines()}
            assert {"model digest changed", "model digest does not match its pin"} <= events
            m = tap.metrics()
            assert m.value("gen_ai_server_request_duration_seconds_count", error_type="409") == 2
            assert sim.stats()["completed"] == 2  # the refused requests never reached it


async def test_llama_server_queue_and_model_are_reexported(llama_server: LlamaServer) -> None:
    with running(Llmtap(llama_server.url, "--health-interval", "0.1")) as tap:
        async with aiohttp.ClientSession() as session:
            # A long generation keeps one slot busy while we look.
            long = asyncio.create_task(session.post(
                tap.url + "/completion", json={"prompt": "Count:", "n_predict": 400,
                                               "stream": True}))
            resp = await long

            def busy() -> Any:
                got = tap.metrics()
                return got if got.value("llmtap_upstream_slots_busy") == 1 else None

            m = await until(busy, 10)
            assert m, "a busy slot never showed"
            assert m.value("llmtap_upstream_requests_processing") == 1
            assert m.value("llmtap_upstream_slots_total") == 2  # -np 2
            await resp.read()
            resp.release()
        state = tap.state()["upstream"]
        assert state["queue"]["slots_total"] == 2
        assert "prompt" not in orjson.dumps(state).decode()  # /slots text never re-exported

        def settled() -> Any:
            got = tap.metrics()
            return got if got.value("llmtap_upstream_requests_processing") == 0 else None

        m = await until(settled)
        assert m.value("llmtap_upstream_tokens_predicted_total") >= 1
        assert m.value("llmtap_model_info", gen_ai_request_model=llama_server.model,
                       quantization="Q4_1", parameter_size="134.52M") == 1
        assert m.value("llmtap_queue_wait_seconds_count") == 1  # from TTFT - prompt_ms


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-8B"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-8B"} 7.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-8B"} 0.42
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="Qwen/Qwen3-8B"} 1234.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="Qwen/Qwen3-8B"} 5678.0
"""


def test_vllm_metrics_map_to_the_same_queue_figures() -> None:
    values = promtext.parse(VLLM_METRICS, promtext.VLLM)
    assert values is not None
    queue = promtext.to_queue(values)
    assert (queue.processing, queue.deferred, queue.kv_cache_usage_ratio) == (3, 7, 0.42)
    assert queue.counters == {"prompt_tokens": 1234, "tokens_predicted": 5678}
    assert promtext.parse("not prometheus {{{", promtext.VLLM) is None


async def test_openai_upstream_inventory_and_vllm_queue() -> None:
    def handle(method: str, path: str, headers: dict[str, str], body: bytes,
               served: int) -> Reply:
        if path == "/v1/models":
            return response(b'{"object":"list","data":[{"id":"Qwen/Qwen3-8B","object":"model"}]}')
        if path == "/metrics":
            return response(VLLM_METRICS.encode(), "text/plain; version=0.0.4")
        if method == "GET":
            return NOT_FOUND
        return response(b'{"choices":[{"message":{"content":"hi"}}],"model":"Qwen/Qwen3-8B",'
                        b'"usage":{"prompt_tokens":3,"completion_tokens":1}}')

    async with RawUpstream(handle) as upstream:
        with running(Llmtap(upstream.url, "--health-interval", "0.1", ready=False)) as tap:
            await tap.ready()
            await until(lambda: tap.metrics().value("llmtap_upstream_requests_deferred"))
            m = tap.metrics()
            assert m.value("llmtap_upstream_info", kind="openai") == 1
            assert m.value("llmtap_upstream_requests_deferred") == 7
            assert m.value("llmtap_upstream_requests_processing") == 3
            assert m.value("llmtap_upstream_kv_cache_usage_ratio") == 0.42
            assert m.value("llmtap_model_info", gen_ai_request_model="Qwen/Qwen3-8B") == 1
            await chat(tap.url, "no-such-model", "/v1/chat/completions")
            models = tap.metrics().label_values("gen_ai_server_request_duration_seconds_count",
                                                "gen_ai_request_model")
            assert models == {"Qwen/Qwen3-8B"}  # labelled by the model that answered


async def _latencies(url: str, n: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            start = time.perf_counter()
            async with session.post(url + "/api/chat", json={"model": "m"}) as resp:
                assert resp.status == 200
                await resp.read()
            out.append(time.perf_counter() - start)
    return out


async def test_hanging_pollers_leave_the_relay_alone() -> None:
    hanging = {"on": False}

    def handle(method: str, path: str, headers: dict[str, str], body: bytes,
               served: int) -> Reply:
        if path in ("/api/tags", "/api/ps") and hanging["on"]:
            return (b"", "hang")
        if path == "/api/version":
            return response(b'{"version":"0.34.4"}')
        if path in ("/api/tags", "/api/ps"):
            return response(b'{"models":[{"name":"m:latest","digest":"ab","size":1}]}')
        return response(b'{"model":"m","message":{"content":"hi"},"done":true,'
                        b'"eval_count":1}', "application/json; charset=utf-8")

    async with RawUpstream(handle) as upstream:
        with running(Llmtap(upstream.url, "--health-interval", "0.05", ready=False)) as tap:
            await tap.ready()
            baseline = await _latencies(tap.url, 40)
            hanging["on"] = True
            await asyncio.sleep(0.3)  # the pollers are now stuck on their 5 s timeouts
            stuck = await _latencies(tap.url, 40)
            hung = sum(1 for _, path, _, _ in upstream.requests[-200:] if path == "/api/ps")
            p50_base, p50_stuck = statistics.median(baseline), statistics.median(stuck)
            print(f"\nrequest latency p50: pollers answering {p50_base * 1000:.2f} ms, "
                  f"pollers hanging {p50_stuck * 1000:.2f} ms")
            assert hung >= 1
            assert p50_stuck < p50_base + 0.02  # generous: CI machines are noisy
            m = tap.metrics()
            assert m.value("llmtap_upstream_up") == 1  # health still answers
            assert m.value("gen_ai_server_request_duration_seconds_count", error_type="") == 80


async def test_down_upstream_logs_once_and_gpu_failure_leaves_the_proxy_alone(
        sim: Simulator) -> None:
    from exporter.gpu import GpuSampler

    with running(Llmtap("http://127.0.0.1:9", "--upstream-kind", "ollama",
                        "--health-interval", "0.05", ready=False)) as tap:
        await asyncio.sleep(1.0)  # ~20 failed probes
        down = [line for line in tap.json_lines() if line.get("event") == "upstream down"]
        assert len(down) == 1
        assert "Traceback" not in tap.log.read_text()
        assert tap.metrics().value("llmtap_upstream_up") == 0
    nvml_works = GpuSampler(mode="auto").sample_once().up
    with running(Llmtap(sim.url, "--gpu", "auto")) as tap:
        status, _ = await chat(tap.url, "sim-small")
        assert status == 200
        m = tap.metrics()
        assert m.value("llmtap_gpu_up") == (1 if nvml_works else 0)
        assert isinstance(tap.state()["gpus"], list)


async def test_a_poll_answer_that_never_ends_is_cut_not_kept() -> None:
    """A poll reads at most 8 MiB: an upstream answering /api/version with an endless body
    (it filled 450 MB in a second before the cap) fails that poll and costs no memory."""
    from exporter.upstream.fetch import MAX_POLL_BYTES, Fetcher

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
        try:
            while True:
                writer.write(piece)
                await writer.drain()
        except ConnectionError:
            pass

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fetcher = Fetcher(f"http://127.0.0.1:{port}")
    try:
        started = time.monotonic()
        assert await fetcher.get("/api/version") is None
        print(f"\nendless poll answer cut after {time.monotonic() - started:.2f} s "
              f"({MAX_POLL_BYTES >> 20} MiB read)")
        assert time.monotonic() - started < 3  # cut at the cap, not at the 5 s timeout
    finally:
        await fetcher.close()
        server.close()
