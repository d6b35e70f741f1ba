"""Fitting the learned classifier: L2-regularised logistic regression (Newton's method, a few
hundred features, numpy only), its regularisation and threshold chosen by cross-validation
over task families, so that the numbers say how it does on kinds of request it never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from exporter.routing.embedding import Embedder
from exporter.routing.learn.curve import curve, quality_at, share_for
from exporter.routing.learned import SCALARS, Model, TextSpec, features, scalars, texts

L2_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)  # penalty on the standardised weights, per sample sum
TARGET_QUALITY = 0.95  # the shipped threshold: the least cloud share that reaches this


def design(bodies: Sequence[dict[str, Any]], embedder: Embedder,
           spec: TextSpec) -> np.ndarray:
    pairs = [texts(b, spec) for b in bodies]
    vectors = embedder.embed_many([p[0] for p in pairs] + [p[1] for p in pairs])
    n = len(bodies)
    numbers = np.stack([scalars(b) for b in bodies]) if n else \
        np.zeros((0, len(SCALARS)), dtype=np.float32)
    return features(vectors[:n], vectors[n:], numbers).astype(np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float,
                 iterations: int = 25) -> tuple[np.ndarray, float]:
    """Weights and bias on the raw features (standardisation folded in). y = 1: heavy."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    z = (x - mean) / scale
    n, d = z.shape
    a = np.hstack([z, np.ones((n, 1))])
    w = np.zeros(d + 1)
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0  # the bias is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -40, 40)))
        gradient = a.T @ (p - y) + penalty * w
        hessian = (a * (p * (1 - p))[:, None]).T @ a + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.max(np.abs(step)) < 1e-6:
            break
    weights = w[:-1] / scale
    bias = float(w[-1] - (w[:-1] * mean / scale).sum())
    return weights, bias


def predict(x: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x @ weights + bias, -40, 40)))


def by_family(x: np.ndarray, y: np.ndarray, families: Sequence[str], l2: float) -> np.ndarray:
    """Out-of-family p(heavy): each family's items scored by a model fitted without it."""
    out = np.zeros(len(y))
    names = np.asarray(families)
    for family in sorted(set(families)):
        held = names == family
        weights, bias = fit_logistic(x[~held], y[~held], l2)
        out[held] = predict(x[held], weights, bias)
    return out


def choose_l2(x: np.ndarray, y: np.ndarray, families: Sequence[str]) -> tuple[float, np.ndarray]:
    """The penalty whose out-of-family scores have the largest area under the quality
    curve; with those scores."""
    best: tuple[float, float, np.ndarray] | None = None
    correct = y == 0
    for l2 in L2_GRID:
        scores = by_family(x, y, families, l2)
        points = curve(list(scores), list(correct))
        area = sum(quality_at(points, s / 20) for s in range(21))
        if best is None or area > best[0]:
            best = (area, l2, scores)
    assert best is not None
    return best[1], best[2]


def threshold_for(scores: np.ndarray, correct: np.ndarray,
                  quality: float = TARGET_QUALITY) -> float:
    """The p(heavy) cut whose cloud share reaches `quality` on these (held-out) scores."""
    points = curve(list(scores), list(correct))
    share = share_for(points, quality)
    ranked = np.sort(scores)[::-1]
    k = min(len(ranked) - 1, max(0, int(np.ceil(share * len(ranked))) - 1))
    return float(ranked[k]) if len(ranked) else 0.5


def train(records: Sequence[dict[str, Any]], embedder: Embedder,
          spec: TextSpec | None = None, meta: dict[str, Any] | None = None) -> Model:
    """A model from labelled records (body, family, local_correct)."""
    spec = spec or TextSpec()
    bodies = [r["body"] for r in records]
    y = np.array([0.0 if r["local_correct"] else 1.0 for r in records])
    families = [r["family"] for r in records]
    x = design(bodies, embedder, spec)
    l2, held_out = choose_l2(x, y, families)
    weights, bias = fit_logistic(x, y, l2)
    threshold = threshold_for(held_out, y == 0)
    points = curve(list(held_out), list(y == 0))
    info = {"l2": l2, "held_out_by_family": {
        "quality_at_share": {f"{s / 10:.1f}": round(quality_at(points, s / 10), 4)
                             for s in range(11)},
        "share_for_95": round(share_for(points, 0.95), 4)}}
    return Model(weights.astype(np.float32), bias, threshold, embedder.describe(), spec,
                 {**(meta or {}), "fit": info})
