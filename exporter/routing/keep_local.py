"""The keep-local gate: a request that carries a secret or personal data never leaves the
local fleet, on any route, whatever the classifier says. It is the residency promise kept
for clients who did not think to send `x-llmtap-residency: local`.

Detectors (each can be turned off with the top-level `keep_local` list):
- secrets: API keys and tokens by their published prefixes (OpenAI `sk-`, Anthropic
  `sk-ant-`, AWS access key ids `AKIA`/`ASIA` + 16, GitHub `ghp_`/`gho_`/`ghu_`/`ghs_`/`ghr_`
  + 36 and `github_pat_`, GitLab `glpat-`, Slack `xox?-`, Google `AIza` + 35, Stripe
  `sk_live_`/`rk_live_`, Hugging Face `hf_`), PEM private keys, JWTs, and `password=...`,
  `api_key: ...` assignments;
- cards: 13 to 19 digits (spaces or dashes allowed) starting like a card network's numbers
  (2-6) that pass the Luhn check (ISO/IEC 7812);
- ibans: two letters, two check digits and 11-30 letters or digits whose ISO 13616 mod-97
  check gives 1;
- emails: an address with a dotted domain;
- phones: an international number (+ and 8-15 digits) or a North American one
  (`(555) 123-4567`, `555-123-4567`).

The checks (Luhn, mod 97, the prefixes) are what keep the false alarms down: an order
number, a timestamp or a sum in a maths question is not a card.

Every pattern is linear (no nested quantifiers over the same characters), so a hostile
megabyte of digits costs milliseconds, not minutes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

DETECTORS = ("secrets", "cards", "ibans", "emails", "phones")

_SECRET = re.compile(
    r"\b(?:sk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}|"
    r"gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,}|glpat-[A-Za-z0-9_-]{20,}|"
    r"xox[abposr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|[sr]k_live_[0-9A-Za-z]{16,}|"
    r"hf_[A-Za-z0-9]{30,}|"
    r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})"
    r"|-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"
    r"|(?i:\b(?:api[_-]?key|secret[_-]?key|access[_-]?token|auth[_-]?token|password|passwd|"
    r"client[_-]?secret)\b[\"']?\s*[:=]\s*[\"']?[^\s\"']{8,})")
# Digits with single spaces or dashes between them; the lookarounds keep it from starting or
# ending inside a longer run of digits.
_CARD = re.compile(r"(?<![\d-])[2-6]\d(?:[ -]?\d){11,17}(?![\d])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*"
                    r"\.[A-Za-z]{2,24}\b")
_PHONE = re.compile(r"(?<![\w+])\+\d(?:[ .-]?\(?\d\)?){7,14}(?!\d)"
                    r"|(?<![\d-])\(?\b\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b(?!-)")


def luhn(digits: str) -> bool:
    """The Luhn check digit: from the right, double every second digit (9 off when over 9);
    the sum is a multiple of 10."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35; the number
    mod 97 is 1."""
    iban = text.replace(" ", "")
    if not 15 <= len(iban) <= 34:
        return False
    moved = iban[4:] + iban[:4]
    number = "".join(str(int(ch, 36)) for ch in moved)
    return int(number) % 97 == 1


def _cards(text: str) -> bool:
    for match in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", match.group())
        if 13 <= len(digits) <= 19 and luhn(digits):
            return True
    return False


def _ibans(text: str) -> bool:
    return any(iban_valid(m.group()) for m in _IBAN.finditer(text))


def _phones(text: str) -> bool:
    for match in _PHONE.finditer(text):
        digits = sum(ch.isdigit() for ch in match.group())
        if 8 <= digits <= 15 or (match.group()[0] != "+" and digits == 10):
            return True
    return False


_CHECKS: dict[str, Callable[[str], bool]] = {
    "secrets": lambda text: _SECRET.search(text) is not None,
    "cards": _cards,
    "ibans": _ibans,
    "emails": lambda text: _EMAIL.search(text) is not None,
    "phones": _phones,
}


class KeepLocalGate:
    """Which detectors run; `check(text)` names the first that finds something, or ""."""

    def __init__(self, detectors: Iterable[str] = DETECTORS) -> None:
        unknown = set(detectors) - set(DETECTORS)
        if unknown:
            raise ValueError(f"unknown keep_local detector(s): {', '.join(sorted(unknown))}")
        self.detectors = tuple(d for d in DETECTORS if d in set(detectors))
        self._checks = [(name, _CHECKS[name]) for name in self.detectors]

    def check(self, text: str) -> str:
        for name, found in self._checks:
            if found(text):
                return name
        return ""
