"""Wire dialects: which paths llmtap observes, how to read their requests and responses.

The path decides the dialect (a client speaking OpenAI's API to Ollama is parsed as OpenAI);
the upstream kind decides the provider label. Everything here is sans-IO: framers turn bytes
into JSON values, dialects turn values into events (exporter/events.py), and
`observe.ResponseObserver` ties the two to one request's record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from exporter.events import CHAT, EMBEDDINGS, TEXT_COMPLETION, Event, RequestInfo
from exporter.protocols import llamacpp, ollama, openai


@dataclass(frozen=True, slots=True)
class Endpoint:
    dialect: str  # provider name of the dialect's home server, used until the kind is known
    operation: str
    parse_request: Callable[[dict[str, Any]], RequestInfo]
    events: Callable[[dict[str, Any]], tuple[Event, ...]]


def _endpoint(module: Any, operation: str) -> Endpoint:
    return Endpoint(module.PROVIDER, operation, module.parse_request, module.events)


# POST paths llmtap observes; every other method and path is relayed without observing.
ENDPOINTS: dict[str, Endpoint] = {
    "/api/generate": _endpoint(ollama, TEXT_COMPLETION),
    "/api/chat": _endpoint(ollama, CHAT),
    "/api/embed": _endpoint(ollama, EMBEDDINGS),
    "/api/embeddings": _endpoint(ollama, EMBEDDINGS),
    "/v1/chat/completions": _endpoint(openai, CHAT),
    "/v1/completions": _endpoint(openai, TEXT_COMPLETION),
    "/v1/embeddings": _endpoint(openai, EMBEDDINGS),
    "/completion": _endpoint(llamacpp, TEXT_COMPLETION),
    "/infill": _endpoint(llamacpp, TEXT_COMPLETION),
}


def endpoint_for(method: str, path: str) -> Endpoint | None:
    if method != "POST":
        return None
    return ENDPOINTS.get(path)


def parse_request_body(endpoint: Endpoint, body: bytes | None) -> RequestInfo:
    """Read model and options from a request body; an unreadable body gives an empty info."""
    if not body:
        return RequestInfo()
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return RequestInfo()
    if type(obj) is not dict:
        return RequestInfo()
    return endpoint.parse_request(obj)
