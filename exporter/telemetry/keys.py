"""Per-key usage, for chargeback on a shared server: requests and tokens per named API key.

The label values are the names in the key file (`--api-key-file`, the router's
`api_key_file`), never anything a client sends, so the series are bounded by that file.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from exporter.record import RequestRecord
from exporter.relay.observers import Observer


class KeyUsage(Observer):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "llmtap_key_requests", "Requests admitted per API key, by how they ended "
            "(error_type empty on success)", ("key", "error_type"), registry=registry)
        self.tokens = Counter(
            "llmtap_key_tokens", "Tokens per API key, as the server reported them",
            ("key", "gen_ai_token_type"), registry=registry)

    def finished(self, record: RequestRecord) -> None:
        key = record.key_name
        if not key:
            return
        self.requests.labels(key, record.error_type).inc()
        if record.input_tokens:
            self.tokens.labels(key, "input").inc(record.input_tokens)
        if record.output_token_count:
            self.tokens.labels(key, "output").inc(record.output_token_count)
