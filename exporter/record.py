"""RequestRecord: the one fact about one request, and the accumulator that fills it in.

The relay's Exchange creates the record at arrival and stamps its timestamps; the dialect's
events (exporter/events.py) are applied by `apply`; the observers read the record when the
request starts, when its first token is relayed and when it ends. Timestamps are
`time.perf_counter()` seconds; durations are derived from them, never from the wall clock.
"""

from __future__ import annotations

import enum
from typing import Any

from exporter.events import (
    EMBEDDINGS,
    FROM_TIMINGS,
    Answered,
    Event,
    Finished,
    NotAnObject,
    RequestInfo,
    ServerTimings,
    Token,
    UpstreamError,
    Usage,
)


class Outcome(enum.Enum):
    """How an exchange ended. Its value is the `error_type` label (the catalogue's codes);
    ANSWERED means an answer went out whole, and then its HTTP status decides."""

    ANSWERED = ""
    CANCELLED = "cancelled"  # the client went away (or llmtap shut down)
    TIMEOUT = "timeout"  # the upstream was silent past --first-byte- / --idle-timeout
    CLIENT_TIMEOUT = "client_timeout"  # the client sent or read nothing for too long
    UPSTREAM_CONNECT = "upstream_connect"
    UPSTREAM_RESET = "upstream_reset"  # the upstream broke off
    UPSTREAM_ERROR = "upstream_error"  # an error frame inside a 200 answer
    QUEUE_FULL = "queue_full"  # refused by llmtap: too many waiting for this model
    INTERNAL = "internal_error"  # a bug in llmtap (logged with its traceback)


class RequestRecord:
    """Mutable, slot-based record: one per request, so no dict per instance."""

    __slots__ = (
        "arrival",
        "cached_input_tokens",
        "dispatched",
        "end",
        "finish_reasons",
        "finished_at",
        "first_answer_token",
        "first_byte",
        "first_reasoning_token",
        "first_token",
        "input_source",
        "input_tokens",
        "key_name",
        "last_token",
        "live_label",
        "method",
        "model_label",
        "model_was_loaded",
        "operation",
        "outcome",
        "output_source",
        "output_tokens",
        "overhead",
        "path",
        "provider",
        "reasoning_chunks",
        "reasoning_tokens",
        "request_info",
        "request_model",
        "response_id",
        "response_model",
        "route",
        "server_timings",
        "span",
        "span_id",
        "status",
        "stream",
        "token_chunks",
        "trace_id",
        "traceparent",
        "unparseable",
        "upstream_sent",
        "waiting",
    )

    def __init__(self, method: str, path: str, arrival: float) -> None:
        self.method = method
        self.path = path
        self.arrival = arrival
        self.dispatched: float | None = None  # llmtap's own pre-work done, upstream call starts
        self.upstream_sent: float | None = None  # upstream accepted the request (headers back)
        self.first_byte: float | None = None
        self.first_token: float | None = None  # first token of any kind, reasoning included
        self.first_reasoning_token: float | None = None
        self.first_answer_token: float | None = None  # never before first_reasoning_token
        self.last_token: float | None = None
        self.finished_at: float | None = None  # the frame saying why the answer ended
        self.end: float | None = None
        self.provider = ""
        self.operation = ""  # "" = a path llmtap relays without observing
        self.request_model = ""
        self.response_model = ""
        self.live_label = ""  # the model label while in flight (the live gauges' key)
        self.model_label = ""  # the label the answer settled on
        self.model_was_loaded: bool | None = None  # at arrival; None when the server won't say
        self.stream: bool | None = None
        self.waiting = False  # in flight with no first token yet (the live gauges' waiting)
        self.status = 0
        self.outcome = Outcome.ANSWERED
        self.input_tokens: int | None = None  # as reported by the server
        self.output_tokens: int | None = None  # as reported by the server
        self.cached_input_tokens: int | None = None  # prompt tokens served from a cache
        self.input_source = 0  # how trustworthy the count is (events.FROM_*)
        self.output_source = 0
        self.token_chunks = 0  # non-empty content frames seen (fallback count)
        self.reasoning_tokens: int | None = None  # as reported by the server (part of output)
        self.reasoning_chunks = 0  # frames carrying reasoning (the fallback count)
        self.unparseable = 0  # frames the observer could not parse
        self.finish_reasons: list[str] = []
        self.response_id = ""
        self.server_timings: dict[str, float] = {}
        self.overhead = 0.0  # seconds spent in llmtap's own code
        self.request_info: RequestInfo | None = None  # what the request body asked for
        self.key_name = ""  # the API key that admitted the request, when keys are on
        self.trace_id = ""  # hex, set when the request's span is sampled
        self.span_id = ""
        self.traceparent = b""  # W3C header value the upstream request carries
        self.span: Any = None  # the tracing observer's span
        self.route: Any = None  # the router's decision, for its accounting observer

    @property
    def observed(self) -> bool:
        return bool(self.operation)

    @property
    def error_type(self) -> str:
        """The `error_type` label: "" for a successful answer, else a short code."""
        if self.outcome is not Outcome.ANSWERED:
            return self.outcome.value
        return str(self.status) if self.status >= 400 else ""

    @property
    def succeeded(self) -> bool:
        return self.outcome is Outcome.ANSWERED and 200 <= self.status < 300

    @property
    def output_token_count(self) -> int | None:
        """Server-reported output tokens; counted content frames only where it said nothing."""
        if self.output_tokens is not None:
            return self.output_tokens
        if self.operation == EMBEDDINGS:
            return None
        return self.token_chunks if self.first_token is not None else None

    @property
    def ttft(self) -> float | None:
        """To the first token of any kind: for a reasoning model, its first thinking token
        (what gen_ai.server.time_to_first_token measures: queue and prefill)."""
        if self.first_token is None:
            return None
        return self.first_token - self.arrival

    @property
    def time_to_first_answer(self) -> float | None:
        """To the first answer token: what a user of a reasoning model waits for. Equal to
        ttft when there was no reasoning; None when the answer never began (a length cut
        inside the thinking)."""
        if self.first_answer_token is None:
            return None
        return self.first_answer_token - self.arrival

    @property
    def time_to_first_reasoning(self) -> float | None:
        if self.first_reasoning_token is None:
            return None
        return self.first_reasoning_token - self.arrival

    @property
    def reasoning_output_tokens(self) -> int | None:
        """Reasoning tokens (a part of the output): the server's count where it reports one
        (OpenAI `completion_tokens_details.reasoning_tokens`), else llmtap's count of
        reasoning frames in a stream (Ollama and llama-server report none). Never more than
        the output tokens."""
        if self.reasoning_tokens is not None:
            count = self.reasoning_tokens
        elif self.stream and self.reasoning_chunks:
            count = self.reasoning_chunks
        else:
            return None
        output = self.output_token_count
        return count if output is None else min(count, output)

    @property
    def reasoning_counted(self) -> bool:
        """The reasoning count is llmtap's (frames), not the server's."""
        return self.reasoning_tokens is None and self.reasoning_output_tokens is not None

    @property
    def tpot(self) -> float | None:
        """(last token - first token) / (output tokens - 1), streamed answers only.

        With the server's own count, the last token is the frame that ends the answer: the
        count includes a token the server decoded but never sends (llama-server's stop
        token, a stop string), and that frame comes once it is decoded. With counted frames,
        the last content frame."""
        if not self.stream or self.first_token is None or self.last_token is None:
            return None
        n = self.output_token_count
        if n is None or n < 2:
            return None
        last = self.last_token
        if self.output_tokens is not None and self.finished_at is not None:
            last = max(last, self.finished_at)
        return (last - self.first_token) / (n - 1)

    @property
    def queue_wait(self) -> float | None:
        """Time before the server began work, where the server's timings let us derive it.

        Ollama: total_duration minus the prompt and generation time, when the model was
        already resident. Up to 0.2x the wait for a runner was inside load_duration; since
        0.30 (llama-server runners) load_duration is the load alone (~1 ms when resident)
        and the wait is what total_duration has beyond the three: the remainder covers both.
        llama.cpp reports its prompt time: TTFT minus it is the wait for a slot (streamed
        answers only).
        """
        timings = self.server_timings
        total = timings.get("total_duration")
        if total is not None and "load_duration" in timings:
            if not self.model_was_loaded:
                return None
            work = timings.get("prompt_eval_duration", 0.0) + timings.get("eval_duration", 0.0)
            return max(0.0, total - work)
        prompt_ms = timings.get("prompt_ms")
        ttft = self.ttft
        if prompt_ms is not None and ttft is not None and self.stream:
            return max(0.0, ttft - prompt_ms / 1000)
        return None

    @property
    def cold_load(self) -> float | None:
        """The load time of a request that found its model not loaded (Ollama)."""
        if self.model_was_loaded is False:
            return self.server_timings.get("load_duration")
        return None

    @property
    def duration(self) -> float | None:
        if self.end is None:
            return None
        return self.end - self.arrival


def apply(record: RequestRecord, event: Event, now: float) -> None:
    """The accumulator: what one event of the answer means for the record."""
    if type(event) is Token:
        token(record, event, now)
    elif type(event) is Usage:
        _usage(record, event)
    elif type(event) is Answered:
        record.response_model = record.response_model or event.model
        record.response_id = record.response_id or event.response_id
    elif type(event) is ServerTimings:
        record.server_timings.update(event.values)
    elif type(event) is Finished:
        record.finish_reasons.append(event.reason)
        if record.finished_at is None:
            record.finished_at = now
    elif type(event) is UpstreamError:
        record.outcome = Outcome.UPSTREAM_ERROR
    elif type(event) is NotAnObject:
        record.unparseable += 1


def token(record: RequestRecord, event: Token, now: float) -> None:
    """A frame of generated content: a timestamp or two and counters, nothing allocated."""
    if record.first_token is None:
        record.first_token = now
    record.last_token = now
    record.token_chunks += 1
    if event.reasoning:
        record.reasoning_chunks += 1
        if record.first_reasoning_token is None:
            record.first_reasoning_token = now
            # Answer text before any reasoning (a newline some templates emit first) is not
            # the answer the user waits for: that comes with or after the thinking. So the
            # answer's time is never earlier than the reasoning's.
            record.first_answer_token = None
    if event.answer and record.first_answer_token is None:
        record.first_answer_token = now


def _usage(record: RequestRecord, usage: Usage) -> None:
    """Counts from a more trusted source win; a later report of the same source updates."""
    if usage.input_tokens is not None and usage.source >= record.input_source:
        record.input_tokens = usage.input_tokens
        record.input_source = usage.source
    if usage.output_tokens is not None and usage.source >= record.output_source:
        record.output_tokens = usage.output_tokens
        record.output_source = usage.source
    if usage.reasoning_output_tokens is not None:
        record.reasoning_tokens = usage.reasoning_output_tokens
    if usage.cached_input_tokens is not None and (
            usage.source > FROM_TIMINGS or record.cached_input_tokens is None):
        record.cached_input_tokens = usage.cached_input_tokens
