"""What a request says, read three ways, whatever its dialect (OpenAI chat or completions,
Ollama chat or generate, llama.cpp's /completion):

- `last_turn`: what the user asks now, the last user message (or the prompt). The
  classifier's rules read this: a code block the assistant wrote three turns ago says
  nothing about "thanks, and what is 2 + 2?".
- `context`: the rest (system prompt, earlier turns), of which the classifier sees only the
  most recent `limit` characters: "now do it in Rust" needs the turn before it, not the
  whole chat.
- `every_string`: every string anywhere in the body, tool calls and all, for the keep-local
  gate, which must see everything that would leave.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 32  # nesting the gate walks; deeper JSON is read as one string (see below)


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        return "\n".join(p["text"] for p in value
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _prompt(body: dict[str, Any]) -> str:
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            texts = [v for v in value if isinstance(v, str)]
            if texts:
                return texts[-1]
    return ""


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict)]


def last_turn(body: dict[str, Any]) -> str:
    """The last user message, else the prompt."""
    for message in reversed(_messages(body)):
        if message.get("role", "user") == "user":
            return _content(message.get("content"))
    return _prompt(body)


def context(body: dict[str, Any], limit: int) -> str:
    """The last `limit` characters of everything before the last user turn: the system
    prompt and earlier turns (a completions request's `system` and `suffix` too)."""
    parts: list[str] = []
    for key in ("system", "suffix"):
        if isinstance(body.get(key), str):
            parts.append(body[key])
    messages = _messages(body)
    last = next((i for i in range(len(messages) - 1, -1, -1)
                 if messages[i].get("role", "user") == "user"), len(messages))
    parts.extend(_content(m.get("content")) for m in messages[:last])
    text = "\n".join(p for p in parts if p)
    return text[-limit:] if limit > 0 else ""


def prompt_text(body: dict[str, Any]) -> str:
    """Every message's text and the prompt, joined: what the model will read (its length
    bounds the prompt's tokens)."""
    parts: list[str] = []
    for key in ("system", "prompt", "suffix", "input"):
        value = body.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(v for v in value if isinstance(v, str))
    parts.extend(_content(m.get("content")) for m in _messages(body))
    return "\n".join(parts)


def every_string(body: Any) -> str:
    """Every string and number in the body (values, not keys), newline-joined. Deeper than
    MAX_DEPTH, what is left is serialised whole, so nothing escapes the gate."""
    out: list[str] = []
    stack: list[tuple[Any, int]] = [(body, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int | float) or depth >= MAX_DEPTH:
            out.append(repr(value))
        elif isinstance(value, dict):
            stack.extend((v, depth + 1) for v in reversed(list(value.values())))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in reversed(value))
    return "\n".join(out)
