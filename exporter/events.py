"""What a request asks for and what its answer says, as plain values.

The dialects (exporter/protocols) read request bodies into a `RequestInfo` and answer frames
into events; `record.Accumulator` applies the events to the request's record. Nothing here
imports from the rest of llmtap, so dialects, the record and the relay all depend on this
module and never on each other in a circle.

Events are immutable. The ones that every token frame produces are module constants, so the
per-chunk path allocates nothing for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# gen_ai.operation.name values
CHAT = "chat"
TEXT_COMPLETION = "text_completion"
EMBEDDINGS = "embeddings"


@dataclass(slots=True)
class RequestInfo:
    """What llmtap reads from a request body (never the prompt text itself)."""

    model: str = ""
    stream: bool | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Token:
    """A frame carrying generated content: answer (text, a tool call), reasoning, or both.

    Reasoning is what the server marks as the model's thinking: Ollama's `thinking`, the
    OpenAI dialect's `reasoning_content` (llama-server, vLLM, DeepSeek) or `reasoning`
    (Ollama's /v1). Everything else a client is shown is the answer."""

    answer: bool = True
    reasoning: bool = False


@dataclass(frozen=True, slots=True)
class Answered:
    """The answer names the model that served it and its own id."""

    model: str
    response_id: str


# Where a token count came from, in the order of trust: the server's usage object, then its
# own timing counters (llama.cpp `timings`), then llmtap's count of content frames.
FROM_USAGE = 2
FROM_TIMINGS = 1


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts the server reported (None: this report does not say)."""

    input_tokens: int | None
    output_tokens: int | None
    cached_input_tokens: int | None = None
    source: int = FROM_USAGE
    reasoning_output_tokens: int | None = None  # part of output_tokens


@dataclass(frozen=True, slots=True)
class ServerTimings:
    """The server's own phase timings, in seconds (or its counters, e.g. prompt_n)."""

    values: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class Finished:
    """The server ended the answer, and why (stop, length, tool_calls, ...)."""

    reason: str


@dataclass(frozen=True, slots=True)
class UpstreamError:
    """An error frame inside a successful answer (`{"error": ...}` mid-stream)."""


@dataclass(frozen=True, slots=True)
class NotAnObject:
    """A frame that is valid JSON but not an object: relayed, counted as unparseable."""


Event = Token | Answered | Usage | ServerTimings | Finished | UpstreamError | NotAnObject

TOKEN = Token()
REASONING = Token(answer=False, reasoning=True)
REASONING_AND_ANSWER = Token(answer=True, reasoning=True)  # a frame with both (Ollama can)
UPSTREAM_ERROR = UpstreamError()
NOT_AN_OBJECT = NotAnObject()
NO_EVENTS: tuple[Event, ...] = ()
JUST_A_TOKEN: tuple[Event, ...] = (TOKEN,)
JUST_REASONING: tuple[Event, ...] = (REASONING,)
JUST_BOTH: tuple[Event, ...] = (REASONING_AND_ANSWER,)

# What a frame carries, as bits the dialects OR together (several choices, several fields).
ANSWER_BIT = 1
REASONING_BIT = 2
TOKEN_BY_BITS: tuple[Token | None, ...] = (None, TOKEN, REASONING, REASONING_AND_ANSWER)
JUST_BY_BITS: tuple[tuple[Event, ...], ...] = (NO_EVENTS, JUST_A_TOKEN, JUST_REASONING,
                                               JUST_BOTH)
