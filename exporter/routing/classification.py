"""A classification: the one fact the classifier hands the decision (its labels and why)."""

from __future__ import annotations

from dataclasses import dataclass

LIGHT = "light"
HEAVY = "heavy"
LOCAL = "local"  # the keep-local gate: never leaves the local fleet


@dataclass(frozen=True, slots=True)
class Classification:
    label: str  # light | heavy | local
    p_heavy: float | None = None  # the model's probability, where a model gave one
    # Why, from a fixed set (a metric label): a keep-local detector (secrets, cards, ibans,
    # emails, phones), a rule (code, reasoning, long_prompt, max_tokens), "model" or
    # "plugin", "rules" (no rule fired, nothing else configured), or the fallback's cause
    # (timeout, error, overloaded).
    reason: str = "rules"
