"""A request head as the client sent it, and the HTTP rules it must pass to be read at all.

The connection builds an `IncomingRequest` once llhttp has the whole head; `head_problem`
says why a head cannot be taken (RFC 9112: one Host, HTTP/1.x, a known Expect; and no
protocol upgrade with a body: llhttp would skip that body and read it as further requests,
which is how a front proxy's path rules are smuggled past). The answers are in the dialect
the path implies, like every answer llmtap makes itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.relay.body import RequestBody
from exporter.relay.http1 import Headers


@dataclass(slots=True)
class IncomingRequest:
    """A request head as the client sent it."""

    method: str
    target: bytes  # the request target, raw
    path: str  # its path without the query ("" when the target has none)
    headers: Headers  # in wire order, names as sent
    fields: dict[bytes, bytes]  # lower-case name → value (repeated fields joined by ", ")
    keep_alive: bool
    http11: bool
    arrival: float  # perf_counter() when the head was complete
    body: RequestBody
    peer: str
    local: str  # host:port the client connected to

    @property
    def origin_form(self) -> bool:
        return self.target.startswith(b"/")


class Reject(Exception):
    """A request llmtap will not read: the connection answers it, drains and closes."""

    def __init__(self, status: int, kind: str, message: str, path: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.path = path


def target_path(target: bytes) -> str:
    """The path of a request target, without its query (absolute-form: the URL's path)."""
    if target.startswith(b"/"):
        return target.partition(b"?")[0].decode("latin-1")
    if b"://" in target:
        rest = target.split(b"://", 1)[1].partition(b"/")[2]
        return "/" + rest.partition(b"?")[0].decode("latin-1")
    return ""


def fields_of(headers: Headers) -> tuple[dict[bytes, bytes], int]:
    """Lower-case name → value (repeated fields joined, as RFC 9110 reads them), and how
    many Host fields there were."""
    fields: dict[bytes, bytes] = {}
    hosts = 0
    for name, value in headers:
        lower = name.lower()
        hosts += lower == b"host"
        prior = fields.get(lower)
        fields[lower] = value if prior is None else prior + b", " + value
    return fields, hosts


def head_problem(method: str, version: str, upgrade: bool, has_body: bool, hosts: int,
                 fields: dict[bytes, bytes], path: str) -> Reject | None:
    if version not in ("1.1", "1.0"):
        return Reject(505, "http_version_not_supported",
                      f"llmtap speaks HTTP/1.1 (got HTTP/{version})", path)
    if hosts > 1:
        return Reject(400, "invalid_request", "more than one Host header", path)
    if upgrade and (has_body or method == "CONNECT"):
        return Reject(501, "not_implemented", "llmtap relays HTTP requests: protocol "
                      "upgrades and CONNECT tunnels are not supported", path)
    expect = fields.get(b"expect")
    if expect is not None and expect.strip().lower() != b"100-continue":
        return Reject(417, "expectation_failed",
                      "the only Expect llmtap honours is 100-continue", path)
    return None
