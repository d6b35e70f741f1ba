"""Operator-written line files (API keys, pins): one entry a line, `#` comments, clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def entries(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line with its comment removed.

    Raises ValueError naming the file when it cannot be read.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            yield number, line
