"""Structured logs: one JSON access-log line per request, diagnostics through structlog.

Lines are rendered with orjson and written as bytes to stdout; the access log never carries
prompt or completion text, only what RequestRecord measured. In the JSON format the access
log line is built directly (the same fields structlog's JSON renderer would give, without
its processor chain), and lines are written together at most FLUSH_SECONDS after the first
of them (nginx's `access_log ... buffer= flush=`): one write system call a request was 8%
of the relay's CPU, and a stdout pipe that is slow to drain (a container's log driver)
blocked the event loop on every request rather than once per flush.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any, BinaryIO

import orjson
import structlog

from exporter.record import RequestRecord
from exporter.relay.observers import Observer

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
# The requested model name is client input: keep what we log of it short.
MAX_LOGGED_MODEL = 128
MAX_LOGGED_PATH = 1024


def _orjson_dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default)


class _Format:
    json = True  # what configure() chose: the access log writes JSON itself only then


def configure(level: str = "info", fmt: str = "json") -> None:
    _Format.json = fmt == "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "console":
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
        factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class _Second:
    """The formatted part of the current second: one strftime a second, not one a line."""

    value = -1
    text = ""


def _timestamp() -> str:
    """ISO 8601 in UTC with microseconds, as structlog's TimeStamper(fmt="iso") writes it."""
    now = time.time()
    second = int(now)
    if second != _Second.value:
        _Second.value = second
        _Second.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_Second.text}.{int((now - second) * 1_000_000):06d}Z"


FLUSH_SECONDS = 0.05
FLUSH_BYTES = 64 << 10


class AccessLog(Observer):
    def __init__(self, out: BinaryIO | None = None) -> None:
        self._log = structlog.get_logger("llmtap.access")
        self._out = out
        self._pending = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def flush(self) -> None:
        """Write what is pending (the timer's job; also at shutdown)."""
        self._timer = None
        if self._pending:
            out = self._out or sys.stdout.buffer
            out.write(self._pending)
            out.flush()
            self._pending.clear()

    def _written(self, line: bytes) -> None:
        self._pending += line
        if len(self._pending) >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            if self._loop is None:
                try:
                    self._loop = asyncio.get_running_loop()
                except RuntimeError:  # no loop (a tool, a test): write it now
                    self.flush()
                    return
            self._timer = self._loop.call_later(FLUSH_SECONDS, self.flush)

    def finished(self, record: RequestRecord) -> None:
        fields = self.fields(record)
        if not _Format.json:
            self._log.info("request", **fields)
            return
        if record.trace_id:
            fields["trace_id"] = record.trace_id
            fields["span_id"] = record.span_id
        fields["event"] = "request"
        fields["level"] = "info"
        fields["timestamp"] = _timestamp()
        self._written(orjson.dumps(fields) + b"\n")

    @staticmethod
    def fields(record: RequestRecord) -> dict[str, Any]:
        return {
            "method": record.method,
            "path": record.path[:MAX_LOGGED_PATH],
            "operation": record.operation or None,
            "model": record.request_model[:MAX_LOGGED_MODEL] or None,
            "model_label": record.model_label or None,
            "status": record.status,
            "error_type": record.error_type or None,
            "stream": record.stream,
            "ttft_ms": _ms(record.ttft),  # first token of any kind, reasoning included
            "ttfa_ms": _ms(record.time_to_first_answer),  # first answer token
            "duration_ms": _ms(record.duration),
            "queue_wait_ms": _ms(record.queue_wait),
            "load_ms": _ms(record.cold_load),
            "tokens_in": record.input_tokens,
            "tokens_out": record.output_token_count,
            "tokens_cached": record.cached_input_tokens,
            "tokens_reasoning": record.reasoning_output_tokens,
            # True: the reasoning count is llmtap's count of reasoning frames (Ollama and
            # llama-server report none), not the server's
            "tokens_reasoning_counted": record.reasoning_counted or None,
            "key": record.key_name or None,
        }
