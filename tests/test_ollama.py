"""Every number against the real Ollama (built from source by scripts/ollama-path, SmolLM2
imported offline): tokens, queue, waits, cold loads, digests, 503s, and inside its runners.

One Ollama for the module (OLLAMA_NUM_PARALLEL=1), one llmtap in front of it with fast polls.
Ollama runs each model in a llama-server child; llmtap finds it through /proc (same host).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import ollama as ollama_sdk
import orjson
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.helpers import Llmtap, Ollama, running
from tests.test_upstream import until

MODEL = Ollama.MODEL
CHAT = [{"role": "user", "content": "Name one colour."}]
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name one colour."}]
FAST_POLLS = ("--health-interval", "0.2", "--inventory-interval", "1")


@pytest.fixture(scope="module")
def tap(ollama: Ollama) -> Iterator[Llmtap]:
    with running(Llmtap(ollama.url, *FAST_POLLS)) as sidecar:
        yield sidecar


async def post(base: str, path: str, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """Status and every JSON object of the answer (one, or one per NDJSON line)."""
    async with aiohttp.ClientSession() as session, \
            session.post(base + path, json=body) as resp:
        raw = await resp.read()
    return resp.status, [orjson.loads(line) for line in raw.splitlines() if line.strip()]


def tokens(tap: Llmtap) -> tuple[float, float, float]:
    m = tap.metrics()
    return (m.value("gen_ai_client_token_usage_sum", gen_ai_token_type="input"),
            m.value("gen_ai_client_token_usage_sum", gen_ai_token_type="output"),
            m.value("llmtap_cache_read_input_tokens_total"))


async def test_native_tokens_equal_ollamas_own_counts(tap: Llmtap) -> None:
    """/api/chat and /api/generate, streamed and not, raw and through the ollama SDK: input =
    prompt_eval_count (the whole prompt, cache hits included), output = eval_count, cached =
    prompt_eval_cached_count. The same request twice hits Ollama's prompt cache."""
    finals = []
    before = tokens(tap)
    for path, body in (("/api/chat", {"messages": CHAT}), ("/api/generate", {"prompt": "Hi"})):
        for stream in (True, False, False):  # the repeat hits the prompt cache
            status, objs = await post(tap.url, path, {"model": MODEL, "stream": stream,
                                                      "options": {"num_predict": 6}, **body})
            assert status == 200 and objs[-1]["done"] is True
            assert len(objs) > 1 if stream else len(objs) == 1
            finals.append(objs[-1])
    await until(lambda: tokens(tap)[1] - before[1] >= sum(f["eval_count"] for f in finals))
    raw = tokens(tap)
    cached = [f["prompt_eval_cached_count"] for f in finals]  # sent even when 0
    assert raw[2] - before[2] == sum(cached)
    # The official SDK (its response types drop prompt_eval_cached_count): the same counts.
    client = ollama_sdk.AsyncClient(host=tap.url)
    finals.append(dict(await client.chat(model=MODEL, messages=CHAT, options={"num_predict": 6})))
    async for part in await client.generate(model=MODEL, prompt="Hi", stream=True,
                                            options={"num_predict": 6}):
        last = dict(part)
    finals.append(last)
    await until(lambda: tokens(tap)[1] - before[1] >= sum(f["eval_count"] for f in finals))
    after = tokens(tap)
    assert after[0] - before[0] == sum(f["prompt_eval_count"] for f in finals)
    assert after[1] - before[1] == sum(f["eval_count"] for f in finals)
    repeat = finals[2]
    assert repeat["prompt_eval_cached_count"] > 0, "the repeated chat did not hit the cache"
    assert repeat["prompt_eval_count"] == finals[1]["prompt_eval_count"]  # cache included


async def test_openai_dialect_tokens_match_ollamas_usage(tap: Llmtap) -> None:
    """Ollama's /v1/chat/completions through the openai SDK, streamed with and without
    include_usage, and not streamed: llmtap's counts are what Ollama reports in `usage`."""
    client = AsyncOpenAI(base_url=tap.url + "/v1", api_key="unused", max_retries=0)
    before = tokens(tap)
    whole = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6)
    assert whole.usage is not None
    expected_in, expected_out = whole.usage.prompt_tokens, whole.usage.completion_tokens
    usage = None
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, stream=True,
        stream_options={"include_usage": True})
    async for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None
    expected_in += usage.prompt_tokens
    expected_out += usage.completion_tokens
    await until(lambda: tokens(tap)[1] - before[1] >= expected_out)
    after = tokens(tap)
    assert (after[0] - before[0], after[1] - before[1]) == (expected_in, expected_out)

    # Without include_usage Ollama sends no counts: llmtap counts the content frames.
    frames = 0
    plain = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6,
                                                 stream=True)
    async for chunk in plain:
        frames += bool(chunk.choices and chunk.choices[0].delta.content)
    await until(lambda: tokens(tap)[1] - after[1] >= frames)
    assert tokens(tap)[1] - after[1] == frames


async def test_queue_inside_ollama_is_seen_and_its_wait_matches_the_clock(
        tap: Llmtap) -> None:
    """OLLAMA_NUM_PARALLEL=1: of N concurrent streams one runs and N-1 wait. llmtap shows
    requests_waiting = N-1 while the first streams, and from the runner's /slots: 1 slot of
    1 busy, N-1 queued inside Ollama. Each request's derived queue wait (total_duration minus
    load, prompt and eval) matches the wall clock: it started when the one before it ended."""
    await post(tap.url, "/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False,
                                          "options": {"num_predict": 1}})  # resident
    n = 3
    logged = tap.settled_lines()
    ended: dict[int, float] = {}
    arrived: dict[int, float] = {}

    async def one(i: int) -> None:
        arrived[i] = time.monotonic()
        # Greedy, so every answer runs its full num_predict (about 1 s): sampled, one answer
        # in eight here stopped after a few tokens, before the third request had arrived,
        # and the queue of two was never there to see.
        await post(tap.url, "/api/generate", {"model": MODEL, "prompt": f"Count to 40 ({i})",
                                              "options": {"num_predict": 120,
                                                          "temperature": 0, "seed": 7}})
        ended[i] = time.monotonic()

    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0.15)  # a known order

    history: list[tuple[float, float, float]] = []

    def queued() -> Any:
        m = tap.metrics()
        seen = (m.value("llmtap_requests_waiting"), m.value("llmtap_model_slots_busy",
                                                            gen_ai_request_model=MODEL),
                m.value("llmtap_model_requests_queued", gen_ai_request_model=MODEL))
        history.append(seen)
        return m if seen == (n - 1, 1, n - 1) else None

    m = await until(queued, within=20)
    assert m, f"never saw {n - 1} waiting behind 1 busy slot: {sorted(set(history))}"
    assert m.value("llmtap_model_slots_total", gen_ai_request_model=MODEL) == 1
    assert m.value("llmtap_server_requests_running") == 1
    assert m.value("llmtap_server_requests_queued") == n - 1
    assert 0 < m.value("llmtap_model_kv_cache_usage_ratio", gen_ai_request_model=MODEL) <= 1
    await asyncio.gather(*tasks)
    assert tap.settled_lines() - logged == n
    lines = tap.json_lines("request")[logged:]
    by_prompt = {line["duration_ms"]: line for line in lines}
    waits = sorted(line["queue_wait_ms"] / 1000 for line in by_prompt.values())
    order = sorted(ended, key=ended.__getitem__)
    clock = sorted(max(0.0, ended[prev] - arrived[i]) for prev, i in itertools.pairwise(order))
    # The first one did not wait; each other waited for the one before it to finish.
    assert waits[0] < 0.1
    for derived, wall in zip(waits[1:], clock, strict=True):
        assert abs(derived - wall) < 0.25 + 0.1 * wall, (waits, clock)


async def test_cold_load_after_keep_alive_zero_is_timed_and_ps_drives_the_gauges(
        tap: Llmtap, ollama: Ollama) -> None:
    """keep_alive 0 unloads the model (Ollama's idiom); the next request finds it unloaded:
    one cold load, timed by Ollama's load_duration; /api/ps drives loaded and VRAM."""
    await post(tap.url, "/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False,
                                          "options": {"num_predict": 1}})
    m = await until(lambda: (got := tap.metrics()).value(
        "llmtap_model_loaded", gen_ai_request_model=MODEL) == 1 and got)
    assert m, "the loaded gauge never showed the model"
    ps = orjson.loads(await _get(ollama.url + "/api/ps"))["models"][0]
    assert m.value("llmtap_model_vram_bytes", gen_ai_request_model=MODEL) == ps["size_vram"]
    loads_before = m.value("llmtap_model_load_duration_seconds_count")
    load_sum_before = m.value("llmtap_model_load_duration_seconds_sum")
    status, _ = await post(tap.url, "/api/generate", {"model": MODEL, "keep_alive": 0})
    assert status == 200
    assert await until(lambda: tap.metrics().value(
        "llmtap_model_loaded", gen_ai_request_model=MODEL) == 0, within=15)
    status, objs = await post(tap.url, "/api/chat", {"model": MODEL, "messages": CHAT,
                                                     "stream": False,
                                                     "options": {"num_predict": 2}})
    assert status == 200
    load = objs[-1]["load_duration"] / 1e9
    assert load > 0.1  # a real load of the GGUF, not the ~1 ms of a resident model
    m = await until(lambda: (got := tap.metrics()).value(
        "llmtap_model_load_duration_seconds_count") == loads_before + 1 and got)
    assert m, "the cold load was not counted"
    assert m.value("llmtap_model_load_duration_seconds_sum") - load_sum_before == \
        pytest.approx(load, abs=1e-6)
    tap.settled_lines()
    line = next(x for x in reversed(tap.json_lines("request")) if x["path"] == "/api/chat")
    assert line["load_ms"] == pytest.approx(load * 1000, abs=0.01)


async def _get(url: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return await resp.read()


async def test_tags_digest_drives_model_info_and_a_wrong_pin_is_refused(
        ollama: Ollama) -> None:
    """llmtap_model_info carries /api/tags' digest; a pin that does not match is reported,
    and with --enforce-pins refused in Ollama's dialect."""
    tag = next(m for m in orjson.loads(await _get(ollama.url + "/api/tags"))["models"]
               if m["name"] == MODEL)
    wrong = "0" * 64
    with running(Llmtap(ollama.url, *FAST_POLLS, "--pin", f"{MODEL}=sha256:{wrong}",
                        "--enforce-pins", "true")) as tap:
        m = tap.metrics()
        assert m.value("llmtap_model_info", gen_ai_request_model=MODEL,
                       digest=tag["digest"]) == 1
        assert m.value("llmtap_model_digest_mismatch", gen_ai_request_model=MODEL) == 1
        status, objs = await post(tap.url, "/api/chat", {"model": MODEL, "messages": CHAT,
                                                         "stream": False})
        assert status == 409 and "pinned to digest sha256:000000000000" in objs[0]["error"]
        assert m.value("gen_ai_server_request_duration_seconds_count") == 0


async def test_a_full_ollama_queue_answers_503_relayed_and_counted() -> None:
    """OLLAMA_MAX_QUEUE=1: more requests than Ollama will queue get its 503, relayed as
    Ollama sent it and counted under error_type 503."""
    with running(Ollama(OLLAMA_MAX_QUEUE="1")) as small, \
            running(Llmtap(small.url, *FAST_POLLS)) as tap:
        results = await asyncio.gather(*(post(tap.url, "/api/generate", {
            "model": MODEL, "prompt": f"Count ({i})", "stream": False,
            "options": {"num_predict": 8}}) for i in range(8)))
        busy = [objs for status, objs in results if status == 503]
        assert busy, f"no 503 among {[status for status, _ in results]}"
        assert all("busy" in objs[0]["error"] for objs in busy)
        await until(lambda: tap.metrics().value(
            "gen_ai_server_request_duration_seconds_count", error_type="503") == len(busy))
        assert tap.metrics().value("gen_ai_server_request_duration_seconds_count",
                                   error_type="503") == len(busy)


def shape(value: Any) -> Any:
    """Keys in order, recursively, and the JSON types of the leaves: what a parser sees."""
    if isinstance(value, dict):
        return [(key, shape(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) \
        else type(value).__name__


async def frames(base: str, path: str, body: dict[str, Any]) -> list[Any]:
    async with aiohttp.ClientSession() as session, \
            session.post(base + path, json=body) as resp:
        raw = await resp.read()
        kind = resp.headers["Content-Type"]
    if kind.startswith("text/event-stream"):
        events = [e.removeprefix(b"data: ") for e in raw.strip().split(b"\n\n")]
        return [kind, *(shape(orjson.loads(e)) for e in events if e != b"[DONE]"),
                raw.strip().endswith(b"data: [DONE]")]
    return [kind, *(shape(orjson.loads(line)) for line in raw.splitlines() if line.strip())]


async def test_simulator_frames_have_the_real_ollamas_shapes(ollama: Ollama, sim: Any) -> None:
    """Every frame the simulator sends for Ollama's API has the real Ollama's keys, in its
    order, with its JSON types: first and second frames, and the last two (the finish and
    the usage). Measured differences fixed in the simulator: no role-only opening delta on
    /v1 streams, the role on the first content delta only, `delta: {}` on the finish,
    prompt_eval_cached_count and prompt_tokens_details.cached_tokens."""
    messages = [{"role": "user", "content": "Say one word."}]
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/api/chat", {"messages": messages, "options": {"num_predict": 4}}),
        ("/api/chat", {"messages": messages, "stream": False, "options": {"num_predict": 4}}),
        ("/api/generate", {"prompt": "Once upon a time", "options": {"num_predict": 4}}),
        ("/api/generate", {"prompt": "Once upon a time", "stream": False,
                           "options": {"num_predict": 4}}),
        ("/v1/chat/completions", {"messages": messages, "max_tokens": 4, "stream": True}),
        ("/v1/chat/completions", {"messages": messages, "max_tokens": 4, "stream": True,
                                  "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"messages": messages, "max_tokens": 4}),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4, "stream": True}),
    ]
    for path, body in cases:
        real = await frames(ollama.url, path, {"model": MODEL, **body})
        simulated = await frames(sim.url, path, {"model": "sim-small", **body})
        # The first frame and the last two (the finish, and the usage or the end marker):
        # how many content frames come between depends on what the model says.
        for part in (slice(1, 2), slice(-2, None)):
            assert simulated[part] == real[part], (path, body, part)
        if len(real) > 4 and len(simulated) > 4:  # a middle content frame on both sides
            assert simulated[2] == real[2], (path, body, "second frame")
        assert simulated[0] == real[0], (path, "Content-Type")
    # The inventory and the loaded list: one entry's keys, order and types.
    await post(sim.url, "/api/generate", {"model": "sim-small", "prompt": "Hi",
                                          "options": {"num_predict": 1}})
    for path in ("/api/tags", "/api/ps"):
        real_doc = orjson.loads(await _get(ollama.url + path))
        sim_doc = orjson.loads(await _get(sim.url + path))
        assert real_doc["models"] and sim_doc["models"], path
        assert shape(sim_doc["models"][0]) == shape(real_doc["models"][0]), path


async def test_a_runner_killed_mid_stream_is_an_error_in_both_dialects(
        ollama: Ollama, tap: Llmtap) -> None:
    """The model's llama-server child dies after the first token (SIGKILL, found as llmtap
    finds it). Ollama's native stream then carries an `{"error": ...}` line instead of its
    done line; its OpenAI stream just stops: no finish chunk, no [DONE], on a 200 whose
    chunked body ends cleanly. Both are counted as upstream errors, not as answers."""
    import os
    import signal

    from exporter.upstream.runners import find_runners

    messages = [{"role": "user", "content": "Count from 1 to 200."}]
    cases = (("/api/chat", {"messages": messages, "options": {"num_predict": 300}}),
             ("/v1/chat/completions", {"messages": messages, "max_tokens": 300,
                                       "stream": True}))
    for path, body in cases:
        await post(tap.url, "/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False,
                                              "options": {"num_predict": 1}})  # resident
        errors = tap.metrics().value("gen_ai_server_request_duration_seconds_count",
                                     error_type="upstream_error")
        async with aiohttp.ClientSession() as session, \
                session.post(tap.url + path, json={"model": MODEL, **body}) as resp:
            assert resp.status == 200
            first = await resp.content.readline()
            assert first.strip(), "no first frame"
            found, why, _ = find_runners(ollama.port)
            assert found, why
            for runner in found:
                os.kill(runner.pid, signal.SIGKILL)
            rest = await resp.read()
        if path == "/api/chat":
            assert b'"error"' in rest
        else:
            assert b"[DONE]" not in rest and b'"finish_reason":"' not in rest
        assert await until(lambda want=errors + 1: tap.metrics().value(
            "gen_ai_server_request_duration_seconds_count", error_type="upstream_error")
            == want, within=10), (path, rest[-300:])


async def test_nothing_llmtap_polls_keeps_or_shows_prompt_text(tap: Llmtap) -> None:
    """While a request with a unique prompt runs (its runner's /slots polled meanwhile),
    neither the state endpoint, the metrics nor the log holds any of its text."""
    secret = "zebra-quartz-" + str(time.monotonic_ns())
    # A story, greedy: its full 80 tokens (about 0.8 s) keep the slot busy past a poll.
    # ("Repeat after me", sampled, ended after 22 tokens in some runs: a quarter second.)
    task = asyncio.create_task(post(tap.url, "/api/generate", {
        "model": MODEL, "prompt": f"Tell a long story about a zebra named {secret}.",
        "stream": False, "options": {"num_predict": 80, "temperature": 0, "seed": 7}}))
    seen = await until(lambda: tap.metrics().value(
        "llmtap_model_slots_busy", gen_ai_request_model=MODEL) == 1, within=20)
    assert seen, "the runner's slot was never seen busy"
    exposed = [orjson.dumps(tap.state()).decode(), tap.metrics().text]
    status, _ = await task
    assert status == 200
    tap.settled_lines()
    exposed.append(tap.log.read_text())
    for text in exposed:
        assert secret not in text and "Repeat after me" not in text


# A Modelfile TEMPLATE that renders each turn's `.Thinking` between <think> tags and opens the
# assistant's turn with <think>: Ollama infers the tags from it (thinking/template.go
# InferTags), lists the model as able to think, and parses its output into `thinking` and
# `content`. SmolLM2, shown one such turn, reasons in that form.
THINK_TEMPLATE = (
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ if .Thinking }}<think>\n{{ .Thinking }}\n'
    "</think>\n\n{{ end }}{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n<think>\n"
)
THINK_MODEL = "smolthink:latest"
THINK_CHAT = [{"role": "user", "content": "What is 2+2?"},
              {"role": "assistant", "thinking": "The user asks 2+2. That is 4.", "content": "4"},
              {"role": "user", "content": "What is 3+3?"}]


def create_thinking_model(ollama: Ollama) -> None:
    import os
    import subprocess
    from pathlib import Path

    from tests.helpers import llama_server_paths

    modelfile = Path(ollama.models_dir) / "Modelfile.think"
    modelfile.write_text(f'FROM {llama_server_paths()[1]}\nTEMPLATE """{THINK_TEMPLATE}"""\n'
                         "PARAMETER temperature 0\n")
    done = subprocess.run([ollama.binary, "create", THINK_MODEL, "-f", str(modelfile)],
                          env={**os.environ, **ollama.env}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


async def test_a_thinking_model_is_timed_apart_from_its_answer(ollama: Ollama, tap: Llmtap,
                                                               sim: Any) -> None:
    """Ollama 0.34.4 with a model that thinks: what it sends, pinned (thinking frames with
    `"content":""`, then the answer; `reasoning` deltas on /v1; eval_count and usage include
    the thinking and count none of it apart), the simulator's thinking frames shaped the same,
    and llmtap's two first-token times and counted reasoning tokens."""
    from tests.test_simulator import (
        OLLAMA_REASONING_V1_FIRST,
        OLLAMA_THINKING_CHAT,
        OLLAMA_THINKING_GENERATE,
    )

    create_thinking_model(ollama)
    try:
        assert await until(lambda: tap.metrics().value(
            "llmtap_model_info", gen_ai_request_model=THINK_MODEL), within=10)
        before = tap.settled_lines()
        body = {"model": THINK_MODEL, "messages": THINK_CHAT, "think": True,
                "options": {"num_predict": 40}}
        _, lines = await post(tap.url, "/api/chat", body)
        thinking = [x for x in lines[:-1] if x["message"].get("thinking")]
        answer = [x for x in lines[:-1] if x["message"]["content"]]
        assert thinking and answer, lines
        assert lines.index(thinking[-1]) < lines.index(answer[0])  # all thinking first
        assert all(x["message"]["content"] == "" for x in thinking)
        assert shape(thinking[0]) == shape(orjson.loads(OLLAMA_THINKING_CHAT))
        sim_lines = await frames(sim.url, "/api/chat", {**body, "model": "sim-small"})
        assert sim_lines[1] == shape(thinking[0])
        line = (await until(lambda: tap.json_lines("request")[before:], within=10))[0]
        assert line["model_label"] == THINK_MODEL
        assert line["ttft_ms"] < line["ttfa_ms"]
        assert (line["tokens_reasoning"], line["tokens_reasoning_counted"]) == (len(thinking),
                                                                              True)
        assert line["tokens_out"] == lines[-1]["eval_count"]  # the thinking included

        v1 = await frames(ollama.url, "/v1/chat/completions", {
            "model": THINK_MODEL, "stream": True, "max_tokens": 8, "messages": [
                {"role": "user", "content": "What is 3+3?"}]})
        assert v1[1] == shape(orjson.loads(OLLAMA_REASONING_V1_FIRST))
        generate = await frames(ollama.url, "/api/generate", {
            "model": THINK_MODEL, "prompt": "What is 3+3?", "think": True,
            "options": {"num_predict": 4}})
        assert shape(orjson.loads(OLLAMA_THINKING_GENERATE)) in generate[1:3]
    finally:
        async with aiohttp.ClientSession() as session, session.delete(
                ollama.url + "/api/delete", json={"model": THINK_MODEL}) as resp:
            assert resp.status == 200
