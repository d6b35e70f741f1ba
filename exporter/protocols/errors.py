"""Error bodies llmtap itself answers with, in the dialect the client speaks.

Clients' SDKs parse these: the Ollama SDK reads `{"error": "..."}`, OpenAI SDKs read
`{"error": {"message", "type", "param", "code"}}`, llama.cpp's native clients read
`{"error": {"code", "message", "type"}}`.
"""

from __future__ import annotations

import orjson

from exporter.protocols import ENDPOINTS


def dialect_for_path(path: str) -> str:
    endpoint = ENDPOINTS.get(path)
    if endpoint is not None:
        return endpoint.dialect
    if path.startswith("/api/"):
        return "ollama"
    return "openai"


def error_body(path: str, status: int, message: str, kind: str) -> bytes:
    dialect = dialect_for_path(path)
    if dialect == "ollama":
        return orjson.dumps({"error": message})
    if dialect == "llama.cpp":
        return orjson.dumps({"error": {"code": status, "message": message, "type": kind}})
    return orjson.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": kind}}
    )
