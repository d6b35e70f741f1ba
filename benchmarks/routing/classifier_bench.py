"""How well the light/heavy classifier routes: quality against cloud share, on task families
it never saw.

Data: benchmarks/routing/classifier_labels.jsonl, tasks from exporter/routing/learn/tasks.py
labelled by running them on SmolLM2-135M-Instruct (Q4_1) on the real llama-server at
temperature 0 (`llmtap classifier train ... --labels`): local_correct says whether the local
model answered right. No model server is needed here, unless `--own-embeddings`.

Every learned score is out of family, three ways: leaving one family out (the headline:
the items of each family scored by a model fitted on the other families only, its kind and
L2 penalty chosen by fit.choose on an inner split of those families alone), and two fixed
splits, each written and labelled as a held-out split before any feature or setting was
tried on it: the second batch (fitted and chosen on the first eleven families, scored on
the twelve of tasks.NEW_FAMILIES), and the blind batch (fitted and chosen on the 23 of
tasks.FAMILIES, scored on the ten of tasks_third.THIRD_FAMILIES, written by someone who
never saw a result, and scored once, after the model and its settings were fixed). So the
numbers say how the classifier does on kinds of request it was not trained on.

With `--own-embeddings URL` it also scores a model that reads the local model's own
embeddings (the `server` embedder: a llama-server of the same GGUF started with
`--embeddings --pooling last`), the same three ways, and times reading those embeddings
(300 calls, one at a time).

Routers compared (quality = local items answered right + every item sent to the cloud, over
all items; exporter/routing/learn/curve.py):
- random: APGR 0.5 by construction (measured over 20 seeds here as a check);
- length: the longer the prompt, the heavier (every threshold: a curve);
- old rules: the rules on main before issue 17 (all text concatenated, max_tokens >= 2048,
  "theorem"/"proof" anywhere);
- rules: this version's rules (last turn; a point);
- cue prior alone: the cues summed with their prior signs, nothing fitted (fit.PRIOR_SIGNS);
- learned: the logistic regression (cues, scalars, WordLlama embeddings: which of them is
  chosen per fold), alone;
- cascade: rules first (what they call heavy goes first), then the learned p(heavy): what the
  router runs with `classifier.model`.

Latency: the cascade as the router calls it (async, the model's work on the classifier's
thread, the embedding model loaded once), over every labelled body.

    .venv/bin/python -m benchmarks.routing.classifier_bench          # writes classifier_results.md
    .venv/bin/python -m benchmarks.routing.classifier_bench --own-embeddings \
        http://127.0.0.1:8090/v1/embeddings                            # and the server embedder
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporter.routing.classifier import load_cascade
from exporter.routing.config import ClassifierSpec, HybridSpec, RouterConfig
from exporter.routing.embedding import ServerEmbedder, WordLlamaEmbedder
from exporter.routing.learn import fit
from exporter.routing.learn.curve import apgr, curve, normalised_apgr, quality_at, share_for
from exporter.routing.learn.tasks import FAMILIES, NEW_FAMILIES
from exporter.routing.learn.tasks_third import THIRD_FAMILIES
from exporter.routing.learned import CUE_NAMES, TextSpec, cues, texts
from exporter.routing.rules import Rules, requested_max_tokens
from exporter.routing.turns import prompt_text

HERE = Path(__file__).resolve().parent
LABELS = HERE / "classifier_labels.jsonl"
RESULTS = HERE / "classifier_results.md"

# The rules on main before this change, kept here as the baseline they were.
OLD_CODE = re.compile(
    r"```|^\s*(?:def |class |import |from \S+ import |#include|function |fn |func |public |"
    r"SELECT |CREATE TABLE|for \(|while \()", re.MULTILINE)
OLD_REASONING = re.compile(
    r"\b(?:step[- ]by[- ]step|prove|proof|derive|reason(?:ing)? (?:carefully|through)|"
    r"think (?:carefully|hard|deeply)|analy[sz]e in depth|chain of thought|theorem|"
    r"optimi[sz]e the algorithm|debug)\b", re.IGNORECASE)


def old_rules(body: dict[str, Any]) -> bool:
    asked = requested_max_tokens(body)
    text = prompt_text(body)
    return bool((asked is not None and asked >= 2048) or len(text) >= 8000
                or OLD_CODE.search(text) or OLD_REASONING.search(text))


def held_out_scores(x: np.ndarray, y: np.ndarray, families: list[str], train: np.ndarray,
                    dim: int, kinds: tuple[str, ...] = tuple(fit.KINDS)
                    ) -> tuple[np.ndarray, fit.Choice]:
    """Scores for the items not in `train`, by a model fitted on `train` only: its kind and
    penalty chosen by the inner split of the training families alone (fit.choose)."""
    inner = [f for f, t in zip(families, train, strict=True) if t]
    choice = fit.choose(x[train], y[train], inner, dim, kinds)
    weights, bias = fit.fit_choice(x[train], y[train], choice, dim)
    return fit.predict(fit.select(x[~train], choice.blocks, dim), weights, bias), choice


def nested_scores(x: np.ndarray, y: np.ndarray, families: list[str], dim: int,
                  kinds: tuple[str, ...] = tuple(fit.KINDS)) -> tuple[np.ndarray, list[str]]:
    """Leave one family out: each family scored by a model fitted (and chosen) without it."""
    names = np.asarray(families)
    out = np.zeros(len(y))
    chosen = []
    for family in sorted(set(families)):
        held = names == family
        out[held], choice = held_out_scores(x, y, families, ~held, dim, kinds)
        chosen.append(f"{family}: {choice.kind}, L2 {choice.l2:g}")
    return out, chosen


def seen_family_scores(x: np.ndarray, y: np.ndarray, families: list[str], dim: int,
                       folds: int = 5) -> np.ndarray:
    """For contrast: tasks held out at random (5 folds), their families seen in training:
    what an operator gets on the kinds of request the model was trained on."""
    fold = np.random.default_rng(17).integers(0, folds, len(y))
    out = np.zeros(len(y))
    for k in range(folds):
        out[fold == k], _ = held_out_scores(x, y, families, fold != k, dim)
    return out


def prior_scores(bodies: list[dict[str, Any]]) -> list[float]:
    """The cue prior alone, nothing fitted: the sum of the cues, signed (fit.PRIOR_SIGNS)."""
    signs = np.array([fit.PRIOR_SIGNS.get(n, 0) for n in CUE_NAMES], dtype=np.float64)
    return [float(cues(b) @ signs) for b in bodies]


def summarise(name: str, scores: list[float], correct: list[bool]) -> dict[str, Any]:
    points = curve(scores, correct)
    return {"router": name, "apgr": apgr(points), "normalised": normalised_apgr(points),
            "share_95": share_for(points, 0.95),
            "quality": [quality_at(points, s / 10) for s in range(11)]}


def latency(records: list[dict[str, Any]], rounds: int) -> dict[str, float]:
    config = RouterConfig(classifier=ClassifierSpec(model="builtin", deadline=1.0))
    cascade = load_cascade(config)
    hybrid = HybridSpec(light="small", heavy="big")

    async def run() -> list[float]:
        for r in records[:20]:  # warm: the thread pool's threads, numpy's first calls
            await cascade.classify(r["body"], "/v1/chat/completions", hybrid)
        times = []
        for _ in range(rounds):
            for r in records:
                start = time.perf_counter()
                await cascade.classify(r["body"], "/v1/chat/completions", hybrid)
                times.append(time.perf_counter() - start)
        return times

    return milliseconds(asyncio.run(run()))


def milliseconds(seconds: list[float]) -> dict[str, float]:
    """How many, p50, p99 and max, in milliseconds."""
    times = sorted(seconds)
    return {"n": len(times), "p50_ms": 1e3 * times[len(times) // 2],
            "p99_ms": 1e3 * times[int(len(times) * 0.99)], "max_ms": 1e3 * times[-1]}


def embedding_latency(embedder: ServerEmbedder, bodies: list[dict[str, Any]],
                      count: int = 300) -> dict[str, float]:
    """What reading the server's embeddings costs one classification (the last turn and the
    context, one request: what LearnedClassifier.classify sends), one call at a time."""

    async def run() -> list[float]:
        times = []
        for body in bodies[:count]:
            last, ctx = texts(body, TextSpec())
            start = time.perf_counter()
            await embedder.embed([last, ctx])
            times.append(time.perf_counter() - start)
        await embedder.close()
        return times

    return milliseconds(asyncio.run(run()))


def auc(scores: np.ndarray, heavy: np.ndarray) -> float | None:
    """P(a heavy item scores above a light one), ties half: None if either is missing."""
    pos, neg = scores[heavy == 1], scores[heavy == 0]
    if not len(pos) or not len(neg):
        return None
    above = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    return float(above)


def diagnosis(families: list[str], y: np.ndarray, learned: np.ndarray) -> list[str]:
    """Where out-of-family scoring goes wrong: between families (the mean p(heavy) a held-out
    family gets against how heavy it is) or within them (AUC inside the family)."""
    names = np.asarray(families)
    lines = ["| held-out family | heavy (local model wrong) | mean p(heavy) given | "
             "AUC within the family |", "|---|---|---|---|"]
    for family in sorted(set(families)):
        m = names == family
        inside = auc(learned[m], y[m])
        lines.append(f"| {family} | {y[m].mean():.0%} | {learned[m].mean():.2f} | "
                     + (f"{inside:.2f}" if inside is not None else "-") + " |")
    overall = auc(learned, y)
    lines.append(f"| all (pooled) | {y.mean():.0%} | {learned.mean():.2f} | "
                 f"{overall:.2f} |" if overall is not None else "")
    return lines


def family_table(records: list[dict[str, Any]]) -> list[str]:
    by: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by[r["family"]][r["level"]].append(bool(r["local_correct"]))
    lines = ["| family | tasks | right | level 1 | level 2 | level 3 | level 4 |",
             "|---|---|---|---|---|---|---|"]
    for family, levels in sorted(by.items()):
        every = [v for vs in levels.values() for v in vs]
        cells = [f"{sum(levels[lv]) / len(levels[lv]):.0%}" if levels.get(lv) else "-"
                 for lv in (1, 2, 3, 4)]
        lines.append(f"| {family} | {len(every)} | {sum(every) / len(every):.0%} | "
                     + " | ".join(cells) + " |")
    return lines


@dataclass(frozen=True)
class Data:
    records: list[dict[str, Any]]
    bodies: list[dict[str, Any]]
    correct: list[bool]
    families: list[str]
    y: np.ndarray  # 1: heavy (the local model was wrong)
    rule_heavy: list[bool]

    @classmethod
    def read(cls, path: str) -> Data:
        records = [json.loads(line) for line in Path(path).read_text().splitlines()
                   if line.strip()]
        bodies = [r["body"] for r in records]
        correct = [bool(r["local_correct"]) for r in records]
        rules = Rules(ClassifierSpec())
        return cls(records, bodies, correct, [r["family"] for r in records],
                   np.array([0.0 if c else 1.0 for c in correct]),
                   [bool(rules(b)) for b in bodies])

    def of(self, names: Collection[str]) -> np.ndarray:
        return np.array([f in names for f in self.families])

    def routers(self, scores: np.ndarray, mask: np.ndarray) -> list[dict[str, Any]]:
        pick = np.flatnonzero(mask)
        return routers([self.bodies[i] for i in pick], [self.correct[i] for i in pick],
                       scores, [self.rule_heavy[i] for i in pick])


# The first eleven families: what the second batch's split is fitted on.
FIRST = set(FAMILIES) - set(NEW_FAMILIES)


@dataclass
class Evaluation:
    """One feature set scored three ways: leaving one family out, and the two fixed splits."""
    lofo: np.ndarray
    chosen: list[str]
    second: tuple[np.ndarray, fit.Choice]
    blind: tuple[np.ndarray, fit.Choice]


def evaluate(data: Data, x: np.ndarray, dim: int, kinds: tuple[str, ...]) -> Evaluation:
    lofo, chosen = nested_scores(x, data.y, data.families, dim, kinds)
    first, second, third = data.of(FIRST), data.of(NEW_FAMILIES), data.of(THIRD_FAMILIES)
    keep = first | second  # the second batch's split knows nothing of the third
    second_scores, second_choice = held_out_scores(
        x[keep], data.y[keep], [f for f, k in zip(data.families, keep, strict=True) if k],
        first[keep], dim, kinds)
    blind = held_out_scores(x, data.y, data.families, ~third, dim, kinds)
    return Evaluation(lofo, chosen, (second_scores, second_choice), blind)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="latency passes over the data")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--labels", default=str(LABELS), help="the labelled set")
    parser.add_argument("--dim", type=int, default=64, help="WordLlama dimensions")
    parser.add_argument("--own-embeddings", default="", metavar="URL",
                        help="also score a model on this /v1/embeddings endpoint's vectors "
                        "(the local model's own: llama-server --embeddings --pooling last)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data = Data.read(args.labels)
    x = fit.design(data.bodies, WordLlamaEmbedder(dim=args.dim), TextSpec())
    shipped = evaluate(data, x, args.dim, tuple(fit.KINDS))
    own, own_latency = None, None
    if args.own_embeddings:
        embedder = ServerEmbedder(args.own_embeddings)
        own_x = fit.design(data.bodies, embedder, TextSpec())
        own = evaluate(data, own_x, embedder.dim, fit.SERVER_KINDS)  # as `train` fits it
        own_latency = embedding_latency(embedder, data.bodies)
    everything = np.ones(len(data.y), dtype=bool)
    rows = data.routers(shipped.lofo, everything)
    rows.insert(2, summarise("learned, families seen (5-fold over tasks; for contrast)",
                             list(seen_family_scores(x, data.y, data.families, args.dim)),
                             data.correct))
    lat = latency(data.records, args.rounds)
    text = page(data, rows, lat, time.perf_counter() - started, shipped, own, own_latency)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
    return 0


def page(data: Data, rows: list[dict[str, Any]], lat: dict[str, float], seconds: float,
         shipped: Evaluation, own: Evaluation | None,
         own_latency: dict[str, float] | None) -> str:
    """The results page: the headline (leaving one family out), the three views side by
    side, each fixed split, and where out-of-family scoring goes wrong."""
    return "\n".join([
        render(data.records, rows, lat, sum(data.correct) / len(data.correct), seconds,
               own is not None),
        *summary_table(data, shipped, own), "",
        *([] if own_latency is None else [
            "Reading the local model's own embeddings (last turn and context, one request to "
            f"the llama-server, one at a time), {own_latency['n']} calls: p50 "
            f"{own_latency['p50_ms']:.1f} ms, p99 {own_latency['p99_ms']:.1f} ms, max "
            f"{own_latency['max_ms']:.1f} ms.", ""]),
        *split_section(data, "The second batch: fitted on the first eleven families, scored "
                       "on the twelve of the second", "second", NEW_FAMILIES, shipped.second),
        *split_section(data, "The blind batch: fitted on the 23 families, scored on ten "
                       "written blind", "blind", THIRD_FAMILIES, shipped.blind),
        "## Out of family: between or within families?", "",
        *diagnosis(data.families, data.y, shipped.lofo), "",
        "Kind and penalty chosen for each held-out family (on the inner split of the "
        "others): " + "; ".join(shipped.chosen) + ".", ""])


SPLIT_NOTES = {
    "second": "written and labelled as a held-out split before any feature or setting was "
              "tried on them (the cue word lists were written after these families' prompts "
              "were, leaving out words only they would suggest)",
    "blind": "written by a helper who never saw a result, a label or a feature, labelled "
             "once, and scored once with the classifier and its settings as they were",
}


def split_section(data: Data, title: str, kind: str, names: Collection[str],
                  scored: tuple[np.ndarray, fit.Choice]) -> list[str]:
    mask = data.of(names)
    scores, choice = scored
    right = [data.correct[i] for i in np.flatnonzero(mask)]
    return ["## " + title, "",
            f"The {len(names)} ({', '.join(sorted(names))}) were {SPLIT_NOTES[kind]}. "
            f"Chosen on the families fitted on: {choice.kind}, L2 {choice.l2:g}. "
            f"{len(right)} tasks; the local model answered {sum(right) / len(right):.1%} "
            "right.", "", *table(data.routers(scores, mask)), ""]


def summary_table(data: Data, shipped: Evaluation, own: Evaluation | None) -> list[str]:
    """Normalised APGR of each router, the three ways of holding families out side by side."""
    everything = np.ones(len(data.y), dtype=bool)
    views = [(everything, shipped.lofo), (data.of(NEW_FAMILIES), shipped.second[0]),
             (data.of(THIRD_FAMILIES), shipped.blind[0])]
    tables = [data.routers(scores, mask) for mask, scores in views]
    if own is not None:
        extra = [own.lofo, own.second[0], own.blind[0]]
        for rows_, (mask, _), scores in zip(tables, views, extra, strict=True):
            pick = np.flatnonzero(mask)
            rows_.insert(1, summarise("learned on the local model's own embeddings",
                                      list(scores), [data.correct[i] for i in pick]))
    out = ["## Normalised APGR, three ways of holding families out", "",
           f"| router | leave one family out ({len(set(data.families))}) | second batch "
           f"(fitted on {len(FIRST)}, scored on {len(NEW_FAMILIES)}) | blind batch (fitted "
           f"on {len(FAMILIES)}, scored on {len(THIRD_FAMILIES)}) |",
           "|---|---|---|---|"]
    for i, row in enumerate(tables[0]):
        out.append(f"| {row['router']} | " + " | ".join(
            f"{t[i]['normalised']:.3f}" for t in tables) + " |")
    return out


def routers(bodies: list[dict[str, Any]], correct: list[bool], learned: np.ndarray,
            rule_heavy: list[bool]) -> list[dict[str, Any]]:
    rows = [summarise("learned (out of family)", list(learned), correct),
            summarise("cascade: rules, then learned", [p + (1.0 if h else 0.0) for p, h in
                                                       zip(learned, rule_heavy, strict=True)],
                      correct),
            summarise("cue prior alone (nothing fitted)", prior_scores(bodies), correct),
            summarise("rules (this version)", [float(h) for h in rule_heavy], correct),
            summarise("old rules (main before)", [float(old_rules(b)) for b in bodies],
                      correct),
            summarise("prompt length", [float(len(prompt_text(b))) for b in bodies], correct),
            summarise("last-turn length", [float(len(str(b["messages"][-1]["content"])))
                                           for b in bodies], correct)]
    randoms = [summarise("random", [random.Random(s).random() for _ in bodies], correct)
               for s in range(20)]
    rows.append({"router": "random (20 seeds, mean)",
                 "apgr": statistics.mean(r["apgr"] for r in randoms),
                 "normalised": statistics.mean(r["normalised"] for r in randoms),
                 "share_95": statistics.mean(r["share_95"] for r in randoms),
                 "quality": [statistics.mean(r["quality"][i] for r in randoms)
                             for i in range(11)]})
    rows.append(summarise("perfect (oracle)", [0.0 if c else 1.0 for c in correct], correct))
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| router | APGR | normalised APGR | cloud share for 95% quality | "
           + " | ".join(f"q@{s / 10:.1f}" for s in range(11)) + " |",
           "|---|---|---|---|" + "---|" * 11]
    for r in rows:
        out.append(f"| {r['router']} | {r['apgr']:.3f} | {r['normalised']:.3f} | "
                   f"{r['share_95']:.1%} | " + " | ".join(f"{q:.3f}" for q in r["quality"])
                   + " |")
    return out


def render(records: list[dict[str, Any]], rows: list[dict[str, Any]], lat: dict[str, float],
           weak: float, seconds: float, own: bool) -> str:
    out = ["# Light/heavy classifier: quality against cloud share", "",
           "Made by `.venv/bin/python -m benchmarks.routing.classifier_bench"
           + (" --own-embeddings URL` (URL: llama-server of the same SmolLM2 GGUF, "
              "`--embeddings --pooling last -c 2048 -np 2`)" if own else "`")
           + f" ({seconds:.0f} s on this machine's 2 cores) from "
           "`benchmarks/routing/classifier_labels.jsonl`: "
           f"{len(records)} tasks in {len({r['family'] for r in records})} families, "
           "labelled on SmolLM2-135M-Instruct Q4_1 (llama-server, temperature 0), which "
           f"answered {weak:.1%} right. Learned scores are out of family (each family scored "
           "by a model fitted without it, the model's kind and penalty chosen on an inner "
           "split of the other families alone). Quality = local items answered right + items sent "
           "to the cloud, over all items.", "",
           *table(rows)]
    out += ["", "q@s: quality with a share s of the requests sent to the cloud. Normalised "
            "APGR: random 0, perfect 1.", "",
            f"Classification latency, the cascade as the router runs it (gate, rules, "
            f"embedding and model on the classifier's thread), {lat['n']} calls: "
            f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} "
            "ms.", "", "## The labelled set, by family and level", "",
            *family_table(records), ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
