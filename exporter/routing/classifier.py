"""Light or heavy: the ingress step of hybrid routing.

The default is a handful of rules that cost microseconds and need no model: a long prompt, a
large requested output, code in the prompt, or words that ask for step-by-step reasoning make
a request heavy. Anything smarter (an embedding model, a small local classifier) plugs in by
dotted path (`classifier.plugin: package.module:callable`); it is called with the request's
parsed JSON body and its path and returns "light" or "heavy".
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from exporter.config import ConfigError
from exporter.routing.config import ClassifierSpec

LIGHT = "light"
HEAVY = "heavy"

Classify = Callable[[dict[str, Any], str], str]

# A fenced block, or several lines that look like source code.
_CODE = re.compile(
    r"```|^\s*(?:def |class |import |from \S+ import |#include|function |fn |func |public |"
    r"SELECT |CREATE TABLE|for \(|while \()", re.MULTILINE)
_REASONING = re.compile(
    r"\b(?:step[- ]by[- ]step|prove|proof|derive|reason(?:ing)? (?:carefully|through)|"
    r"think (?:carefully|hard|deeply)|analy[sz]e in depth|chain of thought|theorem|"
    r"optimi[sz]e the algorithm|debug)\b", re.IGNORECASE)


def prompt_text(body: dict[str, Any]) -> str:
    """The text a request sends, whatever its dialect (chat messages, prompt, system)."""
    parts: list[str] = []
    for key in ("system", "prompt", "suffix", "input"):
        value = body.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(v for v in value if isinstance(v, str))
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):  # OpenAI content parts
                parts.extend(p["text"] for p in content
                             if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(parts)


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens", "n_predict"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    options = body.get("options")
    if isinstance(options, dict):
        value = options.get("num_predict")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class RuleClassifier:
    def __init__(self, spec: ClassifierSpec) -> None:
        self.spec = spec

    def __call__(self, body: dict[str, Any], path: str) -> str:
        spec = self.spec
        max_tokens = requested_max_tokens(body)
        if max_tokens is not None and max_tokens >= spec.heavy_max_tokens:
            return HEAVY
        text = prompt_text(body)
        if len(text) >= spec.long_prompt_chars:
            return HEAVY
        if spec.code_markers and _CODE.search(text):
            return HEAVY
        if spec.reasoning_markers and _REASONING.search(text):
            return HEAVY
        return LIGHT


def load_classifier(spec: ClassifierSpec) -> Classify:
    """The configured classifier: the rules, or the plugin the spec names."""
    if not spec.plugin:
        return RuleClassifier(spec)
    module_name, sep, attr = spec.plugin.partition(":")
    if not sep:
        module_name, _, attr = spec.plugin.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"classifier.plugin: cannot load {spec.plugin!r}: {exc}") from None
    if not callable(target):
        raise ConfigError(f"classifier.plugin: {spec.plugin!r} is not callable")
    return target


def safe_classify(classify: Classify, body: dict[str, Any], path: str) -> str:
    """A plugin that raises or answers nonsense must not fail the request: local is safe."""
    try:
        label = classify(body, path)
    except Exception:
        return LIGHT
    return HEAVY if label == HEAVY else LIGHT
