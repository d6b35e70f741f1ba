"""Sans-IO response framers: bytes in, parsed JSON values out to a callback.

Three framings cover every dialect: NDJSON (Ollama streams), SSE (OpenAI-compatible and
llama.cpp streams, and the router's translation of cloud answers) and one whole JSON document
(non-streamed answers). Each is fed the chunks exactly as they were relayed, however the
network split them, and never raises: bytes it cannot parse are counted in `unparseable` and
skipped. Framers know nothing of requests or time; the caller does.

Like h11's receive buffer, the line framer resumes its newline search where the previous one
stopped, so a line that arrives in a thousand small pieces costs O(bytes), not O(bytes²).
Memory is bounded: a line (or a whole document) longer than the limit is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import orjson

# A streamed frame is a few hundred bytes; 1 MiB leaves room for big tool-call arguments.
MAX_LINE_BYTES = 1 << 20
# Non-streamed answers (embeddings of a large batch) can be big; past this we stop parsing.
MAX_DOCUMENT_BYTES = 32 << 20

OnValue = Callable[[Any], None]
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError


class Framer(Protocol):
    @property
    def unparseable(self) -> int: ...

    def feed(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class LineFramer:
    """Splits a byte stream into lines (\\n or \\r\\n) and hands each to `_line`, which
    the framers below implement (a subclass, not a callback: no reference cycle to collect)."""

    __slots__ = ("_buf", "_discarding", "_scan", "overflows")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already searched for a newline
        self._discarding = False  # inside an over-long line: drop bytes until its newline
        self.overflows = 0

    def _line(self, line: bytes) -> None:
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        buf = self._buf
        if not buf and not self._discarding:
            # Fast path (the common case: each chunk holds whole frames): no copy into a buffer.
            start = 0
            find = data.find
            on_line = self._line
            while (nl := find(b"\n", start)) >= 0:
                on_line(data[start:nl])
                start = nl + 1
            if start < len(data):
                self._keep(data[start:] if start else data)
            return
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return
            self._discarding = False
            data = data[nl + 1 :]
        buf += data
        start = 0
        scan = self._scan
        while (nl := buf.find(b"\n", scan)) >= 0:
            self._line(bytes(buf[start:nl]))
            start = scan = nl + 1
        if start:
            del buf[:start]
        self._scan = len(buf)
        if len(buf) > MAX_LINE_BYTES:
            self._overflow()

    def _keep(self, tail: bytes) -> None:
        self._buf += tail
        self._scan = len(self._buf)
        if len(self._buf) > MAX_LINE_BYTES:
            self._overflow()

    def _overflow(self) -> None:
        self._buf.clear()
        self._scan = 0
        self._discarding = True
        self.overflows += 1

    def close(self) -> None:
        if self._buf:
            line = bytes(self._buf)
            self._buf.clear()
            self._scan = 0
            self._line(line)


class NDJSONFramer(LineFramer):
    """One JSON value per line (Ollama's streaming format)."""

    __slots__ = ("_bad", "_on_value")

    def __init__(self, on_value: OnValue) -> None:
        super().__init__()
        self._on_value = on_value
        self._bad = 0

    @property
    def unparseable(self) -> int:
        return self._bad + self.overflows

    def feed(self, data: bytes) -> None:
        # The common chunk is exactly one whole line: no buffer, no scan loop.
        if not self._buf and not self._discarding and data.endswith(b"\n") and \
                data.find(b"\n") == len(data) - 1:
            self._line(data[:-1])
            return
        super().feed(data)

    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            return
        try:
            value = _loads(line)
        except _JSONDecodeError:
            self._bad += 1
            return
        self._on_value(value)


class SSEFramer(LineFramer):
    """Server-sent events: `data:` lines joined until a blank line, then one JSON value.

    `data: [DONE]` (OpenAI's terminator) is not JSON: it calls `on_done`. Comments (`:`
    lines: llama-server's pings), `event:`, `id:` and `retry:` carry nothing llmtap measures.
    llama.cpp has sent errors as an `error:` field in some versions; it is read like `data:`.
    """

    __slots__ = ("_bad", "_data", "_more", "_on_done", "_on_value")

    def __init__(self, on_value: OnValue, on_done: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._on_value = on_value
        self._on_done = on_done
        self._bad = 0
        self._data: bytes | None = None  # first data line of the pending event
        self._more: list[bytes] | None = None  # further data lines (rare)

    @property
    def unparseable(self) -> int:
        return self._bad + self.overflows

    def feed(self, data: bytes) -> None:
        # The common chunk is exactly one event, `data: {...}\n\n`: straight to its value.
        if not self._buf and not self._discarding and self._data is None and \
                data.startswith(b"data: ") and data.endswith(b"\n\n") and \
                data.find(b"\n") == len(data) - 2 and not data.endswith(b"\r\n\n"):
            self._data = data[6:-2]
            self._dispatch()
            return
        super().feed(data)

    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            self._dispatch()
            return
        if line.startswith(b"data:") or line.startswith(b"error:"):
            value = line[line.index(b":") + 1 :]
            if value.startswith(b" "):
                value = value[1:]
            if self._data is None:
                self._data = value
            elif self._more is None:
                self._more = [value]
            else:
                self._more.append(value)

    def _dispatch(self) -> None:
        data = self._data
        if data is None:
            return
        if self._more is not None:
            data = b"\n".join([data, *self._more])
            self._more = None
        self._data = None
        if data == b"[DONE]":
            if self._on_done is not None:
                self._on_done()
            return
        try:
            value = _loads(data)
        except _JSONDecodeError:
            self._bad += 1
            return
        self._on_value(value)

    def close(self) -> None:
        super().close()
        self._dispatch()  # a stream that ended without the final blank line


class DocumentFramer:
    """A whole JSON document (non-streamed answer): parsed once, at the end of the body."""

    __slots__ = ("_buf", "_on_value", "_overflowed", "unparseable")

    def __init__(self, on_value: OnValue) -> None:
        self._on_value = on_value
        self._buf = bytearray()
        self._overflowed = False
        self.unparseable = 0

    def feed(self, data: bytes) -> None:
        if self._overflowed:
            return
        self._buf += data
        if len(self._buf) > MAX_DOCUMENT_BYTES:
            self._buf = bytearray()
            self._overflowed = True
            self.unparseable += 1

    def close(self) -> None:
        if self._overflowed or not self._buf.strip():
            return
        buf, self._buf = self._buf, bytearray()
        try:
            value = _loads(buf)
        except _JSONDecodeError:
            self.unparseable += 1
            return
        self._on_value(value)


STREAM_MEDIA = {"text/event-stream": SSEFramer, "application/x-ndjson": NDJSONFramer,
                "application/jsonl": NDJSONFramer, "application/jsonlines": NDJSONFramer}


def framer_for(content_type: str, on_value: OnValue, on_done: Callable[[], None] | None = None
               ) -> tuple[Framer | None, bool | None]:
    """The framing for a response's media type, and whether it is a stream; (None, None)
    when it is not a media type llmtap parses (an HTML error page, say). `on_done` is told
    of an SSE stream's `[DONE]`."""
    media = content_type.partition(";")[0].strip().lower()
    streamed = STREAM_MEDIA.get(media)
    if streamed is SSEFramer:
        return SSEFramer(on_value, on_done), True
    if streamed is not None:
        return streamed(on_value), True
    if media == "application/json" or media.endswith("+json"):
        return DocumentFramer(on_value), False
    return None, None
