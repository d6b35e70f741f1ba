"""HTTP/1.1 wire helpers shared by llmtap's server side and client side.

Headers travel as they were received: a list of (name, value) byte pairs in wire order, names
in their original case. Hop-by-hop fields (RFC 9110 §7.6.1) belong to one connection and are
never forwarded; everything else is end to end.
"""

from __future__ import annotations

import http

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 hop-by-hop fields, plus the legacy ones proxies still meet. Expect is
# answered by llmtap's own server; forwarding it would make the upstream wait for a 100.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authorization", b"proxy-authenticate",
    b"expect",
})
CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}


def _tokens(value: bytes) -> set[bytes]:
    return {token.strip().lower() for token in value.split(b",")}


CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close", b""})  # tokens naming no field


def end_to_end(headers: Headers, also_drop: frozenset[bytes] = frozenset()) -> Headers:
    """The headers minus hop-by-hop ones, minus the fields the Connection header names (RFC
    9110 §7.6.1), minus `also_drop` (lower-case names). One pass: a Connection header that
    names fields (it rarely does) costs a second."""
    kept: Headers = []
    named: set[bytes] | None = None
    for pair in headers:
        lower = pair[0].lower()
        if lower in HOP_BY_HOP:
            if lower == b"connection":
                named = _tokens(pair[1]) if named is None else named | _tokens(pair[1])
        elif lower not in also_drop:
            kept.append(pair)
    if named is not None and not named <= CONNECTION_OPTIONS:
        kept = [pair for pair in kept if pair[0].lower() not in named]
    return kept


def response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, b"Unknown"))]
    lines += [b"%s: %s\r\n" % pair for pair in headers]
    lines.append(CRLF)
    return b"".join(lines)


def request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
    lines += [b"%s: %s\r\n" % pair for pair in headers]
    lines.append(CRLF)
    return b"".join(lines)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)
