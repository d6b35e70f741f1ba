"""The proxy port's HTTP/1.1 server: asyncio transports and llhttp (httptools), nothing else.

`ProxyServer` listens and keeps the set of client connections (relay/connection.py), each
of which parses its requests with llhttp, the C parser aiohttp and uvicorn use, and hands
each complete request head to an exchange (relay/exchange.py). Client connections are capped
from the file-descriptor limit, so the admin port and the upstream connections always have
descriptors left; shutdown drains them.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from exporter.relay.connection import ClientConnection
from exporter.relay.deadline import Sweeper
from exporter.relay.request import IncomingRequest


class Exchange(Protocol):
    """What the connection needs of the exchange it hands a request to."""

    def begin(self) -> None: ...

    def client_gone(self) -> None: ...

    def client_stalled(self) -> None: ...

    def client_paused(self, paused: bool) -> None: ...

    def stop(self) -> None: ...

    @property
    def task(self) -> asyncio.Task[None] | None: ...


ExchangeFactory = Callable[[ClientConnection, IncomingRequest], Exchange]


@dataclass
class ServerLimits:
    header_timeout: float = 15.0
    client_idle_timeout: float = 60.0
    max_body_bytes: int = 64 << 20


def connection_cap() -> int:
    """Client connections to accept at most: each relayed one needs a second descriptor for
    its upstream, and a reserve stays free for the admin port, pollers and logs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft - 128) // 2)


def raise_fd_limit() -> None:
    """Use the hard limit of open files, not the soft default (often 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ProxyServer:
    def __init__(self, make_exchange: ExchangeFactory, limits: ServerLimits,
                 sweeper: Sweeper) -> None:
        self.make_exchange = make_exchange
        self.limits = limits
        self.sweeper = sweeper
        self.connections: set[ClientConnection] = set()
        self.max_connections = connection_cap()
        self.draining = False
        self._server: asyncio.AbstractServer | None = None
        # Looked up once, by start(): asyncio.get_running_loop() costs a getpid() system
        # call every time in CPython 3.11 (9% of the CPU per request when the relay called
        # it three times a request).
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "start() first"
        return self._loop

    async def start(self, host: str, port: int) -> int:
        """Listen; the port really bound (port 0 becomes the kernel's)."""
        loop = self._loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self), host, port, reuse_address=True, backlog=1024)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float) -> None:
        """Stop accepting, close idle connections, give exchanges `grace` seconds to end,
        then stop the rest."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.drain()
        running = [task for c in self.connections if (task := c.task) is not None]
        if running:
            await asyncio.wait(running, timeout=grace)
        running = [task for c in self.connections if (task := c.task) is not None]
        for connection in list(self.connections):
            connection.stop()
        if running:  # stopped exchanges conclude on their tasks: counted, logged
            await asyncio.wait(running, timeout=0.5)
