"""The classifier's rules: a few signals that cost microseconds and need no model, read from
the last user turn (exporter/routing/turns.py), not from the whole chat.

Heavy when:
- the last turn contains code (a fenced block, lines that start like source code): code
  review and debugging are where small models fail. An earlier assistant turn's code block
  does not count: "thanks!" after a snippet is chit-chat;
- the last turn asks for work that needs reasoning: "prove that", "step by step", "derive",
  "think carefully", "design a ...", "implement a ...", "optimize", "debug", "refactor", or
  names a hard topic (lock-free, wait-free, concurrency, distributed consensus, formal
  verification, NP-hard). A word alone is not a request: "Who proved Fermat's last
  theorem?" is a lookup (the old rules made every "theorem" and "proof" heavy);
- the whole prompt is at least `long_prompt_chars` long: a long context is what a small
  local model's window and attention handle worst, whatever the question;
- `heavy_max_tokens` is set and the request asks at least that many output tokens. Off by
  default: clients send `max_tokens: 4096` as a blanket cap (SDK defaults, gateways), so a
  cap says nothing about what the request needs ("hi" with max_tokens 4096 is "hi").

Otherwise the rules have no opinion: the learned model (if configured) decides, else light.
"""

from __future__ import annotations

import re
from typing import Any

from exporter.routing.config import ClassifierSpec
from exporter.routing.turns import last_turn, prompt_text

# A fenced block, or a line that looks like source code.
CODE = re.compile(
    r"```|^\s*(?:def |class |import |from \S+ import |#include|function |fn |func |public |"
    r"SELECT |CREATE TABLE|for \(|while \()", re.MULTILINE)
REASONING = re.compile(
    r"\b(?:step[- ]by[- ]step|(?:can you |please )?prove (?:that|it|this|the)|"
    r"(?:give|write|sketch|construct|find) (?:me )?(?:a |an |the )?(?:formal |rigorous )?proof|"
    r"derive|reason (?:carefully|through)|think (?:carefully|hard|deeply|step)|"
    r"analy[sz]e (?:in depth|carefully|the trade-?offs)|chain of thought|"
    r"(?:design|architect|implement) (?:a|an|the|me a)\b|optimi[sz]e|debug|refactor|"
    r"lock-free|wait-free|race condition|deadlock|distributed consensus|"
    r"formal(?:ly)? verif\w*|np-hard|np-complete|time complexity)\b",
    re.IGNORECASE)


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


class Rules:
    def __init__(self, spec: ClassifierSpec) -> None:
        self.spec = spec

    def __call__(self, body: dict[str, Any]) -> str:
        """The rule that makes the request heavy ("code", "reasoning", "long_prompt",
        "max_tokens"), or "" when none does."""
        spec = self.spec
        turn = last_turn(body)
        if spec.code_markers and CODE.search(turn):
            return "code"
        if spec.reasoning_markers and REASONING.search(turn):
            return "reasoning"
        if len(turn) >= spec.long_prompt_chars or (
                len(prompt_text(body)) >= spec.long_prompt_chars):
            return "long_prompt"
        if spec.heavy_max_tokens and (asked := requested_max_tokens(body)) is not None \
                and asked >= spec.heavy_max_tokens:
            return "max_tokens"
        return ""
