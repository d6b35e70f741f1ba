"""Structured logs: one JSON access-log line per request, diagnostics through structlog.

Lines are rendered with orjson and written as bytes to stdout; the access log never carries
prompt or completion text, only what RequestRecord measured.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

from exporter.record import RequestRecord

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
# The requested model name is client input: keep what we log of it short.
MAX_LOGGED_MODEL = 128


def _orjson_dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default)


def configure(level: str = "info", fmt: str = "json") -> None:
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


class AccessLog:
    def __init__(self) -> None:
        self._log = structlog.get_logger("llmtap.access")

    def observe(self, record: RequestRecord) -> None:
        self._log.info(
            "request",
            method=record.method,
            path=record.path,
            operation=record.operation or None,
            model=record.request_model[:MAX_LOGGED_MODEL] or None,
            model_label=record.model_label or None,
            status=record.status,
            error_type=record.error_type or None,
            stream=record.stream,
            ttft_ms=_ms(record.ttft),
            duration_ms=_ms(record.duration),
            tokens_in=record.input_tokens,
            tokens_out=record.output_token_count,
            key=record.key_name or None,
        )
