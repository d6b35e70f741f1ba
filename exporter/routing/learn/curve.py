"""How good a router is: the quality-versus-cloud-share curve and its area (APGR).

Route the items with the highest p(heavy) to the cloud, the rest to the local model. With a
cloud share s, quality(s) = (local items the local model answered right + every item sent
to the cloud) / all items: the cloud is taken to answer everything right, so the curve runs
from the local model's own accuracy w at s = 0 to 1 at s = 1.

PGR(s) = (quality(s) - w) / (1 - w), the share of the gap recovered; APGR is its average over
s in [0, 1] (RouteLLM, Ong et al. 2024, arXiv:2406.18665). A random router recovers the gap
linearly: APGR = 0.5. A perfect one sends exactly the items the local model gets wrong, first:
APGR = (1 + w) / 2. Normalised, (APGR - 0.5) / (w / 2): random 0, perfect 1.
Items with equal scores are taken together (the average over their orders), so a router with
two outputs (rules) is the straight line through its one point.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise


def curve(scores: Sequence[float], correct: Sequence[bool]) -> list[tuple[float, float]]:
    """(cloud share, quality) at 0, after each group of equal scores, and 1."""
    n = len(scores)
    if n == 0:
        return [(0.0, 1.0), (1.0, 1.0)]
    order = sorted(range(n), key=lambda i: -scores[i])
    right_local = sum(bool(c) for c in correct)
    points = [(0.0, right_local / n)]
    sent = 0
    i = 0
    while i < n:
        j = i
        while j < n and scores[order[j]] == scores[order[i]]:
            j += 1
        for k in range(i, j):  # sending a wrongly answered item gains 1, a right one 0
            right_local -= bool(correct[order[k]])
        sent = j
        points.append((sent / n, (sent + right_local) / n))
        i = j
    return points


def quality_at(points: list[tuple[float, float]], share: float) -> float:
    for (s0, q0), (s1, q1) in pairwise(points):
        if s0 <= share <= s1:
            return q0 if s1 == s0 else q0 + (q1 - q0) * (share - s0) / (s1 - s0)
    return points[-1][1]


def share_for(points: list[tuple[float, float]], quality: float) -> float:
    """The smallest cloud share whose quality reaches `quality` (interpolated)."""
    for (s0, q0), (s1, q1) in pairwise(points):
        if q1 >= quality:
            return s0 if q0 >= quality or q1 == q0 else s0 + (s1 - s0) * (quality - q0) / (q1 - q0)
    return 1.0


def apgr(points: list[tuple[float, float]]) -> float:
    weak = points[0][1]
    if weak >= 1:
        return 1.0
    area = sum((s1 - s0) * (q0 + q1) / 2
               for (s0, q0), (s1, q1) in pairwise(points))
    return (area - weak) / (1 - weak)


def normalised_apgr(points: list[tuple[float, float]]) -> float:
    weak = points[0][1]
    return (apgr(points) - 0.5) / (weak / 2) if weak > 0 else 0.0
