"""Ollama's chat and generate API carried over a cloud's OpenAI-compatible chat API.

Hybrid routing must not change what an Ollama client sees: its request is rewritten into an
OpenAI chat completion for the cloud, and the cloud's answer (SSE, or one JSON object) comes
back as Ollama NDJSON, ending with Ollama's final line (`done`, `done_reason`,
`prompt_eval_count`, `eval_count`, and nanosecond `total_duration` / `prompt_eval_duration` /
`eval_duration`) filled from the cloud's usage and the times the router saw.

Sans-IO like the dialect observers: bytes in, bytes out, never raising on bad input; the
SSE is read by the same framer the observers use. `TranslatedResponse` is the router's own
response type: it wraps the cloud's response and pushes the translated bytes to the exchange,
which relays and measures them exactly as it does a sidecar's.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from exporter.protocols.framing import SSEFramer
from exporter.relay.client import ResponseSink
from exporter.relay.upstream import UpstreamResponse

OLLAMA_PATHS = ("/api/chat", "/api/generate")  # what can be translated to a cloud
_OPTION_MAP = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
               "presence_penalty": "presence_penalty",
               "frequency_penalty": "frequency_penalty"}
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "stop", "content_filter": "stop"}


def _rfc3339(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{rest:09d}Z"


def ollama_to_openai(path: str, body: dict[str, Any], cloud_model: str) -> dict[str, Any]:
    """An Ollama /api/chat or /api/generate body as an OpenAI chat completion request."""
    messages: list[dict[str, Any]] = []
    if path == "/api/chat":
        for message in body.get("messages") or []:
            if not isinstance(message, dict):
                continue
            out = {k: message[k] for k in ("role", "content", "tool_calls", "name")
                   if k in message}
            for call in out.get("tool_calls") or []:
                # Ollama sends arguments as an object, OpenAI as a JSON string.
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and not isinstance(fn.get("arguments"), str):
                    fn["arguments"] = orjson.dumps(fn.get("arguments") or {}).decode()
            messages.append(out)
    else:
        if isinstance(body.get("system"), str) and body["system"]:
            messages.append({"role": "system", "content": body["system"]})
        messages.append({"role": "user", "content": str(body.get("prompt") or "")})
    stream = body.get("stream", True) is not False
    request: dict[str, Any] = {"model": cloud_model, "messages": messages, "stream": stream}
    if stream:
        request["stream_options"] = {"include_usage": True}  # Ollama's final line needs usage
    options = body.get("options")
    if isinstance(options, dict):
        for ours, theirs in _OPTION_MAP.items():
            if options.get(ours) is not None:
                request[theirs] = options[ours]
        limit = options.get("num_predict")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            request["max_tokens"] = limit
    fmt = body.get("format")
    if fmt == "json":
        request["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        request["response_format"] = {"type": "json_schema",
                                      "json_schema": {"name": "response", "schema": fmt}}
    if isinstance(body.get("tools"), list):
        request["tools"] = body["tools"]
    return request


class OllamaFromOpenAI:
    """Turns an OpenAI chat completion answer into Ollama's, for one request.

    `feed` takes SSE bytes in any chunking and returns the NDJSON lines they complete;
    `finish` returns the final `"done": true` line; `whole` converts a non-streamed answer.
    Times are `time.perf_counter_ns()`-style nanoseconds, passed in (sans-IO).
    """

    def __init__(self, chat: bool, model: str, started_ns: int) -> None:
        self.chat = chat
        self.model = model  # the name the client asked for, as Ollama would answer
        self.started_ns = started_ns
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.finish_reason = ""
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.chunks = 0
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.done = False
        self._out: list[bytes] = []
        self._now = 0
        self._framer = SSEFramer(self._value, self._done_event)

    # ----------------------------------------------------------------- streamed answers

    def feed(self, data: bytes, now_ns: int) -> bytes:
        self._now = now_ns
        self._framer.feed(data)
        out, self._out = self._out, []
        return b"".join(out)

    def flush(self, now_ns: int) -> bytes:
        """The lines of a last event that came without its closing blank line."""
        self._now = now_ns
        self._framer.close()
        out, self._out = self._out, []
        return b"".join(out)

    def _value(self, obj: Any) -> None:
        if isinstance(obj, dict) and (line := self._event(obj, self._now)):
            self._out.append(line)

    def _done_event(self) -> None:
        if not self.done:
            self._out.append(self.finish(self._now))

    def _event(self, obj: dict[str, Any], now_ns: int) -> bytes:
        if "error" in obj and not self.done:
            error = obj["error"]
            message = error.get("message") if isinstance(error, dict) else error
            self.done = True
            return orjson.dumps({"error": str(message)}) + b"\n"
        self._usage(obj.get("usage"))
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return b""
        choice = choices[0]
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return b""
        for call in delta.get("tool_calls") or []:
            if isinstance(call, dict):
                self._tool_delta(call)
        content = delta.get("content")
        thinking = delta.get("reasoning_content") or delta.get("reasoning")
        if not content and not thinking:
            return b""
        if self.first_ns is None:
            self.first_ns = now_ns
        self.last_ns = now_ns
        self.chunks += 1
        return self._line(content if isinstance(content, str) else "",
                          thinking if isinstance(thinking, str) else "", now_ns, done=False)

    def _tool_delta(self, call: dict[str, Any]) -> None:
        # OpenAI streams a tool call's arguments in fragments; Ollama sends each call whole.
        index = call.get("index", 0)
        entry = self.tool_calls.setdefault(index if isinstance(index, int) else 0,
                                           {"name": "", "arguments": ""})
        fn = call.get("function")
        if isinstance(fn, dict):
            if isinstance(fn.get("name"), str):
                entry["name"] += fn["name"]
            if isinstance(fn.get("arguments"), str):
                entry["arguments"] += fn["arguments"]

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            if isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                self.completion_tokens = usage["completion_tokens"]

    def _line(self, content: str, thinking: str, now_ns: int, done: bool,
              tool_calls: list[dict[str, Any]] | None = None) -> bytes:
        obj: dict[str, Any] = {"model": self.model, "created_at": _rfc3339(time.time_ns())}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            obj["message"] = message
        else:
            obj["response"] = content
            if thinking:
                obj["thinking"] = thinking
        if done:
            obj.update(self._final_fields(now_ns))
        else:
            obj["done"] = False
        return orjson.dumps(obj) + b"\n"

    def _final_fields(self, now_ns: int) -> dict[str, Any]:
        first = self.first_ns if self.first_ns is not None else now_ns
        last = self.last_ns if self.last_ns is not None else now_ns
        fields: dict[str, Any] = {
            "done": True,
            "done_reason": _FINISH.get(self.finish_reason, "stop"),
            "total_duration": max(0, now_ns - self.started_ns),
            "load_duration": 0,
        }
        if self.prompt_tokens is not None:
            fields["prompt_eval_count"] = self.prompt_tokens
        fields["prompt_eval_duration"] = max(0, first - self.started_ns)
        # No usage from the cloud: the content chunks are the best count there is.
        fields["eval_count"] = (self.completion_tokens if self.completion_tokens is not None
                                else self.chunks)
        fields["eval_duration"] = max(0, last - first)
        return fields

    def _tool_list(self) -> list[dict[str, Any]]:
        calls = []
        for _, entry in sorted(self.tool_calls.items()):
            try:
                arguments = orjson.loads(entry["arguments"]) if entry["arguments"] else {}
            except orjson.JSONDecodeError:
                arguments = {}
            calls.append({"function": {"name": entry["name"], "arguments": arguments}})
        return calls

    def finish(self, now_ns: int) -> bytes:
        """The final line (once); b"" when the answer already ended."""
        if self.done:
            return b""
        self.done = True
        return self._line("", "", now_ns, done=True, tool_calls=self._tool_list() or None)

    # ----------------------------------------------------------------- whole answers

    def whole(self, answer: Any, now_ns: int) -> bytes:
        """A non-streamed chat completion as Ollama's one JSON object (no trailing newline,
        as Ollama's gin writer sends it)."""
        if not isinstance(answer, dict):
            return orjson.dumps({"error": "the cloud backend sent an unreadable answer"})
        self._usage(answer.get("usage"))
        choices = answer.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(
            choices[0], dict) else {}
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]
        raw = choice.get("message")
        message = raw if isinstance(raw, dict) else {}
        text = message.get("content")
        content = text if isinstance(text, str) else ""
        thinking = message.get("reasoning_content") or ""
        for index, call in enumerate(message.get("tool_calls") or []):
            if isinstance(call, dict):
                self._tool_delta({"index": index, **call})
        self.first_ns = self.last_ns = now_ns
        self.done = True
        return self._line(content, thinking if isinstance(thinking, str) else "", now_ns,
                          done=True, tool_calls=self._tool_list() or None).rstrip(b"\n")


def error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body, for Ollama's `{"error": "..."}`."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")[:500] or "the cloud backend failed"
    error = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return "the cloud backend failed"


class TranslatedResponse:
    """The cloud's response seen through Ollama's eyes: NDJSON (or one JSON object) pushed to
    the exchange as the cloud's SSE arrives."""

    def __init__(self, inner: UpstreamResponse, translator: OllamaFromOpenAI,
                 stream: bool) -> None:
        self._inner = inner
        self._translator = translator
        self._stream = stream and inner.status < 400
        self._sink: ResponseSink | None = None
        self._whole = bytearray()
        self.status = inner.status
        self.reason = inner.reason
        content_type = (b"application/x-ndjson" if self._stream
                        else b"application/json; charset=utf-8")
        self.headers = [(b"Content-Type", content_type)]

    def start(self, sink: ResponseSink) -> None:
        self._sink = sink
        self._inner.start(self)

    def pause(self) -> None:
        self._inner.pause()

    def resume(self) -> None:
        self._inner.resume()

    def abandon(self) -> None:
        self._inner.abandon()

    # ----------------------------------------------------------------- the cloud's body

    def body(self, data: bytes) -> None:
        assert self._sink is not None
        if not self._stream:
            self._whole += data
            return
        out = self._translator.feed(data, time.perf_counter_ns())
        if out:
            self._sink.body(out)

    def end(self) -> None:
        assert self._sink is not None
        now = time.perf_counter_ns()
        if not self._stream:
            self._sink.body(self._whole_answer(bytes(self._whole), now))
            self._sink.end()
            return
        if tail := self._translator.flush(now):
            self._sink.body(tail)
        if not self._translator.done:
            # A stream that ended without [DONE] still gets Ollama's final line if it
            # produced something; else the client sees the error it is.
            self._sink.body(self._translator.finish(now) if self._translator.chunks else
                            orjson.dumps({"error": "the cloud backend ended the answer "
                                          "without content"}) + b"\n")
        self._sink.end()

    def fail(self, error: BaseException) -> None:
        assert self._sink is not None
        self._sink.fail(error)

    def _whole_answer(self, body: bytes, now_ns: int) -> bytes:
        if self.status >= 400:
            return orjson.dumps({"error": error_message(body)})
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        return self._translator.whole(answer, now_ns)
