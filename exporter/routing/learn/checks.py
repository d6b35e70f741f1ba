"""Is an answer right? One checker per kind of verifiable answer.

Small local models ramble ("7 + 5 = 12\n\nThis is a classic example..."), so the checkers read
the answer the way a person would: the number a first line ends on, the word a first line
gives, the first JSON object, the first Python function. Lenient about form, strict about
the fact: a check that passes a wrong answer would teach the classifier that the local model
can do what it cannot.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import unicodedata
from typing import Any

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*", re.UNICODE)
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|\Z)", re.DOTALL)
CODE_TIMEOUT = 5.0  # seconds a candidate function and its asserts may run


def first_line(answer: str) -> str:
    for line in answer.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def answer_number(answer: str) -> float | None:
    """The number an answer gives: the last one of its first line ("7 + 5 = 12"), else the
    first one anywhere."""
    found = _NUMBER.findall(first_line(answer)) or _NUMBER.findall(answer)
    if not found:
        return None
    return _as_number(found[-1] if _NUMBER.findall(first_line(answer)) else found[0])


def check_number(answer: str, expected: float, tolerance: float = 1e-6) -> bool:
    value = answer_number(answer)
    return value is not None and abs(value - expected) <= tolerance * max(1.0, abs(expected))


def _plain(text: str) -> str:
    """Without accents: "Márquez" answers "Marquez"."""
    return "".join(ch for ch in unicodedata.normalize("NFKD", text)
                   if not unicodedata.combining(ch))


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(_plain(text))]


def check_word(answer: str, expected: str) -> bool:
    """The expected word (or words, in order) appears in the first line."""
    want = _words(expected)
    got = _words(first_line(answer))
    return any(got[i:i + len(want)] == want for i in range(len(got) - len(want) + 1))


def check_exact(answer: str, expected: str) -> bool:
    """The first line is the expected text, give or take quotes, case and a final stop."""
    line = first_line(answer).strip().strip("\"'`*").rstrip(".").strip()
    line = re.sub(r"^(?:answer|result|output)\s*:\s*", "", line, flags=re.IGNORECASE)
    return line.strip("\"'`").lower() == expected.lower()


def check_choice(answer: str, expected: str, options: list[str], pick: str = "only") -> bool:
    """Of the options named in the first line: only the expected one ("only"), or it is the
    first named ("19 is larger than 1"), or the last ("The day after Sunday is Monday")."""
    wanted = {o.lower(): o for o in options}
    named = [wanted[w] for w in _words(first_line(answer)) if w in wanted]
    if not named:
        return False
    if pick == "first":
        return named[0] == expected
    if pick == "last":
        return named[-1] == expected
    return set(named) == {expected}


def check_yes_no(answer: str, expected: str) -> bool:
    """A yes/no question answered in words: "yes"/"no" first, else a negation ("83 is not a
    prime number") says no and a plain statement ("79 is a prime number") says yes."""
    words = _words(first_line(answer))
    if not words:
        return False
    if words[0] in ("yes", "no"):
        return words[0] == expected
    negated = any(w in ("not", "isn't", "no", "never") for w in words)
    return ("no" if negated else "yes") == expected


def check_token(answer: str, expected: str) -> bool:
    """The expected text appears as a whole word in the first line, case and all."""
    return expected in _WORD.findall(first_line(answer))


def first_json(answer: str) -> Any:
    start = answer.find("{")
    while start != -1:
        try:
            return json.JSONDecoder().raw_decode(answer[start:])[0]
        except json.JSONDecodeError:
            start = answer.find("{", start + 1)
    return None


def check_json(answer: str, expected: dict[str, Any]) -> bool:
    obj = first_json(answer)
    if not isinstance(obj, dict):
        return False
    for key, value in expected.items():
        got = obj.get(key)
        if isinstance(value, str):
            if not isinstance(got, str) or got.strip().lower() != value.lower():
                return False
        elif got != value:
            return False
    return True


def check_nonempty(answer: str) -> bool:
    """Chit-chat: any answer in words is a right one."""
    return len(_words(answer)) >= 2


def extract_code(answer: str) -> str:
    fenced = _FENCE.findall(answer)
    if fenced:
        return "\n".join(fenced)
    start = answer.find("def ")
    return answer[start:] if start != -1 else ""


def _limits(seconds: int) -> None:  # in the child, before exec: CPU, memory, files, processes
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))
    resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))


def check_code(answer: str, tests: str, timeout: float = CODE_TIMEOUT) -> bool:
    """Run the answer's function and the task's asserts in a separate Python (isolated mode,
    an empty environment, a scratch directory, CPU/memory/file limits and a timeout): the code
    comes from a model and is never run in this process."""
    code = extract_code(answer)
    if not code.strip():
        return False
    with tempfile.TemporaryDirectory(prefix="llmtap-check-") as scratch:
        path = os.path.join(scratch, "candidate.py")
        with open(path, "w") as f:
            f.write(code + "\n\n" + tests + "\nprint('LLMTAP-OK')\n")
        try:
            done = subprocess.run([sys.executable, "-I", "-S", path], cwd=scratch, env={},
                                  capture_output=True, timeout=timeout,
                                  preexec_fn=lambda: _limits(max(1, int(timeout))),
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0 and b"LLMTAP-OK" in done.stdout


def check(answer: str, spec: dict[str, Any]) -> bool:
    """Whether `answer` passes the task's check (`spec` is the task's `check` object)."""
    kind = spec["kind"]
    if kind == "number":
        return check_number(answer, float(spec["expected"]))
    if kind == "word":
        return check_word(answer, str(spec["expected"]))
    if kind == "exact":
        return check_exact(answer, str(spec["expected"]))
    if kind == "choice":
        return check_choice(answer, str(spec["expected"]), list(spec["options"]),
                            str(spec.get("pick", "only")))
    if kind == "yes_no":
        return check_yes_no(answer, str(spec["expected"]))
    if kind == "token":
        return check_token(answer, str(spec["expected"]))
    if kind == "json":
        return check_json(answer, dict(spec["expected"]))
    if kind == "code":
        return check_code(answer, str(spec["tests"]))
    if kind == "nonempty":
        return check_nonempty(answer)
    raise ValueError(f"unknown check kind {kind!r}")
