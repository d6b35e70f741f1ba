"""One proxy port put together: the server, the exchanges it makes, and what they share.

The sidecar and the router each build one, with their own Upstream, labels, admission checks
and observers. Everything an exchange needs from outside itself is here, in one place.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from exporter.models import ModelLabels
from exporter.relay.admission import Admission
from exporter.relay.connection import ClientConnection
from exporter.relay.deadline import Sweeper
from exporter.relay.exchange import Exchange
from exporter.relay.observers import Observers
from exporter.relay.request import IncomingRequest
from exporter.relay.server import ProxyServer, ServerLimits
from exporter.relay.upstream import Upstream


@dataclass(frozen=True)
class ProxySettings:
    first_byte_timeout: float = 600.0
    idle_timeout: float = 300.0
    header_timeout: float = 15.0
    client_idle_timeout: float = 60.0
    max_body_bytes: int = 64 << 20
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-* are passed on


class TrustedProxies:
    """Peers whose X-Forwarded-For, -Proto and -Host llmtap passes on (--trusted-proxies)."""

    def __init__(self, cidrs: tuple[str, ...]) -> None:
        self._networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self._seen: dict[str, bool] = {}

    def __contains__(self, peer: str) -> bool:
        if not self._networks:
            return False
        known = self._seen.get(peer)
        if known is None:
            try:
                address = ipaddress.ip_address(peer)
                known = any(address in network for network in self._networks)
            except ValueError:
                known = False
            if len(self._seen) > 4096:
                self._seen.clear()
            self._seen[peer] = known
        return known


class Proxy:
    def __init__(self, upstream: Upstream, labels: ModelLabels, admission: Admission,
                 observers: Observers, settings: ProxySettings) -> None:
        self.upstream = upstream
        self.labels = labels
        self.admission = admission
        self.observers = observers
        self.first_byte_timeout = settings.first_byte_timeout
        self.idle_timeout = settings.idle_timeout
        self._trusted = TrustedProxies(settings.trusted_proxies)
        self.sweeper = Sweeper()
        self.server = ProxyServer(self._exchange, ServerLimits(
            settings.header_timeout, settings.client_idle_timeout, settings.max_body_bytes),
            self.sweeper)

    def _exchange(self, conn: ClientConnection, request: IncomingRequest) -> Exchange:
        return Exchange(self, conn, request)

    def trusts(self, peer: str) -> bool:
        return peer in self._trusted

    async def start(self, host: str, port: int) -> int:
        return await self.server.start(host, port)

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)
        await self.upstream.close()
