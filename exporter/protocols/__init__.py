"""Wire dialects: which paths llmtap observes, how to read their requests and responses.

The path decides the dialect (a client speaking OpenAI's API to Ollama is parsed as OpenAI);
the upstream kind decides the provider label. Everything here is sans-IO.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from exporter.protocols import llamacpp, ollama, openai
from exporter.protocols.base import RequestInfo
from exporter.protocols.framing import Framer, framer_for
from exporter.record import CHAT, EMBEDDINGS, TEXT_COMPLETION, RequestRecord

ObjectHandler = Callable[[RequestRecord, Any, float], None]


@dataclass(frozen=True, slots=True)
class Endpoint:
    dialect: str  # provider name of the dialect's home server, used until the kind is known
    operation: str
    parse_request: Callable[[dict[str, Any]], RequestInfo]
    on_object: ObjectHandler


def _endpoint(module: Any, operation: str) -> Endpoint:
    return Endpoint(module.PROVIDER, operation, module.parse_request, module.on_object)


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


class ResponseObserver:
    """Feeds relayed response bytes of one request into its record.

    `feed` is called after each chunk has been written to the client, with the time it was
    written; it never raises and never alters or delays the bytes.
    """

    __slots__ = ("_framer", "feed")

    def __init__(self, endpoint: Endpoint, record: RequestRecord, content_type: str) -> None:
        on_object = endpoint.on_object

        def handle(obj: Any, now: float) -> None:
            on_object(record, obj, now)

        framer: Framer | None = framer_for(content_type, handle, record)
        self._framer = framer
        # Bind once so the per-chunk call is a single attribute lookup.
        self.feed = framer.feed if framer is not None else _ignore

    def close(self, now: float) -> None:
        if self._framer is not None:
            self._framer.close(now)


def _ignore(data: bytes, now: float) -> None:
    """Bodies of a media type llmtap does not parse (an HTML error page, say)."""
