"""Where an exchange sends its request: the `Upstream` interface, and the sidecar's one.

An Upstream opens the request and returns its response once the head is in. The sidecar's
is one model server behind one URL; the router's (exporter/routing/upstream.py) chooses a
backend per request and may try several before any byte of an answer has been relayed.
Each returns its own small response type: anything with a status, headers and a body it
pushes to the exchange.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from exporter.relay.client import Origin, ResponseSink, UpstreamPool
from exporter.relay.http1 import Headers

if TYPE_CHECKING:
    from exporter.relay.exchange import Exchange
    from exporter.upstream.monitor import UpstreamMonitor


class UpstreamResponse(Protocol):
    status: int
    reason: bytes
    headers: Headers  # as the upstream sent them (the exchange drops hop-by-hop ones)

    def start(self, sink: ResponseSink) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def abandon(self) -> None: ...


class Upstream(Protocol):
    @property
    def kind(self) -> str | None:
        """The provider label (ollama, llama.cpp, openai); None: the dialect's own."""

    def model_resident(self, label: str) -> bool | None:
        """At a request's arrival: is its model loaded? None when nobody can say."""

    async def open(self, exchange: Exchange) -> UpstreamResponse: ...

    async def close(self) -> None: ...


class SingleUpstream:
    """The sidecar's upstream: one model server, watched by its monitor."""

    def __init__(self, url: str, pool: UpstreamPool, monitor: UpstreamMonitor) -> None:
        self.origin = Origin.from_url(url)
        self.pool = pool
        self.monitor = monitor

    @property
    def kind(self) -> str | None:
        return self.monitor.kind

    def model_resident(self, label: str) -> bool | None:
        return self.monitor.view.model_was_loaded(label)

    async def open(self, exchange: Exchange) -> UpstreamResponse:
        return await self.pool.request(self.origin, exchange.outgoing())

    async def close(self) -> None:
        await self.pool.close()
