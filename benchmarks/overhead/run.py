"""What a proxy costs: llmtap (telemetry on and off), nginx and LiteLLM's proxy, each against
going direct, side by side in one run on this machine.

    .venv/bin/python -m benchmarks.overhead.run            # the full run (about 9 minutes)
    .venv/bin/python -m benchmarks.overhead.run --quick    # a smoke run (under a minute)

One synthetic upstream (`llmtap simulate`, seeded, its own process); one open-loop load
generator process per measurement (benchmarks/overhead/loadgen.py); every proxy started once
and kept up; nginx from Debian (`proxy_buffering off`, one worker) and LiteLLM's proxy from
PyPI (in its own virtualenv under benchmarks/overhead/tmp/, pass-through endpoints) are
installed by this command when missing. Pinning is described in targets.py.

The full run ends with the CPU section (cpu.py: CPU per request and per relayed chunk against
a Go upstream, about 2.5 minutes; `python -m benchmarks.overhead.cpu` runs it alone).

Writes benchmarks/overhead/results/results.md, results.json, cpu.md, cpu.json and
added-p99-ttft.png (the quick run, which skips the CPU section: tmp/results.md and
tmp/results.json). Exits 1 if any chunk was lost or reordered, or any
request failed, through llmtap or nginx: that is a failure, not a figure (LiteLLM's are figures).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from benchmarks.overhead import targets as tg

if TYPE_CHECKING:
    from benchmarks.overhead.cpu import Run as CpuRun

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TMP = HERE / "tmp"
SIM_TTFT = 0.05
SIM_TPS = 50.0
ADDED_P99_LIMIT = 0.050  # the sweep stops for a proxy once its added p99 TTFT passes this
WITHIN = 0.005  # "max concurrency sustained within 5 ms added p99"


@dataclass(frozen=True)
class Scenario:
    name: str
    dialect: str
    concurrency: int  # streams in flight on average (open loop: rate = concurrency / service)
    tokens: int
    seconds: float  # how long requests keep starting
    stream: bool = True
    burst: int = 0  # > 0: this many requests started all at once
    rounds: int = 1  # bursts measured one after another, their requests pooled
    model: str = "sim-small"

    @property
    def rate(self) -> float:
        if self.burst:
            return 0.0
        if self.concurrency == 1:  # one at a time, with a breath between: never two in flight
            return 1.0 / (self.service + 0.1)
        return self.concurrency / self.service

    @property
    def count(self) -> int:
        return self.burst or max(2, round(self.rate * self.seconds))

    @property
    def service(self) -> float:
        return SIM_TTFT + self.tokens / SIM_TPS


@dataclass
class Measurement:
    target: str
    scenario: Scenario
    results: list[dict[str, Any]]
    cpu: float  # seconds of CPU the target's processes used during the run
    peak_rss: int
    scrapes: int = 0
    lost: int = 0
    mismatched: int = 0
    frames: int = field(init=False)

    def __post_init__(self) -> None:
        self.frames = sum(len(r["pieces"]) for r in self.results)

    def values(self, key: str) -> list[float]:
        if key == "gaps":
            return [g for r in self.results for g in r["gaps"]]
        return [r[key] for r in self.results if r[key] is not None]

    def added(self, base: Measurement, key: str, q: float) -> float:
        """What this target adds to the q-quantile of `key` over `base` (direct), seconds."""
        return percentile(self.values(key), q) - percentile(base.values(key), q)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if r["status"] != 200)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# ------------------------------------------------------------------------------ setting up


def ensure_nginx() -> None:
    if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
        return
    print("installing nginx-light (Debian)", flush=True)
    subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y "
                   "-qq --no-install-recommends nginx-light >/dev/null", shell=True, check=True)


def ensure_litellm() -> Path:
    """LiteLLM's proxy in a virtualenv of its own: its pins must not touch llmtap's."""
    venv = TMP / "litellm-venv"
    python = venv / "bin" / "python"
    if not (venv / "bin" / "litellm").exists():
        print("installing litellm[proxy] into benchmarks/overhead/tmp/litellm-venv", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "litellm[proxy]"],
                       check=True)
    return python


def ensure_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"],
                       check=True)


# ------------------------------------------------------------------------------ measuring


async def _scrape(session: aiohttp.ClientSession, url: str, every: float, until: asyncio.Event
                  ) -> int:
    count = 0
    while not until.is_set():
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url + "/metrics") as response:
                await response.read()
                count += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), every)
    return count


async def _sample_rss(pids: list[int], until: asyncio.Event) -> int:
    peak = tg.rss_bytes(pids)
    while not until.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), 0.1)
        peak = max(peak, tg.rss_bytes(pids))
    return peak


async def measure(target: tg.Target, scenario: Scenario, first: int, pin: bool,
                  scrape_every: float | None = None) -> Measurement:
    out = TMP / f"load-{target.name}-{scenario.name}.json"
    argv = [sys.executable, "-m", "benchmarks.overhead.loadgen", "--url", target.url,
            "--dialect", scenario.dialect, "--rate", str(scenario.rate),
            "--count", str(scenario.count), "--first", str(first),
            "--tokens", str(scenario.tokens), "--model", scenario.model, "--out", str(out),
            "--warmup", str(min(32, max(1, scenario.concurrency, scenario.burst)))]
    if not scenario.stream:
        argv.append("--no-stream")
    pids = target.pids()
    cpu_before = tg.cpu_seconds(pids)
    done = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        rss = asyncio.create_task(_sample_rss(pids, done))
        scrapes = None
        if scrape_every is not None and target.admin:
            scrapes = asyncio.create_task(_scrape(session, target.admin, scrape_every, done))
        loadgen = await asyncio.create_subprocess_exec(
            *argv, cwd=tg.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=(lambda: tg.pin_to(tg.CLIENT_CPU)) if pin else None)
        _, stderr = await loadgen.communicate()
        done.set()
        peak = await rss
        scraped = await scrapes if scrapes is not None else 0
    if loadgen.returncode:
        raise RuntimeError(f"load generator failed against {target.name}:\n{stderr.decode()}")
    cpu = tg.cpu_seconds(pids) - cpu_before
    return Measurement(target.name, scenario, orjson.loads(out.read_bytes()), cpu, peak,
                       scraped)


async def measure_rounds(target: tg.Target, scenario: Scenario, first: int, pin: bool
                         ) -> Measurement:
    """The scenario `rounds` times over (/metrics scraped each second), pooled."""
    parts = [await measure(target, scenario, first + i * 1000, pin, scrape_every=1.0)
             for i in range(scenario.rounds)]
    if len(parts) == 1:
        return parts[0]
    pooled = [r for m in parts for r in m.results]
    return Measurement(target.name, scenario, pooled, sum(m.cpu for m in parts),
                       max(m.peak_rss for m in parts), sum(m.scrapes for m in parts))


def compare(reference: Measurement, other: Measurement) -> None:
    """Chunks lost or reordered: each answer against the direct answer to the same prompt."""
    expected = {r["index"]: r["pieces"] for r in reference.results}
    for result in other.results:
        want = expected.get(result["index"])
        got = result["pieces"]
        if want is None or got == want:
            continue
        other.mismatched += 1
        other.lost += max(0, len(want) - len(got))


# ------------------------------------------------------------------------------ the run


def scenarios(quick: bool) -> list[Scenario]:
    if quick:
        return [Scenario("ndjson-4", "ollama", 4, 10, 1.0),
                Scenario("sse-4", "openai", 4, 10, 1.0),
                Scenario("burst-ndjson", "ollama", 0, 4, 0, stream=False, burst=20)]
    out: list[Scenario] = []
    for dialect, framing in (("ollama", "ndjson"), ("openai", "sse")):
        out += [Scenario(f"{framing}-1", dialect, 1, 5, 8.0),  # short answers: more samples
                Scenario(f"{framing}-16", dialect, 16, 50, 4.0),
                Scenario(f"{framing}-64", dialect, 64, 50, 4.0),
                # DESIGN.md's burst: 64 streams arriving together, five times over (one
                # burst's p99 is its worst request or two: pooled, the figure settles).
                Scenario(f"burst64-{framing}", dialect, 64, 50, 0, burst=64, rounds=5),
                Scenario(f"burst-{framing}", dialect, 0, 8, 0, stream=False, burst=200)]
    return out


SWEEP = (8, 32, 64, 128, 192, 256)


async def run(args: argparse.Namespace) -> int:
    TMP.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    if pin:
        tg.pin_to(tg.CLIENT_CPU)
    ensure_nginx()
    litellm_python = None if args.skip_litellm else ensure_litellm()
    if not args.quick:
        ensure_matplotlib()
    started = time.monotonic()

    from tests.otlp import HTTPReceiver  # the tests' real OTLP/HTTP receiver

    upstream = tg.simulator(TMP, pin)
    proxies: list[tg.Target] = []
    try:
        async with HTTPReceiver() as receiver:
            otlp = f"http://127.0.0.1:{receiver.port}"
            proxies.append(tg.llmtap(TMP, upstream.url, True, otlp, pin))
            proxies.append(tg.llmtap(TMP, upstream.url, False, otlp, pin))
            if args.before:  # another checkout's llmtap, all telemetry on, in the same run
                proxies.append(tg.llmtap(TMP, upstream.url, True, otlp, pin,
                                         name="llmtap-before", root=Path(args.before)))
            proxies.append(tg.nginx(TMP, upstream.url, pin))
            if litellm_python is not None:
                proxies.append(tg.litellm(TMP, upstream.url, litellm_python, pin))
            direct = tg.Target("direct", upstream.url)
            everyone = [direct, *proxies]
            print(f"up: {', '.join(t.name for t in everyone)} "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
            warm = Scenario("warm-up", "ollama", 4, 5, 0.5)
            for target in everyone:
                await measure(target, warm, 10_000_000, pin)
                await measure(target, Scenario("warm-up", "openai", 4, 5, 0.5), 10_000_000, pin)

            table: dict[str, dict[str, Measurement]] = {}
            for n, scenario in enumerate(scenarios(args.quick)):
                first = n * 100_000
                row = table[scenario.name] = {}
                for target in everyone:
                    row[target.name] = await measure_rounds(target, scenario, first, pin)
                    if target is not direct:
                        compare(row["direct"], row[target.name])
                print(f"[{time.monotonic() - started:4.0f} s] {scenario.name}: added p99 TTFT "
                      f"{summary_line(row)}", flush=True)

            sweep: dict[str, dict[int, Measurement]] = {t.name: {} for t in everyone}
            if not args.quick:
                live = list(proxies)
                for level in SWEEP:
                    if not live:
                        break
                    scenario = Scenario(f"sweep-{level}", "ollama", level, 50, 3.0)
                    first = 10_000_000 + level * 100_000
                    base = sweep["direct"][level] = await measure(direct, scenario, first, pin)
                    for target in list(live):
                        m = sweep[target.name][level] = await measure(target, scenario, first,
                                                                      pin, scrape_every=1.0)
                        compare(base, m)
                        added = m.added(base, "ttft", .99)
                        # llmtap stays in to the top level, whatever it adds: its memory at
                        # 256 streams is one of the targets.
                        if added > ADDED_P99_LIMIT and not target.name.startswith("llmtap"):
                            live.remove(target)
                    print(f"[{time.monotonic() - started:4.0f} s] sweep {level}: " + ", ".join(
                        f"{name} {fmt_ms(added_p99(sweep, name, level))}"
                        for name in sweep if name != "direct" and level in sweep[name]),
                        flush=True)
            stall = None if args.quick else await scrape_stall(pin)
            spans = len(receiver.spans)
    finally:
        for target in proxies:
            if target.child is not None:
                target.child.stop()
        if upstream.child is not None:
            upstream.child.stop()

    cpu_run = None
    if not args.quick and not args.skip_cpu:
        # After every process above is stopped: the CPU section wants core 1 to itself.
        from benchmarks.overhead import cpu  # cpu imports this module: not at the top

        cpu_run = await cpu.measure_all(cpu.FULL, pin)
        command = ".venv/bin/python -m benchmarks.overhead.run"
        cpu.write(cpu_run, cpu.render(cpu_run, command), RESULTS / "cpu.md")

    elapsed = time.monotonic() - started
    report = render(table, sweep, stall, spans, args, elapsed, pin, cpu_run)
    # The quick run is a smoke test: its figures go to tmp/, never over the published ones.
    out = TMP if args.quick else RESULTS
    (out / "results.md").write_text(report)
    write_json(table, sweep, stall, out / "results.json")
    if not args.quick:
        plot(sweep, RESULTS / "added-p99-ttft.png")
        publish(report)
    print(report)
    # What llmtap (and the nginx floor) relays must be complete; what the peer loses or
    # fails is one of its figures.
    def bad(target: str, m: Measurement) -> bool:
        return target != "litellm" and bool(m.lost or m.mismatched or m.failed)

    broken = [(s, t) for s, row in table.items() for t, m in row.items() if bad(t, m)]
    broken += [(f"sweep-{lvl}", t) for t, levels in sweep.items()
               for lvl, m in levels.items() if bad(t, m)]
    if cpu_run is not None:
        broken += [("cpu", failure) for failure in cpu_run.failed]
    if broken:
        print(f"FAILED: chunks lost, reordered or requests failed in {broken}", file=sys.stderr)
        return 1
    return 0


async def scrape_stall(pin: bool) -> dict[str, float]:
    """Live streams while /metrics renders 100 models x every series, back to back.

    An unseeded simulator stamps each Ollama frame with the wall clock, so each frame's
    upstream-to-client delay is measured directly; the stall is how much the worst one grows
    when the scrapes run, against the same load without them."""
    models = ",".join(f"model-{i:03d}" for i in range(100))
    sim = tg.Child("stall-simulator", [sys.executable, "-m", "exporter", "simulate",
                                       "--listen", f"127.0.0.1:{(port := tg.free_port())}",
                                       "--models", models, "--parallel", "64",
                                       "--tokens-per-second", "50", "--ttft", "0.01"],
                   TMP, cpu=tg.CLIENT_CPU if pin else None)
    sim.start()
    upstream = f"http://127.0.0.1:{port}"
    sim.wait_http(upstream + "/api/version")
    tap = tg.llmtap(TMP, upstream, True, "", pin, name="stall-llmtap")
    try:
        async with aiohttp.ClientSession() as session:
            # Every series for every model: chat and generate, streamed and whole, embeddings,
            # an error answer (a 400), through both dialects.
            async def fill(model: str) -> None:
                for path, body in (
                    ("/api/chat", {"model": model, "messages": [{"role": "user",
                                                                 "content": "hi"}],
                                   "options": {"num_predict": 3}}),
                    ("/api/generate", {"model": model, "prompt": "hi", "stream": False,
                                       "options": {"num_predict": 3}}),
                    ("/api/embed", {"model": model, "input": "hi"}),
                    ("/v1/chat/completions", {"model": model, "max_tokens": 3,
                                              "messages": [{"role": "user", "content": "hi"}]}),
                    ("/api/chat", {"model": model, "messages": "not a list"}),
                ):
                    async with session.post(tap.url + path, json=body) as response:
                        await response.read()

            for start in range(0, 100, 20):
                await asyncio.gather(*(fill(f"model-{i:03d}") for i in range(start, start + 20)))
            async with session.get(tap.admin + "/metrics") as response:
                text = await response.text()
            series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
            (TMP / "metrics-100-models.txt").write_text(text)
        scenario = Scenario("stall", "ollama", 16, 50, 5.0, model="model-042")
        quiet = await measure(tap, scenario, 20_000_000, pin)
        busy = await measure(tap, scenario, 20_000_000, pin, scrape_every=0.0)
        started = time.perf_counter()
        async with aiohttp.ClientSession() as session:
            for _ in range(5):
                async with session.get(tap.admin + "/metrics") as response:
                    await response.read()
        render_ms = (time.perf_counter() - started) / 5 * 1000
    finally:
        tap.child.stop()  # type: ignore[union-attr]
        sim.stop()

    def delays(m: Measurement) -> list[float]:
        return [d for r in m.results for d in r["delays"]]

    return {"series": series, "scrapes": busy.scrapes, "render_ms": render_ms,
            "quiet_max_ms": max(delays(quiet)) * 1000,
            "busy_max_ms": max(delays(busy)) * 1000,
            "quiet_p99_ms": percentile(delays(quiet), .99) * 1000,
            "busy_p99_ms": percentile(delays(busy), .99) * 1000}


# ------------------------------------------------------------------------------ reporting


def fmt_ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:+.2f}"


def added_p99(sweep: dict[str, dict[int, Measurement]], name: str, level: int) -> float:
    return sweep[name][level].added(sweep["direct"][level], "ttft", .99)


def summary_line(row: dict[str, Measurement]) -> str:
    base = row["direct"]
    return ", ".join(
        f"{name} {fmt_ms(m.added(base, 'ttft', .99))}"
        for name, m in row.items() if name != "direct")


def render(table: dict[str, dict[str, Measurement]], sweep: dict[str, dict[int, Measurement]],
           stall: dict[str, float] | None, spans: int, args: argparse.Namespace,
           elapsed: float, pin: bool, cpu_run: CpuRun | None = None) -> str:
    command = "`.venv/bin/python -m benchmarks.overhead.run" + \
        (" --quick`" if args.quick else "`")
    lines = [
        "# Proxy overhead, side by side",
        "",
        f"Command: {command}, {time.strftime('%Y-%m-%d')}, {elapsed:.0f} s. Machine: "
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu_model()}), Python "
        f"{platform.python_version()}, " + ("pinned: client and upstream on core 0, proxy on "
                                             "core 1." if pin else "not pinned."),
        "Upstream: `llmtap simulate`, 50 ms to first token, 50 tokens/s per stream, seeded. "
        "Open-loop arrivals at concurrency / service time. Added = proxy - direct in the same "
        "run (ms; a negative figure is noise). CPU = the proxy's own processes, per 1,000 "
        "content chunks relayed. llmtap-full: metrics scraped every second, every request "
        "traced to a live OTLP receiver, access log to a file; llmtap-off: none of those.",
        "",
        "| scenario | proxy | TTFT p50 | TTFT p99 | added TTFT p50 | added TTFT p99 | "
        "gap p50 | gap p99 | added gap p50 | added gap p99 | lost/reordered/failed | "
        "CPU s / 1k chunks | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        base = row["direct"]
        for target, m in row.items():
            t50, t99 = percentile(m.values("ttft"), .5), percentile(m.values("ttft"), .99)
            g50, g99 = percentile(m.values("gaps"), .5), percentile(m.values("gaps"), .99)
            if target == "direct":
                added = ["", "", "", ""]
                extra = ["", "", ""]
            else:
                added = [fmt_ms(m.added(base, key, q))
                         for key, q in (("ttft", .5), ("ttft", .99), ("gaps", .5), ("gaps", .99))]
                per_k = m.cpu / max(m.frames, 1) * 1000
                extra = [f"{m.lost}/{m.mismatched}/{m.failed}", f"{per_k:.3f}",
                         f"{m.peak_rss / 2**20:.0f}"]
            lines.append(
                f"| {name} | {target} | {t50 * 1000:.2f} | {t99 * 1000:.2f} | {added[0]} | "
                f"{added[1]} | " + (f"{g50 * 1000:.2f} | {g99 * 1000:.2f} | " if m.values("gaps")
                                    else "- | - | ") + f"{added[2]} | {added[3]} | "
                + " | ".join(extra) + " |")
    if any(sweep.values()):
        levels = sorted({lvl for per in sweep.values() for lvl in per})
        lines += ["", "Concurrency sweep (NDJSON streams, 50 tokens at 50 tokens/s; added p99 "
                  "TTFT in ms; a proxy leaves the sweep once it passes +50 ms):", "",
                  "| proxy | " + " | ".join(str(lvl) for lvl in levels) +
                  " | max concurrency within +5 ms p99 | peak RSS MB at the top level |",
                  "|---|" + "---|" * (len(levels) + 2)]
        for name, per in sweep.items():
            if name == "direct":
                lines.append("| direct (own p99 TTFT) | " + " | ".join(
                    f"{percentile(per[lvl].values('ttft'), .99) * 1000:.1f}" for lvl in levels)
                    + " | | |")
                continue
            within = [lvl for lvl in per if added_p99(sweep, name, lvl) <= WITHIN]
            top = max(per) if per else 0
            lines.append(f"| {name} | " + " | ".join(
                fmt_ms(added_p99(sweep, name, lvl)) if lvl in per else "-" for lvl in levels)
                + f" | {max(within) if within else 0} | "
                f"{per[top].peak_rss / 2**20:.0f} (at {top}) |")
    if stall is not None:
        lines += ["", f"/metrics under load: {stall['series']:.0f} series (100 models x every "
                  f"series), rendered in {stall['render_ms']:.1f} ms; {stall['scrapes']:.0f} "
                  "scrapes back to back while 16 streams ran. Upstream-to-client delay per "
                  f"chunk: max {stall['quiet_max_ms']:.2f} ms without scrapes, "
                  f"{stall['busy_max_ms']:.2f} ms with them (p99 {stall['quiet_p99_ms']:.2f} → "
                  f"{stall['busy_p99_ms']:.2f} ms): worst stall added "
                  f"{stall['busy_max_ms'] - stall['quiet_max_ms']:.2f} ms."]
    if cpu_run is not None:
        from benchmarks.overhead import cpu

        lines += ["", "CPU section (benchmarks/overhead/results/cpu.md): gobench upstream and "
                  "closed-loop client on core 0, the proxy alone on core 1; llmtap with its "
                  "access log on and /metrics scraped every second, no OTLP exporter."]
        lines += cpu.tables(cpu_run)
    if not args.quick:
        lines += targets(table, sweep, cpu_run)
    lines += ["", f"The OTLP receiver got {spans} spans from llmtap-full."]
    return "\n".join(lines) + "\n"


def targets(table: dict[str, dict[str, Measurement]],
            sweep: dict[str, dict[int, Measurement]], cpu_run: CpuRun | None = None
            ) -> list[str]:
    """DESIGN.md's targets against this run's figures, for llmtap with all telemetry on."""
    def added(row: dict[str, Measurement], name: str, key: str, q: float) -> float:
        return row[name].added(row["direct"], key, q)

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines = ["", "DESIGN.md's targets, llmtap-full (all telemetry on) in this run:", "",
             "| target | measured | |", "|---|---|---|"]
    for framing in ("ndjson", "sse"):
        one = table.get(f"{framing}-1")
        if one is not None:
            p50, nginx50 = added(one, "llmtap-full", "ttft", .5), added(one, "nginx", "ttft", .5)
            lines.append(f"| 1 stream ({framing}): added TTFT p50 <= 0.5 ms | {fmt_ms(p50)} "
                         f"(nginx {fmt_ms(nginx50)}) | {verdict(p50 <= 0.0005)} |")
    for framing in ("ndjson", "sse"):
        burst = table.get(f"burst64-{framing}")
        if burst is not None:
            ours = added(burst, "llmtap-full", "ttft", .99)
            floor = added(burst, "nginx", "ttft", .99)
            lines.append(f"| 64 streams in one burst ({framing}, 5 bursts pooled): added TTFT "
                         f"p99 <= 2x nginx's | {fmt_ms(ours)} vs nginx {fmt_ms(floor)} | "
                         f"{verdict(ours <= 2 * max(floor, 0.0))} |")
    for framing in ("ndjson", "sse"):
        row = table.get(f"{framing}-64")
        if row is not None:
            gap = added(row, "llmtap-full", "gaps", .99)
            lines.append(f"| 64 streams ({framing}): added inter-chunk p99 <= 1 ms | "
                         f"{fmt_ms(gap)} | {verdict(gap <= 0.001)} |")
    top = sweep.get("llmtap-full", {}).get(256)
    if top is not None:
        lines.append(f"| RSS <= 80 MB at 256 streams | {top.peak_rss / 2**20:.0f} MB | "
                     f"{verdict(top.peak_rss <= 80 * 2**20)} |")
    lost = sum(m.lost + m.mismatched for row in table.values() for name, m in row.items()
               if name.startswith("llmtap"))
    lost += sum(m.lost + m.mismatched for name, per in sweep.items() if name.startswith("llmtap")
                for m in per.values())
    lines.append(f"| zero lost or reordered chunks | {lost} | {verdict(lost == 0)} |")
    if cpu_run is not None:
        from benchmarks.overhead import cpu

        lines += cpu.target_rows(cpu_run)
    return lines


MARK_START, MARK_END = "<!-- overhead:start -->", "<!-- overhead:end -->"


def publish(report: str) -> None:
    """Keep the latest full run in benchmarks/README.md, between its markers."""
    readme = HERE.parent / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    body = report.split("\n", 2)[2]  # without the report's own title
    section = (f"{MARK_START}\n{body}\n![added p99 TTFT vs concurrency]"
               f"(overhead/results/added-p99-ttft.png)\n{MARK_END}")
    if MARK_START in text:
        head, rest = text.split(MARK_START, 1)
        text = head + section + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Overhead\n\n" + section + "\n"
    readme.write_text(text)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def plot(sweep: dict[str, dict[int, Measurement]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, per in sweep.items():
        if name == "direct" or not per:
            continue
        levels = sorted(per)
        ax.plot(levels, [added_p99(sweep, name, lvl) * 1000 for lvl in levels], marker="o",
                label=name)
    ax.axhline(WITHIN * 1000, color="grey", linestyle=":", label="+5 ms")
    ax.set_xlabel("concurrent streams (NDJSON, 50 tokens/s each)")
    ax.set_ylabel("added p99 TTFT vs direct (ms)")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title("What each proxy adds to p99 time to first token")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_json(table: dict[str, dict[str, Measurement]], sweep: dict[str, dict[int, Measurement]],
               stall: dict[str, float] | None, path: Path) -> None:
    def digest(m: Measurement) -> dict[str, Any]:
        return {"requests": len(m.results), "failed": m.failed, "frames": m.frames,
                "tokens": m.scenario.tokens, "stream": m.scenario.stream,
                "ttft_p50": percentile(m.values("ttft"), .5),
                "ttft_p99": percentile(m.values("ttft"), .99),
                "gap_p50": percentile(m.values("gaps"), .5),
                "gap_p99": percentile(m.values("gaps"), .99),
                "cpu_seconds": m.cpu, "peak_rss": m.peak_rss, "lost": m.lost,
                "mismatched": m.mismatched,
                "late_p99": percentile([r["late"] for r in m.results], .99)}

    path.write_bytes(orjson.dumps({
        "scenarios": {s: {t: digest(m) for t, m in row.items()} for s, row in table.items()},
        "sweep": {t: {str(lvl): digest(m) for lvl, m in per.items()} for t, per in sweep.items()},
        "stall": stall}, option=orjson.OPT_INDENT_2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: small scenarios, no sweep, no plot")
    parser.add_argument("--skip-litellm", action="store_true",
                        help="leave LiteLLM out (it is installed on first use)")
    parser.add_argument("--skip-cpu", action="store_true",
                        help="leave out the CPU section (benchmarks/overhead/cpu.py)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--before", metavar="DIR",
                        help="also measure the llmtap of another checkout (a git worktree of "
                             "an older commit, say) as llmtap-before, with all telemetry on")
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
