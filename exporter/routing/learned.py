"""The learned classifier: logistic regression over text embeddings, p(heavy) for a request.

Features (the same at training and at serving, `features()`): the embedding of the last
user turn (its first `last_turn_chars` characters), the embedding of the most recent
`context_chars` of context (system prompt, earlier turns), and a few numbers a request's
difficulty shows in besides its words (lengths, how many numbers and how long they are).
heavy = p(heavy) >= threshold; the model file carries its threshold, chosen at training,
and `classifier.threshold` overrides it (higher: fewer requests to the cloud).

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
from exporter.routing.config import ClassifierSpec
from exporter.routing.embedding import Embedder, make_embedder
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


def features(last: np.ndarray, ctx: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """One row per request: [last-turn embedding | context embedding | scalars]."""
    return np.concatenate([last, ctx, numbers], axis=-1)


@dataclass
class Model:
    weights: np.ndarray
    bias: float
    threshold: float
    embedder: dict[str, Any]
    text: TextSpec = field(default_factory=TextSpec)
    meta: dict[str, Any] = field(default_factory=dict)

    def p_heavy(self, rows: np.ndarray) -> np.ndarray:
        z = rows @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "embedder": self.embedder,
                "text": {"last_turn_chars": self.text.last_turn_chars,
                         "context_chars": self.text.context_chars},
                "scalars": list(SCALARS), "threshold": round(self.threshold, 4),
                "bias": round(float(self.bias), 5),
                # 4 significant digits: the file stays a few KB; p moves < 1e-3.
                "weights": [float(f"{w:.4g}") for w in self.weights], **self.meta}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Model:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} model file (format {data.get('format')!r})")
        if list(data.get("scalars", [])) != list(SCALARS):
            raise ValueError("the model's scalar features are not this llmtap's")
        text = data.get("text", {})
        meta = {k: v for k, v in data.items() if k not in
                ("format", "embedder", "text", "scalars", "threshold", "bias", "weights")}
        return cls(np.asarray(data["weights"], dtype=np.float32), float(data["bias"]),
                   float(data["threshold"]), dict(data["embedder"]),
                   TextSpec(int(text.get("last_turn_chars", 1000)),
                            int(text.get("context_chars", 300))), meta)


def load_model(path: str | Path) -> Model:
    where = BUILTIN if str(path) == "builtin" else Path(path)
    try:
        return Model.from_json(json.loads(where.read_text()))
    except OSError as exc:
        raise ConfigError(f"classifier.model: cannot read {where}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"classifier.model: {where}: {exc}") from None


class LearnedClassifier:
    def __init__(self, model: Model, embedder: Embedder, threshold: float | None = None) -> None:
        self.model = model
        self.embedder = embedder
        self.threshold = model.threshold if threshold is None else threshold
        expected = model.weights.shape[0] - 2 * embedder.dim - len(SCALARS)
        if embedder.dim and expected != 0:
            raise ConfigError(f"classifier.model: its weights do not fit {embedder.dim}-dim "
                              "embeddings")

    @classmethod
    def from_spec(cls, spec: ClassifierSpec, threads: Threads) -> LearnedClassifier:
        model = load_model(spec.model)
        try:
            embedder = make_embedder(model.embedder, spec.embeddings_url,
                                     spec.embeddings_model, threads)
        except (ValueError, ImportError) as exc:
            raise ConfigError(f"classifier.model: {exc}") from None
        return cls(model, embedder, spec.threshold)

    def rows(self, bodies: list[dict[str, Any]], vectors: np.ndarray) -> np.ndarray:
        n = len(bodies)
        numbers = np.stack([scalars(b) for b in bodies]) if bodies else \
            np.zeros((0, len(SCALARS)), dtype=np.float32)
        return features(vectors[:n], vectors[n:], numbers)

    async def classify(self, body: dict[str, Any], path: str) -> Classification:
        last, ctx = texts(body, self.model.text)
        vectors = await self.embedder.embed([last, ctx])
        p = float(self.model.p_heavy(self.rows([body], vectors))[0])
        return Classification(HEAVY if p >= self.threshold else LIGHT, round(p, 4), "model")

    async def close(self) -> None:
        await self.embedder.close()

    def p_heavy_many(self, bodies: list[dict[str, Any]]) -> np.ndarray:
        """Synchronously, for the benchmark and training."""
        pairs = [texts(b, self.model.text) for b in bodies]
        vectors = self.embedder.embed_many([p[0] for p in pairs] + [p[1] for p in pairs])
        return self.model.p_heavy(self.rows(bodies, vectors))
