"""Fitting the learned classifier: L2-regularised logistic regression (Newton's method, a few
hundred features, numpy only). Its kind (which feature blocks; whether the penalty pulls the
weights towards the cue prior or towards zero) and its penalty are chosen on an inner split
of the training families (whole families held out, five groups), its threshold and the
calibration in the model file from scores of families held out one at a time: so that the
numbers say how it does on kinds of request it never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from exporter.routing.embedding import Embedder
from exporter.routing.learn.curve import curve, normalised_apgr, quality_at, share_for
from exporter.routing.learned import (
    BLOCKS,
    CUE_NAMES,
    SCALARS,
    Calibration,
    Model,
    TextSpec,
    block_sizes,
    rows,
    texts,
)

L2_GRID = (3.0, 30.0, 300.0, 3000.0)  # penalty on the standardised weights, per sample sum
TARGET_QUALITY = 0.95  # the shipped threshold: the least cloud share that reaches this


def design(bodies: Sequence[dict[str, Any]], embedder: Embedder, spec: TextSpec,
           blocks: tuple[str, ...] = BLOCKS) -> np.ndarray:
    pairs = [texts(b, spec) for b in bodies]
    vectors = embedder.embed_many([p[0] for p in pairs] + [p[1] for p in pairs])
    return rows(list(bodies), vectors, blocks).astype(np.float64)


def columns(blocks: tuple[str, ...], dim: int) -> dict[str, slice]:
    """Where each block lies in a row of design(..., BLOCKS)."""
    sizes = block_sizes(dim)
    out, start = {}, 0
    for b in BLOCKS:
        out[b] = slice(start, start + sizes[b])
        start += sizes[b]
    return {b: out[b] for b in blocks}


def select(x: np.ndarray, blocks: tuple[str, ...], dim: int) -> np.ndarray:
    """The columns of a full design matrix that a model with `blocks` uses."""
    where = columns(BLOCKS, dim)
    return np.hstack([x[:, where[b]] for b in BLOCKS if b in blocks])


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 25,
                 prior: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Weights and bias on the raw features (standardisation folded in). y = 1: heavy.
    The penalty pulls the standardised weights towards `prior` (zeros when None)."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    z = (x - mean) / scale
    n, d = z.shape
    a = np.hstack([z, np.ones((n, 1))])
    centre = np.zeros(d + 1)
    if prior is not None:
        centre[:-1] = prior
    w = centre.copy()
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0  # the bias is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -40, 40)))
        gradient = a.T @ (p - y) + penalty * (w - centre)
        hessian = (a * (p * (1 - p))[:, None]).T @ a + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.max(np.abs(step)) < 1e-6:
            break
    weights = w[:-1] / scale
    bias = float(w[-1] - (w[:-1] * mean / scale).sum())
    return weights, bias


# The prior the fit starts from and is pulled towards, in standardised units (logits per
# standard deviation): each cue of work a small model gets wrong (computation, symbols,
# dates, order, steps, number theory, a format, code) pushes towards heavy, each cue of
# what it does well (chit-chat, recall, an answer given in the text) towards light. Set
# once from what the cues mean, not fitted: the penalty decides how far the data move it.
PRIOR_SIGNS = {"log_digits": 1, "operations": 1, "cue_compute": 1, "cue_symbols": 1,
               "cue_time": 1, "cue_order": 1, "cue_steps": 1, "cue_number_theory": 1,
               "cue_format": 1, "cue_code": 1, "cue_social": -1, "cue_recall": -1,
               "cue_given": -1}
PRIOR_WEIGHT = 0.5


def prior_for(blocks: tuple[str, ...], dim: int) -> np.ndarray:
    """The prior weights of a row with `blocks` (zero but for the cues)."""
    sizes = block_sizes(dim)
    parts = []
    for b in BLOCKS:
        if b not in blocks:
            continue
        if b == "cues":
            parts.append(np.array([PRIOR_WEIGHT * PRIOR_SIGNS.get(n, 0) for n in CUE_NAMES]))
        else:
            parts.append(np.zeros(sizes[b]))
    return np.concatenate(parts)


def predict(x: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x @ weights + bias, -40, 40)))


# The kinds of model the fit chooses among (with the penalty), by an inner split of the
# training families: which blocks a row holds, and whether the penalty pulls the weights
# towards the cue prior (True) or towards zero.
KINDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "cues": (("scalars", "cues"), True),
    "embeddings+cues": (BLOCKS, True),
    "embeddings": (("last", "context", "scalars"), False),
    "embeddings+cues, no prior": (BLOCKS, False),
}
# With the model server's own embeddings (`--embeddings-url`): those vectors and the scalars,
# no cues. The vectors come from the model whose answers are being predicted, and carry what
# the cues say: leaving one family out of 23, adding the cues took SmolLM2's vectors from
# 0.362 to 0.351.
SERVER_KINDS = ("embeddings",)
INNER_FOLDS = 5  # the inner split: the training families dealt into this many groups


def family_folds(families: Sequence[str], folds: int = INNER_FOLDS) -> np.ndarray:
    """Each item's fold: whole families dealt into `folds` groups (a fixed shuffle)."""
    names = sorted(set(families))
    order = np.random.default_rng(17).permutation(len(names))
    fold_of = {names[j]: i % folds for i, j in enumerate(order)}
    return np.array([fold_of[f] for f in families])


def out_of_group(x: np.ndarray, y: np.ndarray, groups: np.ndarray, l2: float,
                 prior: np.ndarray | None) -> np.ndarray:
    """Each group's items scored by a model fitted without that group."""
    out = np.zeros(len(y))
    for g in np.unique(groups):
        held = groups == g
        weights, bias = fit_logistic(x[~held], y[~held], l2, prior=prior)
        out[held] = predict(x[held], weights, bias)
    return out


def by_family(x: np.ndarray, y: np.ndarray, families: Sequence[str], l2: float,
              prior: np.ndarray | None = None) -> np.ndarray:
    """Out-of-family p(heavy): each family's items scored by a model fitted without it."""
    return out_of_group(x, y, np.asarray(families), l2, prior)


@dataclass(frozen=True)
class Choice:
    kind: str
    l2: float
    score: float  # normalised APGR on the inner split

    @property
    def blocks(self) -> tuple[str, ...]:
        return KINDS[self.kind][0]

    def prior(self, dim: int) -> np.ndarray | None:
        return kind_prior(self.kind, dim)


def kind_prior(kind: str, dim: int) -> np.ndarray | None:
    """What a kind's penalty pulls its weights towards: the cue prior, or None (zeros)."""
    blocks, centred = KINDS[kind]
    return prior_for(blocks, dim) if centred else None


def choose(x: np.ndarray, y: np.ndarray, families: Sequence[str], dim: int,
           kinds: Sequence[str] = tuple(KINDS)) -> Choice:
    """The kind and penalty whose scores on held-out groups of families (the inner split:
    these families only) have the largest normalised APGR. `x` is a full design (BLOCKS)."""
    groups = family_folds(families)
    best: Choice | None = None
    for kind in kinds:
        rows_ = select(x, KINDS[kind][0], dim)
        prior = kind_prior(kind, dim)
        for l2 in L2_GRID:
            scores = out_of_group(rows_, y, groups, l2, prior)
            score = normalised_apgr(curve(list(scores), list(y == 0)))
            if best is None or score > best.score:
                best = Choice(kind, l2, score)
    assert best is not None
    return best


def fit_choice(x: np.ndarray, y: np.ndarray, choice: Choice,
               dim: int) -> tuple[np.ndarray, float]:
    return fit_logistic(select(x, choice.blocks, dim), y, choice.l2, prior=choice.prior(dim))


def threshold_for(scores: np.ndarray, correct: np.ndarray,
                  quality: float = TARGET_QUALITY) -> float:
    """The p(heavy) cut whose cloud share reaches `quality` on these (held-out) scores."""
    points = curve(list(scores), list(correct))
    share = share_for(points, quality)
    ranked = np.sort(scores)[::-1]
    return cut_for_share(ranked, share) if len(ranked) else 0.5


def cut_for_share(ranked: np.ndarray, share: float) -> float:
    """The score at or above which `share` of these (sorted, highest first) scores lie."""
    return float(ranked[min(len(ranked) - 1, max(0, int(np.ceil(share * len(ranked))) - 1))])


def train(records: Sequence[dict[str, Any]], embedder: Embedder,
          spec: TextSpec | None = None, meta: dict[str, Any] | None = None,
          kinds: Sequence[str] = tuple(KINDS)) -> Model:
    """A model from labelled records (body, family, local_correct): its kind (one of
    `kinds`) and penalty chosen on held-out groups of families, its threshold and
    calibration from scores of families held out one at a time. With fewer than ten
    families there is nothing to choose on: the first of `kinds` that reads embeddings,
    pulled hard towards the cue prior."""
    spec = spec or TextSpec()
    bodies = [r["body"] for r in records]
    y = np.array([0.0 if r["local_correct"] else 1.0 for r in records])
    families = [r["family"] for r in records]
    x = design(bodies, embedder, spec)
    dim = (x.shape[1] - len(SCALARS) - len(CUE_NAMES)) // 2
    if len(set(families)) >= 2 * INNER_FOLDS:
        choice = choose(x, y, families, dim, kinds)
    else:
        kind = next((k for k in kinds if KINDS[k][1] and "last" in KINDS[k][0]), kinds[0])
        choice = Choice(kind, L2_GRID[-1], 0.0)
    rows_ = select(x, choice.blocks, dim)
    held_out = by_family(rows_, y, families, choice.l2, choice.prior(dim)) \
        if len(set(families)) > 1 else np.full(len(y), 0.5)
    weights, bias = fit_choice(x, y, choice, dim)
    threshold = threshold_for(held_out, y == 0)
    points = curve(list(held_out), list(y == 0))
    calibration = calibrate(predict(rows_, weights, bias), points)
    info = {"kind": choice.kind, "l2": choice.l2, "held_out_by_family": {
        "quality_at_share": {f"{s / 10:.1f}": round(quality_at(points, s / 10), 4)
                             for s in range(11)},
        "normalised_apgr": round(normalised_apgr(points), 4),
        "share_for_95": round(share_for(points, 0.95), 4)}}
    return Model(weights.astype(np.float32), bias, threshold, embedder.describe(), spec,
                 {**(meta or {}), "fit": info}, calibration, choice.blocks)


def calibrate(scores: np.ndarray, held_out: list[tuple[float, float]],
              steps: int = 50) -> Calibration:
    """For cloud shares 0, 1/steps, ..., 1: the p(heavy) (of the fitted model, over its
    training tasks) above which that share lies, and the quality that share reached when
    every family was scored by a model fitted without it (`held_out`, the honest figure)."""
    ranked = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    shares: list[float] = []
    thresholds: list[float] = []
    quality: list[float] = []
    for i in range(steps + 1):
        share = i / steps
        cut = 1.0 if i == 0 else cut_for_share(ranked, share)
        shares.append(share)
        thresholds.append(min(cut, thresholds[-1]) if thresholds else cut)
        quality.append(quality_at(held_out, share))
    return Calibration(tuple(shares), tuple(thresholds), tuple(quality))
