"""Model digest pinning: the operator's side of "pin your model digests in production".

A pin says which build of a model must be installed (`llama3.2=sha256:a80c4f17...`; a prefix
of at least 12 hex digits is enough, as with container image ids). Ollama's model list
carries each model's digest; when the installed one differs from the pin, llmtap says so
(`llmtap_model_digest_mismatch` = 1 and a warning) and, with --enforce-pins, refuses to
serve that model rather than silently serving a different one.
"""

from __future__ import annotations

from exporter import linefile
from exporter.models import tagged

MIN_DIGEST_PREFIX = 12


def _canonical_digest(digest: str) -> str:
    return digest.strip().lower().removeprefix("sha256:")


def parse_pin(text: str) -> tuple[str, str]:
    model, sep, digest = text.partition("=")
    digest = _canonical_digest(digest)
    if not sep or not model.strip():
        raise ValueError(f"expected MODEL=DIGEST, got {text!r}")
    if len(digest) < MIN_DIGEST_PREFIX or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"the digest in {text!r} must be at least {MIN_DIGEST_PREFIX} hex "
                         "digits (as `ollama list` or /api/tags show it)")
    return tagged(model.strip()), digest


def parse_pins(items: tuple[str, ...]) -> dict[str, str]:
    return dict(parse_pin(item) for item in items)


def load_pin_file(path: str) -> dict[str, str]:
    """One `MODEL=DIGEST` per line; blank lines and `#` comments are ignored."""
    pins: dict[str, str] = {}
    for number, line in linefile.entries(path):
        try:
            model, digest = parse_pin(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        pins[model] = digest
    return pins


def digest_matches(installed: str, pinned: str) -> bool:
    return bool(installed) and _canonical_digest(installed).startswith(pinned)


def mismatched(pins: dict[str, str], installed: dict[str, str]) -> set[str]:
    """Pinned models whose installed digest differs; a pinned model that is not installed
    at all is not the pinned build either."""
    return {model for model, digest in pins.items()
            if not digest_matches(installed.get(model, ""), digest)}
