"""RequestRecord: the one fact about one request, filled in as it passes through the relay.

The relay creates it at arrival, the dialect observer fills in what the response says, and
the telemetry sinks read it once when the request ends. Timestamps are `time.perf_counter()`
seconds; durations are derived from them, never from the wall clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exporter.protocols.base import RequestInfo

# error_type values (the catalogue's short codes); an HTTP status is its decimal string.
CANCELLED = "cancelled"
TIMEOUT = "timeout"
UPSTREAM_CONNECT = "upstream_connect"
UPSTREAM_RESET = "upstream_reset"
UPSTREAM_ERROR = "upstream_error"  # an error frame inside a 200 stream ({"error": ...})
QUEUE_FULL = "queue_full"  # refused by llmtap: too many waiting for this model

# gen_ai.operation.name values
CHAT = "chat"
TEXT_COMPLETION = "text_completion"
EMBEDDINGS = "embeddings"


class RequestRecord:
    """Mutable, slot-based record: one per request, so no dict per instance."""

    __slots__ = (
        "arrival",
        "dispatched",
        "end",
        "error_type",
        "finish_reasons",
        "first_byte",
        "first_token",
        "input_tokens",
        "key_name",
        "last_token",
        "method",
        "model_label",
        "model_was_loaded",
        "operation",
        "output_tokens",
        "overhead",
        "path",
        "provider",
        "request_info",
        "request_model",
        "response_id",
        "response_model",
        "server_timings",
        "span_id",
        "status",
        "stream",
        "token_chunks",
        "trace_id",
        "unparseable",
        "upstream_sent",
    )

    def __init__(self, method: str, path: str, arrival: float) -> None:
        self.method = method
        self.path = path
        self.arrival = arrival
        self.dispatched: float | None = None  # llmtap's own pre-work done, upstream call starts
        self.upstream_sent: float | None = None  # upstream accepted the request (headers back)
        self.first_byte: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.end: float | None = None
        self.provider = ""
        self.operation = ""  # "" = a path llmtap relays without observing
        self.request_model = ""
        self.response_model = ""
        self.model_label = ""
        self.model_was_loaded: bool | None = None  # at arrival; None when the server won't say
        self.stream: bool | None = None
        self.status = 0
        self.error_type = ""
        self.input_tokens: int | None = None  # as reported by the server
        self.output_tokens: int | None = None  # as reported by the server
        self.token_chunks = 0  # non-empty content frames seen (fallback count)
        self.unparseable = 0  # frames the observer could not parse
        self.finish_reasons: list[str] = []
        self.response_id = ""
        self.server_timings: dict[str, Any] = {}
        self.overhead = 0.0  # seconds spent in llmtap's own code
        self.request_info: RequestInfo | None = None  # what the request body asked for
        self.key_name = ""  # the API key that admitted the request, when keys are on
        self.trace_id = ""  # hex, set when the request's span is sampled
        self.span_id = ""

    @property
    def observed(self) -> bool:
        return bool(self.operation)

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
        if self.first_token is None:
            return None
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """(last token - first token) / (output tokens - 1), streamed answers only."""
        if not self.stream or self.first_token is None or self.last_token is None:
            return None
        n = self.output_token_count
        if n is None or n < 2:
            return None
        return (self.last_token - self.first_token) / (n - 1)

    @property
    def queue_wait(self) -> float | None:
        """Time before the server began work, where the server's timings let us derive it.

        Ollama's load_duration covers the wait in its scheduler queue plus any model load:
        when the model was already resident, it is the queue wait. llama.cpp reports its
        prompt time: TTFT minus it is the wait for a slot (streamed answers only).
        """
        timings = self.server_timings
        load = timings.get("load_duration")
        if load is not None:
            return load if self.model_was_loaded else None
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
