"""API keys on the proxy port: optional, named, stored hashed, compared in constant time.

Ollama has no authentication of its own. With `--api-key-file`, llmtap admits only requests
that carry one of the listed keys (`Authorization: Bearer KEY` or `x-api-key: KEY`), strips
the key before forwarding, and names the key in the access log. The file holds no keys, only
their SHA-256 — keys are random 256-bit strings (`llmtap key NAME` makes one), so a fast hash
is enough and a leaked file admits no one.

Every check hashes what the client sent and compares that digest with every stored one using
`hmac.compare_digest`, so the time taken depends neither on how much of a key was right nor on
which key matched.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from exporter import linefile

KEY_HEADERS = (b"authorization", b"x-api-key")


@dataclass(frozen=True)
class Admitted:
    name: str  # the key's name, for the access log
    headers: frozenset[bytes]  # every header that carried a valid key: none is forwarded


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def new_key() -> str:
    return "llmtap-" + secrets.token_urlsafe(32)


def key_file_line(name: str, key: str) -> str:
    return f"{name} sha256:{digest(key).hex()}"


class ApiKeys:
    def __init__(self, entries: dict[str, bytes]) -> None:
        if not entries:
            raise ValueError("the API key file lists no keys")
        self._entries = list(entries.items())

    @classmethod
    def load(cls, path: str) -> ApiKeys:
        """`NAME sha256:HEX` per line; blank lines and `#` comments are ignored."""
        entries: dict[str, bytes] = {}
        for number, line in linefile.entries(path):
            name, _, hashed = line.partition(" ")
            hex_digest = hashed.strip().removeprefix("sha256:")
            try:
                raw = bytes.fromhex(hex_digest)
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise ValueError(f"{path}:{number}: expected `NAME sha256:<64 hex digits>` "
                                 "(make one with `llmtap key NAME`)")
            if name in entries:
                raise ValueError(f"{path}:{number}: key name {name!r} appears twice")
            entries[name] = raw
        return cls(entries)

    def names(self) -> list[str]:
        return [name for name, _ in self._entries]

    def check(self, fields: Mapping[bytes, bytes]) -> Admitted | None:
        """The key a request presents, from its lower-case header fields; None if no header
        carries a valid one. Both headers are checked, so a valid key is never forwarded."""
        admitted: str | None = None
        carrying: list[bytes] = []
        for header in KEY_HEADERS:
            value = fields.get(header)
            if value is None:
                continue
            if header == b"authorization":
                scheme, _, value = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    continue
            name = self._match(value.strip())
            if name is not None:
                admitted = admitted or name
                carrying.append(header)
        return Admitted(admitted, frozenset(carrying)) if admitted is not None else None

    def _match(self, presented_key: bytes) -> str | None:
        presented = hashlib.sha256(presented_key).digest()
        matched = None
        for name, stored in self._entries:  # no early exit: same work whichever matches
            if hmac.compare_digest(presented, stored):
                matched = name
        return matched
