"""Routing policies on a simulated fleet: validation, comparison, herding, tuning.

    python -m benchmarks.routing.simulate            # validation + comparison -> results.md
    python -m benchmarks.routing.simulate --quick    # a few seconds, prints only
    python -m benchmarks.routing.simulate --tune     # expected_wait's settings, tuning seeds

The model (backends, sidecars, router replicas) is `benchmarks/routing/engine.py`; every
simulated request is ranked by the real policies of `exporter/routing/policies.py`.

Seeds: the settings of expected_wait (cold_penalty, slack, slack_seconds) were chosen with
`--tune` on TUNE_SEEDS; every table of results.md is made on REPORT_SEEDS, a disjoint set.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.routing.engine import ModelSpec, RunResult, Scenario, simulate
from exporter.routing.policies import POLICIES, ExpectedWait, Policy

__all__ = ["ModelSpec", "RunResult", "Scenario", "simulate"]

TUNE_SEEDS = tuple(range(100, 108))
REPORT_SEEDS = tuple(range(200, 210))

# -- statistics ----------------------------------------------------------------------------------

# Two-sided 95% Student t quantiles by degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093,
        24: 2.064, 29: 2.045}


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (Student t over seeds)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan
    df = n - 1
    t = _T95.get(df) or next((_T95[k] for k in sorted(_T95, reverse=True) if k <= df), 1.96)
    if df > 29:
        t = 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(n)


# -- policies ------------------------------------------------------------------------------------


class OldPick(ExpectedWait):
    """expected_wait's estimate with the pick it had before: a pool of at most 3 within 1.25 x
    the best + 50 ms, ties in config order (a stable sort). Only here, to show what that does
    to many replicas."""

    name = "expected_wait_pool3"

    def __init__(self) -> None:
        super().__init__(slack=1.25, slack_seconds=0.05, pool=3)

    def tie_break(self, rng: random.Random) -> float:
        return 0.0


EXTRA: dict[str, Callable[[], Policy]] = {OldPick.name: OldPick}


def factory(name: str) -> Callable[[], Policy]:
    return EXTRA.get(name) or POLICIES[name]


# -- the experiments -----------------------------------------------------------------------------

FLEET_SPEEDS = (1.0, 1.0, 0.5, 2.0)
# Prefill per prompt token at 1x: a mean prompt (500 tokens) costs what a request's prefill
# cost before prompt lengths were modelled (0.25, 0.4, 0.2, 0.1 s).
FLEET_MODELS = (
    ModelSpec("llama3.1:8b", 0.45, prefill_per_token=0.0005, tpot=0.025, load=4.0),
    ModelSpec("qwen2.5:14b", 0.25, prefill_per_token=0.0008, tpot=0.045, load=7.0),
    ModelSpec("mistral:7b", 0.18, prefill_per_token=0.0004, tpot=0.022, load=4.0),
    ModelSpec("phi3:3.8b", 0.12, prefill_per_token=0.0002, tpot=0.012, load=2.5),
)
COMPARED = ("round_robin", "least_outstanding", "power_of_two", "residency_first",
            "expected_wait", "random")
HERD_BACKENDS = 32
HERD_REPLICAS = 16
HERD_LOAD = 0.7
HERD_COMPARED = ("random", "power_of_two", "residency_first", "expected_wait_pool3",
                 "expected_wait")
THEORY_RANDOM = 10.0  # M/M/1 at 0.9: 1 / (1 - 0.9)
THEORY_TWO = sum(0.9 ** (2**i - 2) for i in range(1, 12))  # supermarket model, d = 2: 2.61


@dataclass(slots=True)
class Validation:
    servers: int
    seeds: int
    requests: int
    random: tuple[float, float]  # mean time in system (service times), CI half-width
    two: tuple[float, float]


def validate(quick: bool = False) -> Validation:
    """Identical exponential servers at 90% load, state seen live: random vs two choices."""
    servers, seeds, requests = (40, 3, 12_000) if quick else (100, 5, 80_000)
    # Both start from the M/M/1 equilibrium; two choices drain the excess (about 6 requests
    # per server at 0.1 per unit time) within the 150 service times of warm-up.
    scn = Scenario(speeds=(1.0,) * servers, models=(ModelSpec("m", 1.0, 0.0, 0.0, 0.0),),
                   load=0.9, resident_limit=1, poll_interval=0.0, requests=requests,
                   warmup=round(150 * 0.9 * servers), exponential=True)
    rnd = [simulate(scn, "random", s).mean_sojourn for s in range(seeds)]
    two = [simulate(scn, "power_of_two", s).mean_sojourn for s in range(seeds)]
    return Validation(servers, seeds, requests, mean_ci(rnd), mean_ci(two))


def fleet(load: float, arrivals: str = "poisson", requests: int = 3000) -> Scenario:
    """The heterogeneous fleet with stale metrics: what the policies are compared on."""
    return Scenario(speeds=FLEET_SPEEDS, models=FLEET_MODELS, load=load, arrivals=arrivals,
                    requests=requests, warmup=requests // 4)


def herd(replicas: int, aligned: bool = True, requests: int = 4000,
         backends: int = HERD_BACKENDS, load: float = HERD_LOAD,
         mean_tokens: float = 150.0, shared: bool = False) -> Scenario:
    """Equal backends, one resident model, several router replicas: where herding shows.
    `shared`: the replicas share their in-flight counts (the router's shared_state)."""
    return Scenario(speeds=(1.0,) * backends, models=FLEET_MODELS[:1], load=load,
                    resident_limit=1, requests=requests, warmup=requests // 4,
                    replicas=replicas, aligned_polls=aligned, mean_tokens=mean_tokens,
                    shared_in_flight=shared)


@dataclass(slots=True)
class Cell:
    arrivals: str
    load: float
    policy: str
    runs: list[RunResult] = field(default_factory=list)
    setting: str = ""  # the herd table's scenario

    def stat(self, name: str) -> tuple[float, float]:
        return mean_ci([getattr(r, name) for r in self.runs])


def compare(loads: Sequence[float], arrivals: Sequence[str], seeds: Sequence[int] | int,
            requests: int, policies: Sequence[str] = COMPARED) -> list[Cell]:
    seed_list = range(seeds) if isinstance(seeds, int) else seeds
    cells = []
    for pattern in arrivals:
        for load in loads:
            scn = fleet(load, pattern, requests)
            for name in policies:
                cell = Cell(pattern, load, name)
                cell.runs = [simulate(scn, factory(name), s) for s in seed_list]
                cells.append(cell)
    return cells


# (label, replicas, polls in phase, mean output tokens, in-flight counts shared). Answers of
# 150 tokens keep a backend about 4 s, eight polls; of 15 tokens about 0.6 s, about one poll:
# there most of the fleet changes between two polls, and herding bites hardest.
IN_PHASE = f"{HERD_REPLICAS} replicas, polls in phase"
SHARED = IN_PHASE + ", in flight shared"
HERD_SETTINGS = tuple(
    (f"{tokens} tokens, {label}", replicas, aligned, tokens, shared)
    for tokens in (150, 15)
    for label, replicas, aligned, shared in (
        ("1 router", 1, True, False),
        (IN_PHASE, HERD_REPLICAS, True, False),
        (f"{HERD_REPLICAS} replicas, own poll phases", HERD_REPLICAS, False, False),
        (SHARED, HERD_REPLICAS, True, True)))


def compare_herd(seeds: Sequence[int], requests: int,
                 policies: Sequence[str] = HERD_COMPARED,
                 settings: Sequence[tuple[str, int, bool, int, bool]] = HERD_SETTINGS
                 ) -> list[Cell]:
    cells = []
    for label, replicas, aligned, tokens, shared in settings:
        scn = herd(replicas, aligned, requests, mean_tokens=tokens, shared=shared)
        for name in policies:
            cell = Cell("poisson", HERD_LOAD, name, setting=label)
            cell.runs = [simulate(scn, factory(name), s) for s in seeds]
            cells.append(cell)
    return cells


def paired(a: Cell, b: Cell, stat: str) -> tuple[float, float]:
    """Mean and 95% CI of (a - b) over the seeds both ran (the same traffic)."""
    return mean_ci([getattr(x, stat) - getattr(y, stat)
                    for x, y in zip(a.runs, b.runs, strict=True)])


# -- tuning --------------------------------------------------------------------------------------

TUNE_GRID = {"cold_penalty": (2.0, 4.0, 8.0, 16.0), "slack": (1.0, 1.1, 1.25, 1.5),
             "slack_seconds": (0.0, 0.05, 0.5)}
TUNE_LOADS = (0.3, 0.6, 0.9)


@dataclass(slots=True)
class Tuned:
    settings: dict[str, float]
    fleet: float  # mean over the fleet's cells of the smaller relative gain over residency_first
    herd: float  # mean over the many-replica settings of the relative gain over power_of_two
    score: float  # the mean over all those cells


def _mean_of(scn: Scenario, make: Callable[[], Policy], seeds: Sequence[int],
             stat: str) -> float:
    return statistics.fmean(getattr(simulate(scn, make, seed), stat) for seed in seeds)


def tune(seeds: Sequence[int] = TUNE_SEEDS, requests: int = 2000,
         loads: Sequence[float] = TUNE_LOADS, herd_seeds: Sequence[int] = TUNE_SEEDS[:4],
         herd_requests: int = 1500) -> list[Tuned]:
    """Every grid point on the tuning seeds, best first. A fleet cell scores the smaller of
    the two relative gains over residency_first (goodput, p99 TTFT: the goal is to beat it on
    both); a many-replica setting, the relative gain in mean TTFT over power_of_two. The
    score is the mean over all of them. (The many-replica fleet has every model resident:
    the cold penalty does not matter there, so it runs once per slack.)"""
    fleets = {(p, load): fleet(load, p, requests) for p in ("poisson", "bursty")
              for load in loads}
    base = {key: (_mean_of(scn, POLICIES["residency_first"], seeds, "goodput"),
                  _mean_of(scn, POLICIES["residency_first"], seeds, "p99_ttft"))
            for key, scn in fleets.items()}
    # Without shared counts: those are what the estimate of other replicas' sends is for.
    herds = [herd(replicas, aligned, herd_requests, mean_tokens=tokens)
             for _, replicas, aligned, tokens, shared in HERD_SETTINGS if not shared]
    herd_base = [_mean_of(scn, POLICIES["power_of_two"], herd_seeds, "mean_ttft")
                 for scn in herds]
    herd_gain: dict[tuple[float, float], list[float]] = {}
    out = []
    names = list(TUNE_GRID)
    for values in itertools.product(*TUNE_GRID.values()):
        settings = dict(zip(names, values, strict=True))
        slack = (settings["slack"], settings["slack_seconds"])
        make = functools.partial(ExpectedWait, *slack, settings["cold_penalty"])
        gains = []
        for key, scn in fleets.items():
            gp0, p990 = base[key]
            gp = _mean_of(scn, make, seeds, "goodput")
            p99 = _mean_of(scn, make, seeds, "p99_ttft")
            gains.append(min((gp - gp0) / gp0, (p990 - p99) / p990))
        if slack not in herd_gain:
            herd_gain[slack] = [(b - _mean_of(scn, make, herd_seeds, "mean_ttft")) / b
                                for scn, b in zip(herds, herd_base, strict=True)]
        both = gains + herd_gain[slack]
        out.append(Tuned(settings, statistics.fmean(gains), statistics.fmean(herd_gain[slack]),
                         statistics.fmean(both)))
    return sorted(out, key=lambda t: -t.score)


# -- the report ----------------------------------------------------------------------------------


def _fmt(stat: tuple[float, float], digits: int = 2) -> str:
    mean, half = stat
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _clear(stat: tuple[float, float]) -> str:
    """Is the paired difference's 95% interval clear of zero, and on which side?"""
    mean, half = stat
    if math.isnan(half) or abs(mean) <= half:
        return "not clear"
    return "better" if mean > 0 else "worse"


def _fleet_tables(cells: list[Cell]) -> list[str]:
    lines: list[str] = []
    patterns = sorted({c.arrivals for c in cells}, key=["poisson", "bursty"].index)
    for pattern in patterns:
        lines += [f"### {pattern.capitalize()} arrivals", "",
                  "| load | policy | p50 TTFT | p99 TTFT | goodput req/s | in SLO % | cold /1k |",
                  "|---|---|---|---|---|---|---|"]
        for c in cells:
            if c.arrivals != pattern:
                continue
            slo = c.stat("slo_fraction")
            lines.append(
                f"| {c.load:.0%} | {c.policy} | {_fmt(c.stat('p50_ttft'))} | "
                f"{_fmt(c.stat('p99_ttft'), 1)} | {_fmt(c.stat('goodput'), 3)} | "
                f"{slo[0] * 100:.1f} ± {slo[1] * 100:.1f} | {_fmt(c.stat('cold_per_1k'), 0)} |")
        lines.append("")
    return lines


def herd_table(cells: list[Cell]) -> list[str]:
    lines = ["| setting | policy | mean TTFT | p99 TTFT | mean / power_of_two's |",
             "|---|---|---|---|---|"]
    by = {(c.setting, c.policy): c for c in cells}
    for c in cells:
        two = by.get((c.setting, "power_of_two"))
        ratio = c.stat("mean_ttft")[0] / two.stat("mean_ttft")[0] if two else math.nan
        lines.append(f"| {c.setting} | {c.policy} | {_fmt(c.stat('mean_ttft'), 3)} | "
                     f"{_fmt(c.stat('p99_ttft'), 2)} | {ratio:.2f} |")
    return [*lines, ""]


def herd_verdict(cells: list[Cell]) -> list[str]:
    """The many-replica goals for expected_wait, paired by seed (the arrivals are the same
    for every policy and every number of replicas under one seed)."""
    by = {(c.setting, c.policy): c for c in cells}
    out = ["| answers | in flight | mean TTFT, 16 replicas in phase | power_of_two's (same) | "
           "1 router's | EW16 - 1.1 x P2 | | EW16 - 1.1 x EW1 | |",
           "|---|---|---|---|---|---|---|---|---|"]
    for tokens in sorted({int(c.setting.split()[0]) for c in cells}, reverse=True):
        prefix = f"{tokens} tokens, "
        one = by.get((prefix + "1 router", "expected_wait"))
        for setting, counts in ((IN_PHASE, "per replica"), (SHARED, "shared")):
            many = by.get((prefix + setting, "expected_wait"))
            two = by.get((prefix + setting, "power_of_two"))
            if many is None or two is None or one is None:
                continue
            d_two = mean_ci([m.mean_ttft - 1.1 * t.mean_ttft
                             for m, t in zip(many.runs, two.runs, strict=True)])
            d_one = mean_ci([m.mean_ttft - 1.1 * o.mean_ttft
                             for m, o in zip(many.runs, one.runs, strict=True)])
            out.append(f"| {tokens} tokens | {counts} | {_fmt(many.stat('mean_ttft'), 3)} | "
                       f"{_fmt(two.stat('mean_ttft'), 3)} | {_fmt(one.stat('mean_ttft'), 3)} | "
                       f"{_fmt(d_two, 3)} | {_met(d_two)} | {_fmt(d_one, 3)} | "
                       f"{_met(d_one)} |")
    return [*out, ""]


def _met(stat: tuple[float, float]) -> str:
    """A goal `x <= 0` from a paired difference: met (interval below 0), missed (above)."""
    mean, half = stat
    if math.isnan(half) or abs(mean) <= half:
        return "not clear"
    return "met" if mean < 0 else "missed"


def verdict(cells: list[Cell], against: Sequence[str] = ("residency_first",
                                                          "least_outstanding")) -> list[str]:
    """Paired over seeds (same traffic): does expected_wait beat each baseline?"""
    out = ["| arrivals | load | vs | Δ p99 TTFT (s) | | Δ goodput (req/s) | |",
           "|---|---|---|---|---|---|---|"]
    by_key = {(c.arrivals, c.load, c.policy): c for c in cells}
    for (pattern, load, name), ew in by_key.items():
        if name != "expected_wait":
            continue
        for base in against:
            other = by_key.get((pattern, load, base))
            if other is None:
                continue
            d99 = paired(other, ew, "p99_ttft")
            dgp = paired(ew, other, "goodput")
            out.append(f"| {pattern} | {load:.0%} | {base} | {_fmt(d99, 1)} | {_clear(d99)} | "
                       f"{_fmt(dgp, 3)} | {_clear(dgp)} |")
    return [*out, ""]


def render(validation: Validation, cells: list[Cell], seeds: Sequence[int] | int,
           requests: int, command: str, seconds: float, herd_cells: Sequence[Cell] = (),
           wall: float | None = None) -> str:
    v = validation
    seed_list = list(range(seeds) if isinstance(seeds, int) else seeds)
    f = fleet(0.9, requests=requests)
    timing = f"{seconds:.0f} s of CPU" + (f", {wall:.0f} s wall" if wall is not None else "")
    ew = ExpectedWait()
    lines = [
        "# Routing policies: simulation results",
        "",
        f"Made by `{command}` in {timing} (one core). Mean ± 95% CI over seeds "
        f"{_seeds(seed_list)} (the report seeds). expected_wait's settings (cold_penalty "
        f"{ew.cold_penalty:g}, slack {ew.slack:g}, slack_seconds {ew.slack_seconds:g}) were "
        f"chosen by `--tune` on seeds {_seeds(list(TUNE_SEEDS))}, which no table here uses "
        "(its table: `tuning.md`).",
        "",
        "## Validation against theory",
        "",
        f"{v.servers} identical servers, exponential service (mean 1), Poisson arrivals at 90% "
        f"load, state seen live; {v.requests:,} measured requests per run, {v.seeds} seeds. "
        "Mean time in system, in service times:",
        "",
        "| policy | simulated | theory (N → ∞) |",
        "|---|---|---|",
        f"| random | {_fmt(v.random)} | {THEORY_RANDOM:.2f} (M/M/1) |",
        f"| power_of_two | {_fmt(v.two)} | {THEORY_TWO:.2f} (supermarket model, d = 2) |",
        "",
        "## Heterogeneous fleet, stale metrics",
        "",
        f"Backends at speeds {', '.join(f'{s:g}x' for s in FLEET_SPEEDS)}; models (popularity, "
        "prefill per prompt token / TPOT at 1x, cold load): "
        + "; ".join(f"{m.name} ({m.popularity:.0%}, {m.prefill_per_token * 1000:g} ms / "
                    f"{m.tpot * 1000:g} ms, {m.load:g} s)" for m in FLEET_MODELS)
        + f". Sequential per model, at most {f.resident_limit} resident per backend (LRU), "
        f"output tokens ~ Gamma(2) with mean {f.mean_tokens:g}, prompt tokens log-normal with "
        f"mean {f.mean_prompt_tokens:g} (sigma {f.prompt_sigma:g}; the router is told each within "
        f"±25%), state polled every {f.poll_interval:g} s. "
        f"{requests:,} measured requests per run after a warm-up, {len(seed_list)} seeds, the "
        "same traffic for every policy under one seed. Load is the offered fraction of the "
        "fleet's compute (cold loads come on top). TTFT in seconds; goodput = requests per "
        f"second whose TTFT met the SLO of {f.slo:g} s (in SLO = their share); cold = model "
        "loads per 1,000 requests.",
        "",
        *_fleet_tables(cells),
        "## expected_wait against the baselines, paired by seed",
        "",
        "Difference (baseline - expected_wait) in p99 TTFT and (expected_wait - baseline) in "
        "goodput: positive = expected_wait better; `better` / `worse` = the paired 95% "
        "interval is clear of zero on that side, `not clear` = it is not.",
        "",
        *verdict(cells),
    ]
    if herd_cells:
        lines += [
            "## Many router replicas",
            "",
            f"{HERD_BACKENDS} equal backends (speed 1x, {FLEET_MODELS[0].name} resident on "
            f"each, served one at a time), Poisson arrivals at {HERD_LOAD:.0%} load, answers "
            "of 150 tokens on average (a backend busy about 4 s a request, 8 polls) or 15 "
            "(about 0.6 s, one poll), each arrival to a router replica at random; each replica "
            "has its own policy instance and counts. Polls in phase: every replica reads every "
            "sidecar at the same instants (the herd's worst case); own poll phases: each "
            "(replica, sidecar) pair on its own; in flight shared: polls in phase, and the "
            "replicas share their in-flight counts at once (the router's `shared_state` in "
            "Redis; without it, each replica estimates the others' sends since the poll). "
            "`expected_wait_pool3` is the estimate with the old pick (a pool of at most 3 "
            "within 1.25 x best + 50 ms, "
            f"ties in config order). {len(seed_list)} seeds, TTFT in seconds.",
            "",
            *herd_table(list(herd_cells)),
            "The goals, paired by seed: expected_wait's mean TTFT with 16 replicas polling "
            "in phase at most 1.1 x power_of_two's there (EW16 - 1.1 x P2 below 0), and at "
            "most 1.1 x its own with one router (EW16 - 1.1 x EW1 below 0):",
            "",
            *herd_verdict(list(herd_cells)),
        ]
    return "\n".join(lines) + "\n"


def _seeds(seeds: list[int]) -> str:
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _tune_report(results: list[Tuned], seconds: float) -> str:
    lines = ["| " + " | ".join(TUNE_GRID) + " | fleet | many replicas | score |",
             "|" + "---|" * (len(TUNE_GRID) + 3)]
    for t in results:
        lines.append("| " + " | ".join(f"{t.settings[k]:g}" for k in TUNE_GRID)
                     + f" | {t.fleet:+.3f} | {t.herd:+.3f} | {t.score:+.3f} |")
    return (f"Tuning on seeds {_seeds(list(TUNE_SEEDS))} (the many-replica settings on the "
            f"first 4 of them), fleet loads {', '.join(f'{x:.0%}' for x in TUNE_LOADS)}, "
            f"Poisson and bursty, and every many-replica setting ({seconds:.0f} s wall). "
            "fleet = mean over its cells of the smaller relative gain over residency_first "
            "(in goodput, in p99 TTFT); many replicas = mean relative gain in mean TTFT over "
            "power_of_two; score = the mean over all those cells.\n\n"
            + "\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a tiny run; prints, writes nothing")
    parser.add_argument("--tune", action="store_true",
                        help="grid-search expected_wait's settings on the tuning seeds")
    parser.add_argument("--seeds", type=int, default=len(REPORT_SEEDS))
    parser.add_argument("--requests", type=int, default=3000, help="measured per run")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.md"))
    args = parser.parse_args(argv)
    started, wall = time.process_time(), time.perf_counter()
    if args.tune:
        text = _tune_report(tune(), time.perf_counter() - wall)
        args.out.with_name("tuning.md").write_text("# expected_wait's settings: tuning\n\n"
                                                    "Made by `python -m benchmarks.routing."
                                                    "simulate --tune`.\n\n" + text)
        sys.stdout.write(text)
        return 0
    validation = validate(quick=args.quick)
    if args.quick:
        seeds: Sequence[int] = REPORT_SEEDS[:2]
        requests = 600
        cells = compare([0.9], ["poisson"], seeds, requests)
        herd_cells = compare_herd(seeds, 1000, ("power_of_two", "expected_wait"))
    else:
        seeds, requests = REPORT_SEEDS[:args.seeds], args.requests
        cells = compare([0.3, 0.6, 0.9, 1.1], ["poisson", "bursty"], seeds, requests)
        herd_cells = compare_herd(seeds, 3000)
    command = "python -m benchmarks.routing.simulate" + (" --quick" if args.quick else "")
    if not args.quick and (args.seeds != len(REPORT_SEEDS) or args.requests != 3000):
        command += f" --seeds {args.seeds} --requests {args.requests}"
    text = render(validation, cells, seeds, requests, command, time.process_time() - started,
                  herd_cells, time.perf_counter() - wall)
    if not args.quick:
        args.out.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
