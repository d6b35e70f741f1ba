"""The learned classifier: logistic regression, p(heavy) for a request.

Features (the same at training and at serving, `rows()`), in up to four blocks, the model
file saying which it uses: `cues`, counts of what the last user turn asks for that a small
model does badly or well (`CUES`: computation, symbol-level string work, dates, order,
steps, number theory, an output format, code; chit-chat, recall, an answer given in the
text); `scalars`, a few numbers (lengths, how many numbers and how long they are);
`last`, the embedding of the last user turn (its first `last_turn_chars` characters);
`context`, the embedding of the most recent `context_chars` of context (system prompt,
earlier turns). A model without the embedding blocks loads no embedding model.
heavy = p(heavy) >= threshold. Where the threshold lies comes from the route's target
(`Target`: a raw `threshold`, a `cloud_share`, or a `quality` to reach), turned into a
threshold when the model is loaded, from the calibration the model file carries: for each
cloud share from 0 to 1, the p(heavy) above which that share of the training tasks lies,
and the quality that share reached on task families held out of the fit. Without a
target: the model's own threshold (the least cloud share that reached 95% quality there).

The model file (JSON, a few KB) holds the weights, with the standardisation folded in, and
says what it was trained against: the embedder, the local model whose answers gave the
labels, the tasks. `builtin` is the one shipped beside this module, trained against
SmolLM2-135M on llama-server: retrain it against your own model (docs/routing.md).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.config import ConfigError
from exporter.routing.classification import HEAVY, LIGHT, Classification
from exporter.routing.config import ClassifierSpec, Target
from exporter.routing.embedding import Embedder, NoEmbedder, make_embedder
from exporter.routing.threads import Threads
from exporter.routing.turns import context, last_turn, prompt_text

FORMAT = "llmtap-classifier/1"
BUILTIN = Path(__file__).with_name("heavy_model.json")
_NUMBER = re.compile(r"\d+")
SCALARS = ("log_last_chars", "log_prompt_chars", "log_numbers", "longest_number",
           "log_messages", "symbol_share")


@dataclass(frozen=True)
class TextSpec:
    last_turn_chars: int = 1000
    context_chars: int = 300


def texts(body: dict[str, Any], spec: TextSpec) -> tuple[str, str]:
    return last_turn(body)[:spec.last_turn_chars], context(body, spec.context_chars)


def scalars(body: dict[str, Any]) -> np.ndarray:
    turn = last_turn(body)
    numbers = _NUMBER.findall(turn)
    messages = body.get("messages")
    count = len(messages) if isinstance(messages, list) else 1
    symbols = sum(not (ch.isalnum() or ch.isspace()) for ch in turn)
    return np.array([math.log1p(len(turn)), math.log1p(len(prompt_text(body))),
                     math.log1p(len(numbers)), max((len(n) for n in numbers), default=0) / 4,
                     math.log1p(count), symbols / max(1, len(turn))], dtype=np.float32)


def _words(*patterns: str) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(patterns) + r")\b", re.IGNORECASE)


# Cues of what a small model cannot do, whatever the task: exact computation, symbol-level
# string work, dates, order, several steps, an output format, code; and of what it can:
# chit-chat, recall, reading an answer off the given text. Each is a count (log1p) in the
# last turn. The word lists were written from the task kinds the first eleven families
# stand for (the second twelve are the benchmark's second batch: words only they would
# suggest were left out; the ten of the blind batch came after the lists), so they are a
# prior the fit weighs, not rules.
CUES: dict[str, re.Pattern[str]] = {
    "compute": _words(r"sum", r"add(?:s|ed)?", r"total", r"subtract\w*", r"minus",
                      r"multipl\w*", r"times", r"divid\w*", r"product", r"percent\w*", r"average",
                      r"calculat\w*", r"compute", r"work out", r"convert\w*", r"how many",
                      r"how much", r"count\w*", r"solve", r"equals?", r"remainder"),
    "symbols": _words(r"letters?", r"characters?", r"spell\w*", r"backwards?", r"revers\w*",
                      r"upper ?case", r"lower ?case", r"capital letters", r"vowels?",
                      r"consonants?", r"anagram", r"palindrome"),
    "time": _words(r"monday", r"tuesday", r"wednesday", r"thursday", r"friday", r"saturday",
                   r"sunday", r"january", r"february", r"march", r"april", r"june", r"july",
                   r"august", r"september", r"october", r"november", r"december", r"days?",
                   r"weeks?", r"months?", r"years?", r"hours?", r"minutes?", r"seconds?",
                   r"today", r"tomorrow", r"yesterday", r"ago", r"from now", r"o'clock"),
    "order": _words(r"after", r"before", r"next", r"previous", r"sequence", r"continue",
                    r"pattern", r"larger", r"smaller", r"bigger", r"first", r"last"),
    "steps": _words(r"then", r"each", r"per", r"half", r"twice", r"left", r"remaining",
                    r"altogether", r"together", r"in total", r"respectively", r"if", r"else",
                    r"otherwise", r"back", r"more", r"fewer", r"less"),
    "number_theory": _words(r"primes?", r"divisible", r"even", r"odd", r"squares?", r"cubes?",
                            r"factors?", r"multiples?", r"digits?", r"fractions?", r"decimals?"),
    "format": _words(r"json", r"keys?", r"yaml", r"csv", r"table", r"format\w*", r"fields?",
                     r"integer", r"boolean", r"true", r"false", r"schema", r"array", r"list"),
    "code": _words(r"python", r"functions?", r"def", r"returns?", r"implement\w*", r"code",
                   r"script", r"program", r"algorithm", r"regex", r"sql", r"javascript"),
    "social": _words(r"hi", r"hello", r"hey", r"thanks?", r"thank you",
                     r"good (?:morning|night|evening)", r"how are you", r"joke", r"bored",
                     r"luck", r"nice", r"who are you", r"what's up", r"ideas?", r"tell me",
                     r"say something"),
    "recall": _words(r"who", r"capital", r"wrote", r"author", r"name the", r"symbol",
                     r"invented", r"discovered", r"where is", r"which country"),
    "given": _words(r"text", r"sentence", r"passage", r"paragraph", r"from the",
                    r"according to", r"above", r"below", r"record", r"given", r"following"),
    "only": _words(r"only", r"just", r"exactly", r"one word", r"no explanation"),
}
_OPERATION = re.compile(r"\d\s*(?:[-+*/\u00d7\u00f7^%x]|plus|minus|times|divided by|"
                        r"multiplied by)\s*\d", re.IGNORECASE)
_QUOTED = re.compile("[\"'\u201c\u2018]([^\"'\u201d\u2019\n]{1,40})[\"'\u201d\u2019]")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
CUE_NAMES = ("log_digits", "operations", "decimals", "quoted", "questions", "sentences",
             *(f"cue_{name}" for name in CUES))


def cues(body: dict[str, Any]) -> np.ndarray:
    """What the last turn asks for, in counts that mean the same in any task."""
    turn = last_turn(body)[:4000]
    numbers = _NUMBER.findall(turn)
    counts = [sum(len(n) for n in numbers), len(_OPERATION.findall(turn)),
              len(re.findall(r"\d[.,]\d", turn)), len(_QUOTED.findall(turn)),
              turn.count("?"), len(_SENTENCE_END.findall(turn))]
    counts += [len(pattern.findall(turn)) for pattern in CUES.values()]
    return np.log1p(np.array(counts, dtype=np.float32))


BLOCKS = ("last", "context", "scalars", "cues")  # what a row may hold, in this order


def block_sizes(dim: int) -> dict[str, int]:
    """How many features each block holds, with `dim`-wide embeddings."""
    return {"last": dim, "context": dim, "scalars": len(SCALARS), "cues": len(CUE_NAMES)}


def rows(bodies: list[dict[str, Any]], vectors: np.ndarray,
         blocks: tuple[str, ...]) -> np.ndarray:
    """Feature rows for bodies whose texts were embedded as [last turns..., contexts...]."""
    n = len(bodies)
    numbers = np.stack([scalars(b) for b in bodies]) if n else \
        np.zeros((0, len(SCALARS)), dtype=np.float32)
    cue_rows = np.stack([cues(b) for b in bodies]) if n else \
        np.zeros((0, len(CUE_NAMES)), dtype=np.float32)
    return features(vectors[:n], vectors[n:2 * n], numbers, cue_rows, blocks)


def features(last: np.ndarray, ctx: np.ndarray, numbers: np.ndarray,
             cue_rows: np.ndarray | None = None,
             blocks: tuple[str, ...] = ("last", "context", "scalars")) -> np.ndarray:
    """One row per request: the blocks a model uses, of [last-turn embedding | context
    embedding | scalars | cues]."""
    parts = {"last": last, "context": ctx, "scalars": numbers, "cues": cue_rows}
    chosen = [parts[b] for b in BLOCKS if b in blocks]
    if any(part is None for part in chosen):
        raise ValueError(f"features: blocks {blocks} need every part")
    return np.concatenate(chosen, axis=-1)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Calibration:
    """shares[i] of the requests have p(heavy) >= thresholds[i]; sending them to the cloud
    gave quality[i]. Shares rise from 0 to 1, thresholds fall, quality rises."""

    shares: tuple[float, ...]
    thresholds: tuple[float, ...]
    quality: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.shares)
        if n < 2 or len(self.thresholds) != n or len(self.quality) != n:
            raise ValueError("calibration: shares, thresholds and quality need one value "
                             "each, two at least")
        if any(b < a for a, b in zip(self.shares, self.shares[1:], strict=False)) or \
                any(b > a for a, b in zip(self.thresholds, self.thresholds[1:], strict=False)):
            raise ValueError("calibration: shares must rise and thresholds fall")

    def for_share(self, share: float) -> float:
        """The threshold that sends `share` of the requests to the cloud."""
        if share <= 0:
            return math.inf  # nothing is heavy
        if share >= 1:
            return 0.0  # everything is
        return float(np.interp(share, self.shares, self.thresholds))

    def share_for_quality(self, quality: float) -> float:
        """The least cloud share whose quality reached `quality` (1 when none did)."""
        q = self.quality
        for i, value in enumerate(q):
            if value >= quality:
                if i == 0 or value == q[i - 1]:
                    return self.shares[i]
                s0, s1 = self.shares[i - 1], self.shares[i]
                return s0 + (s1 - s0) * (quality - q[i - 1]) / (value - q[i - 1])
        return 1.0

    def threshold(self, target: Target) -> float:
        if target.kind == "threshold":
            return target.value
        if target.kind == "cloud_share":
            return self.for_share(target.value)
        return self.for_share(self.share_for_quality(target.value))

    def to_json(self) -> dict[str, Any]:
        return {"shares": [round(x, 4) for x in self.shares],
                "thresholds": [float(f"{x:.5g}") for x in self.thresholds],
                "quality": [round(x, 4) for x in self.quality]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        return cls(tuple(float(x) for x in data["shares"]),
                   tuple(float(x) for x in data["thresholds"]),
                   tuple(float(x) for x in data["quality"]))


@dataclass
class Model:
    weights: np.ndarray
    bias: float
    threshold: float
    embedder: dict[str, Any]
    text: TextSpec = field(default_factory=TextSpec)
    meta: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None
    blocks: tuple[str, ...] = ("last", "context", "scalars")  # of BLOCKS

    def width(self, dim: int) -> int:
        """The number of features a row of this model has, with `dim`-wide embeddings."""
        sizes = block_sizes(dim)
        return sum(sizes[b] for b in self.blocks)

    def threshold_for(self, target: Target | None) -> float:
        """The p(heavy) cut for a route's target (None: the model's own)."""
        if target is None:
            return self.threshold
        if target.kind == "threshold":
            return target.value
        if self.calibration is None:
            raise ConfigError(f"{target.kind}: this model file has no calibration (train it "
                              "again with this llmtap), so only a threshold can be given")
        return self.calibration.threshold(target)

    def p_heavy(self, rows: np.ndarray) -> np.ndarray:
        z = rows @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "embedder": self.embedder, "blocks": list(self.blocks),
                "text": {"last_turn_chars": self.text.last_turn_chars,
                         "context_chars": self.text.context_chars},
                "scalars": list(SCALARS), "cues": list(CUE_NAMES),
                "threshold": round(self.threshold, 4),
                "bias": round(float(self.bias), 5),
                # 4 significant digits: the file stays a few KB; p moves < 1e-3.
                "weights": [float(f"{w:.4g}") for w in self.weights],
                **({"calibration": self.calibration.to_json()} if self.calibration else {}),
                **self.meta}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Model:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} model file (format {data.get('format')!r})")
        blocks = tuple(data.get("blocks", ("last", "context", "scalars")))
        if not blocks or any(b not in BLOCKS for b in blocks):
            raise ValueError(f"blocks: expected some of {', '.join(BLOCKS)}, got {blocks}")
        if "scalars" in blocks and list(data.get("scalars", [])) != list(SCALARS):
            raise ValueError("the model's scalar features are not this llmtap's")
        if "cues" in blocks and list(data.get("cues", [])) != list(CUE_NAMES):
            raise ValueError("the model's cue features are not this llmtap's: train it again")
        text = data.get("text", {})
        meta = {k: v for k, v in data.items() if k not in
                ("format", "embedder", "text", "scalars", "threshold", "bias", "weights",
                 "calibration", "blocks", "cues")}
        calibration = Calibration.from_json(data["calibration"]) \
            if data.get("calibration") is not None else None
        return cls(np.asarray(data["weights"], dtype=np.float32), float(data["bias"]),
                   float(data["threshold"]), dict(data["embedder"]),
                   TextSpec(int(text.get("last_turn_chars", 1000)),
                            int(text.get("context_chars", 300))), meta, calibration, blocks)


def load_model(path: str | Path) -> Model:
    where = BUILTIN if str(path) == "builtin" else Path(path)
    try:
        return Model.from_json(json.loads(where.read_text()))
    except OSError as exc:
        raise ConfigError(f"classifier.model: cannot read {where}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"classifier.model: {where}: {exc}") from None


class LearnedClassifier:
    def __init__(self, model: Model, embedder: Embedder, target: Target | None = None) -> None:
        self.model = model
        self.embedder = embedder
        self.threshold = model.threshold_for(target)
        self.needs_text = "last" in model.blocks or "context" in model.blocks
        if embedder.dim and model.weights.shape[0] != model.width(embedder.dim):
            raise ConfigError(f"classifier.model: its weights do not fit {embedder.dim}-dim "
                              "embeddings")

    @classmethod
    def from_spec(cls, spec: ClassifierSpec, threads: Threads) -> LearnedClassifier:
        model = load_model(spec.model)
        embedder: Embedder = NoEmbedder()  # a model of cues and scalars reads no embedding
        if {"last", "context"} & set(model.blocks):
            try:
                embedder = make_embedder(model.embedder, spec.embeddings_url,
                                         spec.embeddings_model, threads)
            except (ValueError, ImportError) as exc:
                raise ConfigError(f"classifier.model: {exc}") from None
        try:
            return cls(model, embedder, spec.target)
        except ConfigError as exc:
            raise ConfigError(f"classifier.{exc}") from None

    def threshold_for(self, target: Target | None) -> float:
        return self.threshold if target is None else self.model.threshold_for(target)

    def rows(self, bodies: list[dict[str, Any]], vectors: np.ndarray) -> np.ndarray:
        return rows(bodies, vectors, self.model.blocks)

    async def classify(self, body: dict[str, Any], path: str) -> Classification:
        if self.needs_text:
            last, ctx = texts(body, self.model.text)
            vectors = await self.embedder.embed([last, ctx])
        else:  # cues and scalars only: a few regexes over a bounded last turn, no embedding
            vectors = np.zeros((2, 0), dtype=np.float32)
        p = float(self.model.p_heavy(self.rows([body], vectors))[0])
        return Classification(HEAVY if p >= self.threshold else LIGHT, round(p, 4), "model")

    async def close(self) -> None:
        await self.embedder.close()

    def p_heavy_many(self, bodies: list[dict[str, Any]]) -> np.ndarray:
        """Synchronously, for the benchmark and training."""
        pairs = [texts(b, self.model.text) for b in bodies]
        vectors = self.embedder.embed_many([p[0] for p in pairs] + [p[1] for p in pairs])
        return self.model.p_heavy(self.rows(bodies, vectors))
