"""`llmtap classify`, `llmtap classifier tasks` and `llmtap classifier train`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any, TextIO

from exporter.config import ConfigError


def add_commands(commands: Any) -> None:
    classify = commands.add_parser(
        "classify", help="classify request bodies (one JSON object a line on stdin) as the "
                         "router would",
        description="Reads request bodies, one JSON object a line, on standard input, and "
                    "writes one line per request: {\"label\", \"p_heavy\", \"reason\"} "
                    "(label light, heavy, or local: kept by the keep-local gate). Without "
                    "--config: the keep-local gate, the rules and the shipped model.")
    classify.add_argument("--config", metavar="FILE",
                          help="router YAML file: its keep_local and classifier sections, and "
                               "the route each body's model picks")
    classifier = commands.add_parser(
        "classifier", help="make tasks for, and train, the learned classifier",
        description="Train the light/heavy classifier against your own local model "
                    "(docs/routing.md#the-learned-classifier).")
    sub = classifier.add_subparsers(dest="classifier_command", metavar="COMMAND",
                                    required=True)
    tasks = sub.add_parser("tasks", help="write tasks with checkable answers (JSONL)")
    tasks.add_argument("--out", required=True, metavar="FILE")
    tasks.add_argument("--per-family", type=int, default=100,
                       help="tasks per family (default: %(default)s)")
    tasks.add_argument("--seed", type=int, default=17)
    train = sub.add_parser(
        "train", help="label tasks on the local model, fit the model",
        description="Runs every task on the local model's OpenAI chat completions API "
                    "(temperature 0), checks each answer (light = answered right), and fits "
                    "the classifier; or refits from a labelled set (--from-labels).")
    train.add_argument("--local", metavar="URL", help="the local model server (or its llmtap "
                       "sidecar), e.g. http://127.0.0.1:8080")
    train.add_argument("--tasks", metavar="FILE", help="from `llmtap classifier tasks`")
    train.add_argument("--model", default="", help="model name to send (Ollama needs one)")
    train.add_argument("--out", required=True, metavar="MODEL",
                       help="the model file to write (classifier.model in router.yaml)")
    train.add_argument("--labels", metavar="FILE", help="also write the labelled set here")
    train.add_argument("--from-labels", metavar="FILE",
                       help="fit from this labelled set instead of running the tasks")
    train.add_argument("--concurrency", type=int, default=2)
    train.add_argument("--embeddings-url", default="", metavar="URL",
                       help="train on this embeddings endpoint's vectors and the scalars, "
                            "no cues (default: cues, scalars, the bundled WordLlama); best "
                            "your own model's: a second llama-server of the same GGUF with "
                            "--embeddings --pooling last (http://127.0.0.1:8090/v1/embeddings); "
                            "the router then needs it as classifier.embeddings.url")
    train.add_argument("--embeddings-model", default="")
    train.add_argument("--dim", type=int, default=64, choices=(64, 128, 256),
                       help="WordLlama dimensions to use (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    if args.command == "classify":
        return classify(args.config, sys.stdin, sys.stdout)
    if args.classifier_command == "tasks":
        return write_tasks(args.out, args.per_family, args.seed)
    return train(args)


# --------------------------------------------------------------------------- classify


def classify(config_path: str | None, stdin: TextIO, stdout: TextIO) -> int:
    from exporter.routing.classifier import load_cascade
    from exporter.routing.config import ClassifierSpec, HybridSpec, RouterConfig, load_config

    if config_path:
        config = load_config(config_path)
    else:
        config = RouterConfig(classifier=ClassifierSpec(model="builtin"))
    cascade = load_cascade(config)

    async def each() -> int:
        bad = 0
        for line in stdin:
            if not line.strip():
                continue
            try:
                body = json.loads(line)
            except ValueError:
                body = None
            if not isinstance(body, dict):
                bad += 1
                stdout.write('{"label": null, "p_heavy": null, "reason": "invalid_json"}\n')
                continue
            # As a hybrid route would (the route's own fallback if it is one): the question
            # asked here is what the classifier says of this request.
            route = config.route_for(str(body.get("model") or ""))
            hybrid = route.hybrid or HybridSpec(light="", heavy="")
            verdict = await cascade.classify(body, "/v1/chat/completions", hybrid)
            assert verdict is not None  # on a hybrid route the cascade always answers
            stdout.write(json.dumps({"label": verdict.label, "p_heavy": verdict.p_heavy,
                                     "reason": verdict.reason}) + "\n")
            stdout.flush()
        return 1 if bad else 0

    return asyncio.run(each())


# --------------------------------------------------------------------------- tasks


def write_tasks(out: str, per_family: int, seed: int) -> int:
    from exporter.routing.learn.tasks import generate

    count = 0
    with open(out, "w") as f:
        for task in generate(per_family, seed):
            f.write(json.dumps(task, separators=(",", ":")) + "\n")
            count += 1
    print(f"wrote {count} tasks to {out}", file=sys.stderr)
    return 0


def read_jsonl(path: str) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON lines: {exc}") from None


def _served_model(base_url: str) -> str:
    """What the local server says it serves, for the model file's record."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/v1/models", timeout=5) as r:
            data = json.loads(r.read())
        return str(data["data"][0]["id"])
    except Exception:
        return ""


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    right: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        right[r["family"]].append(bool(r["local_correct"]))
    total = sum(sum(v) for v in right.values())
    return {"tasks": len(records), "local_correct": round(total / max(1, len(records)), 4),
            "by_family": {f: round(sum(v) / len(v), 4) for f, v in sorted(right.items())}}


def train(args: argparse.Namespace) -> int:
    from exporter.routing.embedding import ServerEmbedder, WordLlamaEmbedder
    from exporter.routing.learn import fit
    from exporter.routing.learn.label import label

    if args.from_labels:
        records = read_jsonl(args.from_labels)
        against: dict[str, Any] = {"labels": Path(args.from_labels).name,
                                   **({"model": args.model} if args.model else {})}
    else:
        if not args.local or not args.tasks:
            raise ConfigError("--local and --tasks are needed (or --from-labels)")
        tasks = read_jsonl(args.tasks)
        started = time.monotonic()

        def progress(done: int, total: int) -> None:
            if done % 25 == 0 or done == total:
                print(f"labelled {done}/{total} ({time.monotonic() - started:.0f} s)",
                      file=sys.stderr)

        records = asyncio.run(label(tasks, args.local, args.model, args.concurrency,
                                    progress=progress))
        against = {"server": args.local, "model": args.model or _served_model(args.local)}
        if args.labels:
            with open(args.labels, "w") as f:
                for r in records:
                    f.write(json.dumps(r, separators=(",", ":")) + "\n")
    if len({r["local_correct"] for r in records}) < 2:
        raise ConfigError("every task was answered alike (all right or all wrong): nothing "
                          "to learn from")
    embedder = ServerEmbedder(args.embeddings_url, args.embeddings_model) \
        if args.embeddings_url else WordLlamaEmbedder(dim=args.dim)
    stats = summary(records)
    meta = {"trained_against": {**against, **stats,
                                "created": time.strftime("%Y-%m-%d", time.gmtime())}}
    # The server's embeddings were asked for: the model reads them (and scalars), no cues.
    kinds = list(fit.SERVER_KINDS) if args.embeddings_url else list(fit.KINDS)
    model = fit.train(records, embedder, meta=meta, kinds=kinds)
    Path(args.out).write_text(json.dumps(model.to_json(), separators=(",", ":")) + "\n")
    held = model.meta["fit"]["held_out_by_family"]
    print(f"{args.out}: {stats['tasks']} tasks, local model right on "
          f"{stats['local_correct']:.1%}; {model.meta['fit']['kind']}, L2 "
          f"{model.meta['fit']['l2']:g}; threshold {model.threshold:.3f}; on families held "
          f"out: normalised APGR {held['normalised_apgr']:.3f}, cloud share "
          f"{held['share_for_95']:.1%} for 95% quality", file=sys.stderr)
    return 0
