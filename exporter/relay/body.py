"""A request body as the client sends it: read whole when small, else handed on as it comes.

The client connection feeds it (`piece`, `end`, `lost`); the exchange either reads it whole
(`read`, when it fits the replayable limit: a JSON prompt that can be parsed and re-sent) or
streams it to the upstream (`stream`). The body limit is counted here as bytes arrive, so a
body without a declared length is refused the moment it passes the limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class ClientGoneError(ConnectionError):
    """The client went away before its request body was complete."""


class RequestBody:
    __slots__ = ("_buffer", "_consumer", "_flow", "_loop", "_on_end", "_on_too_large", "_waiter",
                 "_want",
                 "complete", "discarding", "expected", "length", "limit", "received",
                 "too_large")

    def __init__(self, length: int | None, expected: bool, limit: int,
                 flow: Callable[[bool], None], loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.length = length  # as declared by Content-Length (None: chunked or absent)
        self.expected = expected  # the request has a body at all
        self.limit = limit
        self.received = 0
        self.complete = not expected
        self.too_large = False
        self.discarding = False  # the exchange is over: the rest is read and dropped
        self._flow = flow  # pause (False) or resume (True) reading from the client
        self._buffer = bytearray()
        self._consumer: Callable[[bytes], None] | None = None
        self._on_end: Callable[[], None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._want = 0  # buffered bytes that wake the reader
        self._on_too_large: Callable[[], None] | None = None

    # ------------------------------------------------------------------ the client side

    def piece(self, data: bytes) -> None:
        if self.too_large or self.discarding:
            return  # drained and dropped: the answer went out already
        self.received += len(data)
        if self.received > self.limit:
            self.too_large = True
            self._buffer = bytearray()
            if self._on_too_large is not None:
                self._on_too_large()
            self._wake()
            return
        if self._consumer is not None:
            self._consumer(data)
            return
        self._buffer += data
        if self._waiter is not None and len(self._buffer) >= self._want:
            self._wake()

    def end(self) -> None:
        self.complete = True
        if self._on_end is not None and not self.too_large:
            self._on_end()
        self._wake()

    def lost(self) -> None:
        """The client connection closed before the body was complete."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ClientGoneError("the client went away mid-body"))

    # ------------------------------------------------------------------ the exchange side

    def on_too_large(self, callback: Callable[[], None] | None) -> None:
        self._on_too_large = callback

    async def read(self, up_to: int) -> bytes | None:
        """The whole body if it is at most `up_to` bytes; None once it has grown past that
        (the bytes so far stay buffered for `stream`)."""
        while not self.complete and not self.too_large and len(self._buffer) <= up_to:
            self._want = up_to + 1
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.complete and not self.too_large:
            return bytes(self._buffer)
        return None

    def stream(self, consumer: Callable[[bytes], None], on_end: Callable[[], None]) -> None:
        """Hand what has arrived, and everything after it, to `consumer`; then `on_end`."""
        buffered, self._buffer = bytes(self._buffer), bytearray()
        if buffered:
            consumer(buffered)
        if self.complete:
            on_end()
            return
        self._consumer, self._on_end = consumer, on_end

    def discard(self) -> None:
        self.discarding = True
        self._buffer = bytearray()
        self._consumer = self._on_end = None

    def pause(self) -> None:
        self._flow(False)

    def resume(self) -> None:
        self._flow(True)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

