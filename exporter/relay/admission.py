"""Admission: the short list of checks a request passes before it is relayed.

Each check returns a `Refusal` (status, the dialect's error kind, message, outcome) or None.
The head checks run as soon as the request head is in, before any `100 Continue` and before
a body byte is read: the API key first (a request without one costs a hash and reaches
nothing: no upstream, no metric series, no log line), then the declared body length and the
request target. The model checks run once the body has named the model: a pinned model whose
digest changed, then the waiting limit.

The target must be a path, sent plainly where it names an endpoint llmtap observes: the
model servers route on the decoded, normalised path (gin, cpp-httplib, uvicorn), so
`/api/%63hat` or `/v1/./chat/completions` would reach the chat handler unobserved, past the
waiting limit and the pins.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote

from exporter.auth import KEY_HEADERS, Admitted, ApiKeys
from exporter.protocols import ENDPOINTS
from exporter.record import Outcome
from exporter.relay.http1 import Headers
from exporter.relay.outcome import Refusal
from exporter.state import LiveState

MISSING_KEY = Refusal(401, "invalid_api_key", "a valid API key is required "
                      "(Authorization: Bearer KEY or x-api-key: KEY)")
REPEATED_KEY = Refusal(400, "invalid_request", "send one API key header, once")
NOT_ORIGIN_FORM = Refusal(400, "invalid_request", "llmtap takes origin-form request targets "
                          "(a path such as /api/chat), not absolute URLs: it is a reverse "
                          "proxy, not a forward one")
FRAGMENT = Refusal(400, "invalid_request", "a request target has no #fragment")
# Until the upstream's model list is read no name is known to be a pinned model (and none
# is checked), so with --enforce-pins every request waits for it: a moment at start.
PINS_UNCHECKED = Refusal(503, "model_pin_unchecked", "llmtap has not read the upstream's "
                         "model list yet, so no pinned digest is checked (--enforce-pins); "
                         "retry in a moment", retry_after=1)


def target_refusal(target: bytes, path: str) -> Refusal | None:
    """A target that is not a plain path, or that names an observed endpoint in disguise."""
    if not target.startswith(b"/"):
        return NOT_ORIGIN_FORM
    if b"#" in target:
        return FRAGMENT
    if "%" in path or "//" in path or "/." in path:
        plain = posixpath.normpath(unquote(path))
        if plain in ENDPOINTS and plain != path:
            return Refusal(400, "invalid_request", f"send this endpoint's path as {plain}, "
                           "without percent-encoding or dot segments")
    return None


class Pins(Protocol):
    """The pinned digests as the upstream's model list shows them (--enforce-pins)."""

    def pins_unchecked(self) -> bool:
        """No model list read yet: no request can be known to be for an unpinned build."""

    def refuses(self, label: str) -> str | None:
        """Why this model must not be served (None: serve it)."""


@dataclass
class Admission:
    max_body_bytes: int = 64 << 20
    keys: ApiKeys | None = None
    on_rejected: Callable[[], None] | None = None  # counts refused keys
    pins: Pins | None = None
    live: LiveState | None = None
    max_waiting_per_model: int = 0  # 0: no limit

    def key(self, fields: dict[bytes, bytes], headers: Headers
            ) -> tuple[Admitted | None, Refusal | None]:
        if self.keys is None:
            return None, None
        names = [name.lower() for name, _ in headers]
        if any(names.count(header) > 1 for header in KEY_HEADERS):
            # Repeated, their values are joined and match nothing, so a valid key in one of
            # them would be forwarded: there is one key per request.
            if self.on_rejected is not None:
                self.on_rejected()
            return None, REPEATED_KEY
        admitted = self.keys.check(fields)
        if admitted is None:
            if self.on_rejected is not None:
                self.on_rejected()
            return None, MISSING_KEY
        return admitted, None

    def body_length(self, length: int | None) -> Refusal | None:
        if length is not None and length > self.max_body_bytes:
            return self.too_large()
        return None

    def too_large(self) -> Refusal:
        return Refusal(413, "request_too_large", f"the request body is larger than "
                       f"{self.max_body_bytes} bytes (llmtap --max-body-bytes)")

    def model(self, label: str) -> Refusal | None:
        """After the request counts as started for `label` (so the count includes it)."""
        if self.pins is not None:
            if self.pins.pins_unchecked():
                return PINS_UNCHECKED
            if (why := self.pins.refuses(label)) is not None:
                return Refusal(409, "model_pin_mismatch", why)
        if self.max_waiting_per_model and self.live is not None:
            waiting = self.live.models[label].waiting
            if waiting > self.max_waiting_per_model:
                return Refusal(503, "queue_full", f"{waiting - 1} requests for this model are "
                               "already waiting at llmtap (--max-waiting-per-model); retry "
                               "later", Outcome.QUEUE_FULL, retry_after=1)
        return None
