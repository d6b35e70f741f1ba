"""Sans-IO response framers: bytes in, parsed JSON objects out to a callback.

Three framings cover every dialect: NDJSON (Ollama streams), SSE (OpenAI-compatible and
llama.cpp streams) and one whole JSON document (non-streamed answers). Each is fed the chunks
exactly as they were relayed, however the network split them, and never raises: bytes it
cannot parse are counted on the record and skipped.

Like h11's receive buffer, the line framer resumes its newline search where the previous one
stopped, so a line that arrives in a thousand small pieces costs O(bytes), not O(bytes²).
Memory is bounded: a line (or a whole document) longer than the limit is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import orjson

from exporter.record import RequestRecord

# A streamed frame is a few hundred bytes; 1 MiB leaves room for big tool-call arguments.
MAX_LINE_BYTES = 1 << 20
# Non-streamed answers (embeddings of a large batch) can be big; past this we stop parsing.
MAX_DOCUMENT_BYTES = 32 << 20

ObjectHandler = Callable[[Any, float], None]
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError


class Framer(Protocol):
    def feed(self, data: bytes, now: float) -> None: ...
    def close(self, now: float) -> None: ...


class LineFramer:
    """Splits a byte stream into lines (\\n or \\r\\n) and hands each to `on_line`."""

    __slots__ = ("_buf", "_discarding", "_on_line", "_record", "_scan")

    def __init__(self, on_line: Callable[[bytes, float], None], record: RequestRecord) -> None:
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already searched for a newline
        self._discarding = False  # inside an over-long line: drop bytes until its newline
        self._on_line = on_line
        self._record = record

    def feed(self, data: bytes, now: float) -> None:
        buf = self._buf
        if not buf and not self._discarding:
            # Fast path (the common case: each chunk holds whole frames): no copy into the buffer.
            start = 0
            find = data.find
            on_line = self._on_line
            while (nl := find(b"\n", start)) >= 0:
                on_line(data[start:nl], now)
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
            self._on_line(bytes(buf[start:nl]), now)
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
        self._record.unparseable += 1

    def close(self, now: float) -> None:
        if self._buf:
            line = bytes(self._buf)
            self._buf.clear()
            self._scan = 0
            self._on_line(line, now)


def _parse(data: bytes, record: RequestRecord) -> Any:
    try:
        return _loads(data)
    except _JSONDecodeError:
        record.unparseable += 1
        return None


class NDJSONFramer:
    """One JSON object per line (Ollama's streaming format)."""

    __slots__ = ("_lines", "_on_object", "_record")

    def __init__(self, on_object: ObjectHandler, record: RequestRecord) -> None:
        self._on_object = on_object
        self._record = record
        self._lines = LineFramer(self._line, record)

    def _line(self, line: bytes, now: float) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            return
        obj = _parse(line, self._record)
        if obj is not None:
            self._on_object(obj, now)

    def feed(self, data: bytes, now: float) -> None:
        self._lines.feed(data, now)

    def close(self, now: float) -> None:
        self._lines.close(now)


class SSEFramer:
    """Server-sent events: `data:` lines joined until a blank line, then one JSON event.

    `data: [DONE]` (OpenAI's terminator) is not an object and is skipped. llama.cpp has sent
    errors as an `error:` field in some versions; that field is treated like `data:`.
    """

    __slots__ = ("_data", "_lines", "_more", "_on_object", "_record")

    def __init__(self, on_object: ObjectHandler, record: RequestRecord) -> None:
        self._on_object = on_object
        self._record = record
        self._data: bytes | None = None  # first data line of the pending event
        self._more: list[bytes] | None = None  # further data lines (rare)
        self._lines = LineFramer(self._line, record)

    def _line(self, line: bytes, now: float) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            self._dispatch(now)
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
        # comments (":"), event:, id:, retry: carry nothing llmtap measures

    def _dispatch(self, now: float) -> None:
        data = self._data
        if data is None:
            return
        if self._more is not None:
            data = b"\n".join([data, *self._more])
            self._more = None
        self._data = None
        if data == b"[DONE]":
            return
        obj = _parse(data, self._record)
        if obj is not None:
            self._on_object(obj, now)

    def feed(self, data: bytes, now: float) -> None:
        self._lines.feed(data, now)

    def close(self, now: float) -> None:
        self._lines.close(now)
        self._dispatch(now)  # a stream that ended without the final blank line


class DocumentFramer:
    """A whole JSON document (non-streamed answer): parsed once, at the end of the body."""

    __slots__ = ("_buf", "_last", "_on_object", "_overflowed", "_record")

    def __init__(self, on_object: ObjectHandler, record: RequestRecord) -> None:
        self._on_object = on_object
        self._record = record
        self._buf = bytearray()
        self._overflowed = False
        self._last = 0.0

    def feed(self, data: bytes, now: float) -> None:
        self._last = now
        if self._overflowed:
            return
        self._buf += data
        if len(self._buf) > MAX_DOCUMENT_BYTES:
            self._buf = bytearray()
            self._overflowed = True
            self._record.unparseable += 1

    def close(self, now: float) -> None:
        if self._overflowed or not self._buf.strip():
            return
        obj = _parse(self._buf, self._record)
        self._buf = bytearray()
        if obj is not None:
            # The answer reached the client when its last byte was relayed.
            self._on_object(obj, self._last or now)


def framer_for(content_type: str, on_object: ObjectHandler, record: RequestRecord) -> Framer | None:
    """Pick the framing from the response's media type; None when it is not one we parse."""
    media = content_type.partition(";")[0].strip().lower()
    if media == "text/event-stream":
        record.stream = True
        return SSEFramer(on_object, record)
    if media in ("application/x-ndjson", "application/jsonl", "application/jsonlines"):
        record.stream = True
        return NDJSONFramer(on_object, record)
    if media == "application/json" or media.endswith("+json"):
        record.stream = False
        return DocumentFramer(on_object, record)
    return None
