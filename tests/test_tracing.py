"""OTLP traces against real receivers: one span per request, GenAI attributes, parenting,
trace context to the upstream, exemplars, and a dead collector that costs nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Any

import aiohttp
import orjson
from openai import AsyncOpenAI

from tests.helpers import LlamaServer, Llmtap, Simulator, running
from tests.otlp import GRPCReceiver, HTTPReceiver
from tests.test_relay_wire import RawUpstream, Reply, response

CHAT: Any = [{"role": "user", "content": "Why is the sky blue?"}]
PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
# Export quickly so tests need not wait for the SDK's 5 s default batch delay.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
SPAN_KIND_CLIENT = 3
STATUS_ERROR = 2


def otel_env(port: int, protocol: str = "http/protobuf", **extra: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_SERVICE_NAME": "llmtap-test",
            **FAST_EXPORT, **extra}


async def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None,
               ) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, \
            session.post(url, json=body, headers=headers or {}) as resp:
        return resp.status, await resp.read()


def by_name(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        out.setdefault(span["name"], []).append(span)
    return out


async def test_one_span_per_request_with_genai_attributes(sim: Simulator) -> None:
    async with HTTPReceiver() as receiver:
        with running(Llmtap(sim.url, env=otel_env(receiver.port))) as tap:
            # streamed, with a caller's trace context
            status, _ = await post(tap.url + "/api/chat",
                                   {"model": "sim-small", "messages": CHAT,
                                    "options": {"num_predict": 6, "temperature": 0.2}},
                                   {"traceparent": TRACEPARENT})
            assert status == 200
            # not streamed
            status, body = await post(tap.url + "/v1/chat/completions",
                                      {"model": "sim-large", "messages": CHAT,
                                       "max_tokens": 5})
            usage = orjson.loads(body)["usage"]
            # an upstream error
            status, _ = await post(tap.url + "/api/chat", {"model": "nope", "messages": CHAT})
            assert status == 404
            # a client that goes away mid-stream
            async with aiohttp.ClientSession() as session, \
                    session.post(tap.url + "/api/generate",
                                 json={"model": "sim-small", "prompt": "x",
                                       "options": {"num_predict": 5000}}) as resp:
                await resp.content.readany()
            spans = await receiver.wait_for(4)
            await asyncio.sleep(0.3)  # nothing more may arrive
            assert len(receiver.spans) == 4, [s["name"] for s in receiver.spans]

            named = by_name(spans)
            # Span names carry the bounded model label, never the client's string.
            assert set(named) == {"chat sim-small:latest", "chat sim-large:latest",
                                  "chat other", "text_completion sim-small:latest"}
            chat = named["chat sim-small:latest"][0]
            assert (chat["trace_id"], chat["parent_span_id"]) == (PARENT_TRACE, PARENT_SPAN)
            assert chat["kind"] == SPAN_KIND_CLIENT and chat["status_code"] != STATUS_ERROR
            attributes = chat["attributes"]
            assert attributes["gen_ai.operation.name"] == "chat"
            assert attributes["gen_ai.provider.name"] == "ollama"
            assert attributes["gen_ai.request.model"] == "sim-small"
            assert attributes["gen_ai.response.model"] == "sim-small"
            assert attributes["gen_ai.request.stream"] is True
            assert attributes["gen_ai.request.max_tokens"] == 6
            assert attributes["gen_ai.request.temperature"] == 0.2
            assert attributes["gen_ai.response.finish_reasons"] == ["length"]
            assert attributes["gen_ai.usage.output_tokens"] == 6
            assert attributes["gen_ai.usage.input_tokens"] >= 1
            assert 0 < attributes["gen_ai.response.time_to_first_chunk"] < 5
            assert attributes["server.address"] == "127.0.0.1"
            assert attributes["server.port"] == sim.port
            assert "llmtap.upstream.eval_duration" in attributes
            assert chat["events"] == 0  # no per-token events
            assert chat["resource"]["service.name"] == "llmtap-test"
            assert "Why is the sky blue" not in orjson.dumps(spans).decode()  # never prompts

            whole = named["chat sim-large:latest"][0]
            assert whole["parent_span_id"] == ""  # no caller context: a root span
            assert whole["attributes"]["gen_ai.request.stream"] is False
            assert whole["attributes"]["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
            assert whole["attributes"]["gen_ai.usage.output_tokens"] == usage[
                "completion_tokens"]
            assert whole["attributes"]["gen_ai.response.id"].startswith("chatcmpl-")

            failed = named["chat other"][0]
            assert failed["status_code"] == STATUS_ERROR
            assert failed["attributes"]["error.type"] == "404"
            cancelled = named["text_completion sim-small:latest"][0]
            assert cancelled["status_code"] == STATUS_ERROR
            assert cancelled["attributes"]["error.type"] == "cancelled"
            assert all(s["end"] >= s["start"] for s in spans)

            # Exemplars on /metrics carry the ids of the spans the receiver got.
            async with aiohttp.ClientSession() as session, session.get(
                    tap.admin + "/metrics",
                    headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as answer:
                text = await answer.text()
            exemplar_ids = {
                line.split('trace_id="')[1][:32] for line in text.splitlines()
                if ("time_to_first_token_seconds_bucket" in line
                    or "request_duration_seconds_bucket" in line) and "trace_id=" in line}
            assert exemplar_ids
            assert exemplar_ids <= {s["trace_id"] for s in spans}
            assert PARENT_TRACE in exemplar_ids

            logged = [line for line in tap.json_lines("request") if line.get("trace_id")]
            assert {line["trace_id"] for line in logged} == {s["trace_id"] for s in spans}
            assert {line["span_id"] for line in logged} == {s["span_id"] for s in spans}


async def test_huge_model_names_stay_out_of_spans_and_memory(sim: Simulator) -> None:
    """A client naming a 400 KB model: the span is named by the bounded label, the attribute
    is cut to 128 characters, and llmtap's memory stays bounded (it grew by 243 MB over 300
    such requests when the name went into spans whole)."""
    async with HTTPReceiver() as receiver:
        with running(Llmtap(sim.url, env=otel_env(receiver.port))) as tap:
            huge = "m" * 400_000
            rss_before = tap.state()["process"]["rss_bytes"]
            async with aiohttp.ClientSession() as session:
                for _ in range(300):
                    async with session.post(tap.url + "/api/chat",
                                            json={"model": huge, "messages": CHAT}) as resp:
                        assert resp.status == 404
                        await resp.read()
            spans = await receiver.wait_for(300)
            rss_after = tap.state()["process"]["rss_bytes"]
            assert {span["name"] for span in spans} == {"chat other"}
            assert {len(span["attributes"]["gen_ai.request.model"]) for span in spans} == {128}
            print(f"\nRSS before {rss_before / 2**20:.1f} MB, after 300 requests naming a "
                  f"400 KB model {rss_after / 2**20:.1f} MB")
            # Each request holds ~15 copies of its body while it is relayed; none outlives it.
            assert rss_after - rss_before < 60 * 2**20


async def test_upstream_sees_llmtaps_span_as_parent() -> None:
    def echo(method: str, path: str, headers: dict[str, str], body: bytes,
             served: int) -> Reply:
        return response(orjson.dumps({"headers": headers}))

    async with HTTPReceiver() as receiver, RawUpstream(echo) as upstream:
        with running(Llmtap(upstream.url, "--upstream-kind", "openai", ready=False,
                            env=otel_env(receiver.port))) as tap:
            status, body = await post(tap.url + "/v1/embeddings",
                                      {"model": "m", "input": "x"},
                                      {"traceparent": TRACEPARENT, "tracestate": "vendor=1"})
            assert status == 200
            seen = orjson.loads(body)["headers"]
            spans = await receiver.wait_for(1)
            span = spans[0]
            assert seen["traceparent"] == f"00-{PARENT_TRACE}-{span['span_id']}-01"
            assert seen["tracestate"] == "vendor=1"
            assert span["parent_span_id"] == PARENT_SPAN


async def test_real_llama_server_spans(llama_server: LlamaServer) -> None:
    async with HTTPReceiver() as receiver:
        with running(Llmtap(llama_server.url, env=otel_env(receiver.port))) as tap:
            client = AsyncOpenAI(base_url=tap.url + "/v1", api_key="unused", max_retries=0)
            whole = await client.chat.completions.create(model="x", messages=CHAT,
                                                         max_tokens=6)
            stream = await client.chat.completions.create(
                model="x", messages=CHAT, max_tokens=6, stream=True,
                stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            # an upstream error (llama-server rejects the body) and a client that goes away
            status, _ = await post(tap.url + "/v1/chat/completions",
                                   {"model": "x", "messages": "not a list"})
            assert status == 400
            async with aiohttp.ClientSession() as session, \
                    session.post(tap.url + "/completion",
                                 json={"prompt": "Count:", "n_predict": 400,
                                       "stream": True}) as resp:
                await resp.content.readany()
            spans = await receiver.wait_for(4)
            assert len(spans) == 4
            error, cancelled = spans[2], spans[3]
            assert (error["status_code"], error["attributes"]["error.type"]) == (STATUS_ERROR,
                                                                                 "400")
            # /completion names no model: llama-server's one model is its label
            assert cancelled["name"] == f"text_completion {llama_server.model}"
            assert cancelled["attributes"]["error.type"] == "cancelled"
            for span, usage in zip(spans[:2], (whole.usage, chunks[-1].usage), strict=True):
                attributes = span["attributes"]
                assert usage is not None
                assert attributes["gen_ai.provider.name"] == "llama.cpp"
                assert attributes["gen_ai.response.model"] == llama_server.model
                assert attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
                assert attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
                assert attributes["llmtap.upstream.predicted_ms"] > 0
            assert spans[1]["attributes"]["gen_ai.request.stream"] is True


THINK = {"model": "sim-small", "messages": CHAT, "think": True}  # 12 tokens: 6 of them thinking
LATEST = {"OTEL_SEMCONV_STABILITY_OPT_IN": "http,gen_ai_latest_experimental"}


async def reasoning_traffic(tap: Llmtap) -> None:
    """A thinking stream, a thinking answer not streamed, a failure."""
    assert (await post(tap.url + "/api/chat", THINK))[0] == 200
    assert (await post(tap.url + "/v1/chat/completions",
                       {"model": "sim-large", "messages": CHAT, "reasoning_effort": "low"})
            )[0] == 200
    assert (await post(tap.url + "/api/chat", {**THINK, "model": "nope"}))[0] == 404


def check_reasoning_spans(spans: list[dict[str, Any]]) -> dict[str, Any]:
    """What both conventions' versions put on the spans: v1.41's span attributes
    gen_ai.request.stream, gen_ai.response.time_to_first_chunk (streams only),
    gen_ai.usage.reasoning.output_tokens and cache_read.input_tokens, and llmtap's two
    first-token times."""
    named = by_name(spans)
    stream = named["chat sim-small:latest"][0]["attributes"]
    assert stream["gen_ai.request.stream"] is True
    first = stream["gen_ai.response.time_to_first_chunk"]
    assert first == stream["llmtap.time_to_first_reasoning_token"]
    # Six thinking tokens apart (15 ms at the fixture's 400 tokens/s); the same when a busy
    # machine's scheduler sends them in one chunk, never the other way round.
    assert 0 < first <= stream["llmtap.time_to_first_answer_token"] < 5
    assert stream["gen_ai.usage.output_tokens"] == 12  # eval_count, the thinking included
    assert stream["gen_ai.usage.reasoning.output_tokens"] == 6
    assert stream["llmtap.usage.reasoning.counted"] is True  # Ollama reports no such count
    assert stream["gen_ai.usage.cache_read.input_tokens"] == 0
    whole = named["chat sim-large:latest"][0]["attributes"]
    assert whole["gen_ai.request.stream"] is False
    assert "gen_ai.response.time_to_first_chunk" not in whole  # streams only
    # Not streamed: reasoning and answer came together, and nothing reports a count.
    assert whole["llmtap.time_to_first_answer_token"] == \
        whole["llmtap.time_to_first_reasoning_token"]
    assert "gen_ai.usage.reasoning.output_tokens" not in whole
    return named["chat other"][0]["attributes"]


async def test_reasoning_on_spans_and_metrics_v1_41_by_default(sim: Simulator) -> None:
    async with HTTPReceiver() as receiver:
        with running(Llmtap(sim.url, env=otel_env(receiver.port))) as tap:
            await reasoning_traffic(tap)
            spans = await receiver.wait_for(3)
            failed = check_reasoning_spans(spans)
            assert "gen_ai.response.finish_reasons" not in failed  # v1.41 says nothing
            m = tap.metrics()
            labels = {"gen_ai_request_model": "sim-small:latest"}
            assert m.value("llmtap_reasoning_output_tokens_total", **labels) == 6
            assert m.value("gen_ai_client_token_usage_sum", gen_ai_token_type="output",
                           **labels) == 12
            assert m.value("llmtap_time_to_first_answer_token_seconds_count") == 2
            assert m.value("llmtap_time_to_first_answer_token_seconds_sum", **labels) >= \
                m.value("gen_ai_server_time_to_first_token_seconds_sum", **labels)
            assert "gen_ai_client_inference_usage" not in m.text
            line = next(line for line in tap.json_lines("request")
                        if line["model_label"] == "sim-small:latest")
            assert line["ttft_ms"] <= line["ttfa_ms"]
            assert (line["tokens_reasoning"], line["tokens_reasoning_counted"]) == (6, True)


async def test_reasoning_on_spans_and_metrics_with_latest_experimental(sim: Simulator) -> None:
    """OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental: the usage counters and
    per-operation histograms of semantic-conventions-genai instead of gen_ai.client.token.usage
    (failed requests included, with 0), "error" as the finish reason that never came."""
    async with HTTPReceiver() as receiver:
        with running(Llmtap(sim.url, env=otel_env(receiver.port, **LATEST))) as tap:
            await reasoning_traffic(tap)
            spans = await receiver.wait_for(3)
            failed = check_reasoning_spans(spans)
            assert failed["gen_ai.response.finish_reasons"] == ["error"]
            m = tap.metrics()
            small = {"gen_ai_request_model": "sim-small:latest", "gen_ai_token_modality":
                     "unknown"}
            assert m.value("gen_ai_client_inference_usage_reasoning_output_tokens_total",
                           **small) == 6
            assert m.value("gen_ai_client_inference_usage_output_tokens_total", **small) == 12
            assert m.value("gen_ai_client_inference_usage_input_tokens_total", **small) >= 1
            assert m.value("gen_ai_client_inference_usage_cache_read_input_tokens_total",
                           **small) == 0
            output = "gen_ai_client_inference_operation_output_tokens"
            assert m.value(output + "_count", error_type="") == 2
            assert (m.value(output + "_count", error_type="404"),
                    m.value(output + "_sum", error_type="404")) == (1, 0)
            for old in ("gen_ai_client_token_usage", "llmtap_cache_read_input_tokens",
                        "llmtap_reasoning_output_tokens"):
                assert old not in m.text, old
            # The server metrics are the same in both versions.
            assert m.value("gen_ai_server_time_to_first_token_seconds_count") == 2
            assert m.value("llmtap_time_to_first_answer_token_seconds_count") == 2


async def test_grpc_protocol(sim: Simulator) -> None:
    async with GRPCReceiver() as receiver:
        with running(Llmtap(sim.url, env=otel_env(receiver.port, "grpc"))) as tap:
            status, _ = await post(tap.url + "/api/embed", {"model": "sim-small",
                                                           "input": ["a", "b"]})
            assert status == 200
            spans = await receiver.wait_for(1)
            assert [s["name"] for s in spans] == ["embeddings sim-small:latest"]
            assert spans[0]["attributes"]["gen_ai.operation.name"] == "embeddings"


def _silent_listener() -> socket.socket:
    """A collector that accepts connections and never answers (the kernel completes the
    handshake; nobody reads)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    return sock


async def test_dead_or_hanging_collector_costs_requests_nothing(sim: Simulator) -> None:
    hanging = _silent_listener()
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        for name, port in (("hanging", hanging.getsockname()[1]),
                           ("refused", refused.getsockname()[1])):
            env = otel_env(port, OTEL_BSP_MAX_QUEUE_SIZE="16",
                           OTEL_BSP_MAX_EXPORT_BATCH_SIZE="16", OTEL_EXPORTER_OTLP_TIMEOUT="1")
            tap = Llmtap(sim.url, env=env)
            try:
                async with aiohttp.ClientSession() as session:
                    for _ in range(120):
                        async with session.post(tap.url + "/api/embed",
                                                json={"model": "sim-small",
                                                      "input": "x"}) as resp:
                            assert resp.status == 200
                            await resp.read()
                m = tap.metrics()
                assert m.value("gen_ai_server_request_duration_seconds_count",
                               error_type="") == 120, name
                dropped = m.value("llmtap_spans_dropped_total")
                assert dropped >= 120 - 2 * 16, (name, dropped)  # the queue holds 16
                warnings = [line for line in tap.json_lines() if line["event"] == "spans dropped"]
                assert len(warnings) == 1, name  # at most once a minute
                started = time.monotonic()
                os.killpg(tap.proc.pid, signal.SIGTERM)
                tap.proc.wait(10)
                stopped_in = time.monotonic() - started
                print(f"\ncollector {name}: {dropped:.0f} spans dropped of 120; "
                      f"stopped {stopped_in:.2f} s after SIGTERM")
                assert stopped_in < 2.0, name
            finally:
                tap.stop()
    finally:
        hanging.close()
        refused.close()


def test_unsupported_protocol_is_a_clear_startup_error(sim: Simulator) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "exporter", "serve", "--upstream", sim.url,
         "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        env={**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
             "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "http/json" in proc.stderr and "Traceback" not in proc.stderr
