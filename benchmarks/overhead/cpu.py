"""What a proxy costs in CPU, per request and per relayed chunk: llmtap and nginx side by side.

    .venv/bin/python -m benchmarks.overhead.cpu            # the full section (about 2.5 min)
    .venv/bin/python -m benchmarks.overhead.cpu --quick    # a smoke run (about 35 s)
    .venv/bin/python -m benchmarks.overhead.cpu --llmtap-root /tmp/llmtap-before \\
        --output benchmarks/overhead/results/cpu-before.md  # another checkout's llmtap

The upstream and the load generator are one Go program (benchmarks/overhead/gobench, standard
library only, built into tmp/ on first use): an upstream that answers Ollama's /api/chat
(NDJSON) and OpenAI's /v1/chat/completions (SSE) at once, one Write and Flush per chunk, and a
closed-loop client on keep-alive connections. Both sit on core 0; the proxy under test is
alone on core 1 (targets.py), and its CPU is read from /proc schedstat at the edges of the
load generator's measured window.

- Per request: whole answers (stream: false), 8 connections back to back: the proxy's core
  is the bottleneck, so requests/s there is its ceiling and CPU / requests its cost.
- Per chunk: paced streams (the upstream waits between chunks, so each chunk is its own read
  at the proxy) of 10 and 200 tokens on 6 connections, few enough that no proxy saturates and
  starts coalescing. CPU per request grows linearly with chunks; its slope is the cost of one
  relayed chunk, its intercept that of the streamed request around them.
- Saturation: unpaced 200-token streams on 16 connections: chunks per second through the
  proxy's one core (these coalesce: see chunks per read).

Targets: direct (no proxy: the client side's own ceiling), llmtap (access log on, /metrics
scraped every second, no OTLP exporter), llmtap-off (access log off, not scraped) and nginx
(targets.NGINX_CONF, access log on). Writes results/cpu.md and cpu.json (--quick: tmp/).
Exits 1 if any request failed or any answer was malformed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks.overhead import targets as tg
from benchmarks.overhead.run import RESULTS, TMP, _scrape, cpu_model, ensure_nginx

GOBENCH = Path(__file__).resolve().parent / "gobench"
BINARY = TMP / "gobench"
FRAMINGS = {"ollama": "NDJSON", "openai": "SSE"}
SATURATED = 0.9  # a proxy core busier than this is the bottleneck
TARGETS = ("direct", "nginx", "llmtap", "llmtap-off")


@dataclass(frozen=True)
class Settings:
    warmup: float  # seconds of unmeasured load before each window (connections, caches)
    duration: float  # seconds measured per load
    whole_connections: int = 8
    # Enough paced streams that the slope rests on thousands of requests' worth of chunks
    # (with 2, repeated runs of the same build moved by 20%), few enough that no proxy
    # saturates and starts coalescing (at ~45 µs a chunk, llmtap's core stays under half busy).
    paced_connections: int = 6
    flood_connections: int = 16
    pace_us: int = 500
    few: int = 10  # tokens in the short paced streams (and in whole answers)
    many: int = 200  # tokens in the long paced streams and the flood


FULL = Settings(warmup=0.5, duration=5.0)
QUICK = Settings(warmup=0.2, duration=0.6)


@dataclass(frozen=True)
class Load:
    """One gobench load: kind is whole, paced or flood."""

    kind: str
    dialect: str
    connections: int
    tokens: int
    interval_us: int = 0

    @property
    def stream(self) -> bool:
        return self.kind != "whole"

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.tokens}-{FRAMINGS[self.dialect].lower()}"


def loads(s: Settings) -> list[Load]:
    out: list[Load] = []
    for dialect in FRAMINGS:
        out += [Load("whole", dialect, s.whole_connections, s.few),
                Load("paced", dialect, s.paced_connections, s.few, s.pace_us),
                Load("paced", dialect, s.paced_connections, s.many, s.pace_us),
                Load("flood", dialect, s.flood_connections, s.many)]
    return out


@dataclass
class Sample:
    """One load against one target: gobench's counts and the CPU used in its window."""

    target: str
    load: Load
    result: dict[str, Any]  # what `gobench load` printed
    proxy_cpu: float  # seconds, every process and thread of the proxy
    client_cpu: float  # seconds, gobench upstream + gobench load
    wall: float  # seconds between the window markers, as seen here
    core_busy: dict[int, float] = field(default_factory=dict)  # share of each core, all tasks
    scrapes: int = 0

    @property
    def proxy_share(self) -> float:
        return self.proxy_cpu / self.wall if self.wall else 0.0

    @property
    def requests(self) -> float:
        """Requests in the window. For a stream, its chunks / tokens: every answer has exactly
        that many content chunks, and the chunk count has no edge effect at the window's ends
        (a 200-token answer lasts 0.1 s; a count of completions would be off by up to one
        answer per connection)."""
        if self.load.stream:
            return float(self.result["chunks"]) / self.load.tokens
        return float(self.result["requests"])

    def cpu_per_request(self) -> float:
        return self.proxy_cpu / self.requests if self.requests else float("nan")

    def chunks_per_read(self) -> float:
        reads = self.result["reads"]
        return self.result["chunks"] / reads if reads else float("nan")


# ------------------------------------------------------------------------------ set-up


def ensure_gobench() -> Path:
    """Build the Go side into tmp/ when any source is newer than the binary (stdlib only: no
    network, no module download)."""
    sources = [*GOBENCH.glob("*.go"), GOBENCH / "go.mod"]
    newest = max(p.stat().st_mtime for p in sources)
    if BINARY.exists() and BINARY.stat().st_mtime >= newest:
        return BINARY
    go = shutil.which("go") or "/usr/local/go/bin/go"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "GOPROXY": "off",
           "CGO_ENABLED": "0"}
    print("building benchmarks/overhead/tmp/gobench", flush=True)
    TMP.mkdir(parents=True, exist_ok=True)
    subprocess.run([go, "build", "-trimpath", "-o", str(BINARY), "."], cwd=GOBENCH, env=env,
                   check=True)
    return BINARY


def llmtap_origin(root: Path) -> dict[str, str]:
    """Which `exporter` package a proxy started from `root` imports, and its commit: a
    baseline run must prove it measured the checkout it names."""
    found = subprocess.run([sys.executable, "-c", "import exporter; print(exporter.__file__)"],
                           cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"{root} does not provide the exporter package (got {found})")

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--", "exporter")
    return {"root": str(root), "package": found, "commit": git("rev-parse", "HEAD"),
            "subject": git("log", "-1", "--format=%s"),
            "exporter_changes": "uncommitted changes in exporter/" if dirty else "clean"}


def start_target(name: str, upstream: str, pin: bool, root: Path) -> tg.Target:
    if name == "direct":
        return tg.Target("direct", upstream)
    if name == "nginx":
        (TMP / "nginx-access.log").unlink(missing_ok=True)  # nginx appends: keep one run's
        return tg.nginx(TMP, upstream, pin)
    quiet = {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}  # no span exporter in either llmtap
    if name == "llmtap":  # the default observers: access log (to its log file) and /metrics
        return tg.llmtap_with(TMP, upstream, name, ["--access-log", "on"], quiet, pin, root)
    return tg.llmtap_with(TMP, upstream, name, ["--access-log", "off", "--log-level", "warning"],
                          quiet, pin, root, admin_scraped=False)


# ------------------------------------------------------------------------------ measuring


def core_ticks() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies of every core, all tasks included: shows what else ran there."""
    out: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
        out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return out


@dataclass
class Snapshot:
    at: float
    proxy: float
    client: float
    cores: dict[int, tuple[int, int]]

    @classmethod
    def take(cls, proxy: list[int], client: list[int]) -> Snapshot:
        return cls(time.monotonic(), tg.cpu_seconds(proxy), tg.cpu_seconds(client),
                   core_ticks())


def busy_between(a: Snapshot, b: Snapshot) -> dict[int, float]:
    out = {}
    for core, (busy, total) in b.cores.items():
        busy0, total0 = a.cores.get(core, (busy, total))
        out[core] = (busy - busy0) / (total - total0) if total > total0 else 0.0
    return out


def load_argv(binary: Path, url: str, load: Load, s: Settings) -> list[str]:
    argv = [str(binary), "load", "--url", url, "--dialect", load.dialect,
            "--connections", str(load.connections), "--tokens", str(load.tokens),
            "--duration", str(s.duration), "--warmup", str(s.warmup), "--markers"]
    if not load.stream:
        argv.append("--no-stream")
    if load.interval_us:
        argv += ["--interval-us", str(load.interval_us)]
    return argv


async def window(stderr: asyncio.StreamReader, proxy: list[int], client: list[int]
                 ) -> tuple[Snapshot, Snapshot, str]:
    """CPU counters at the load generator's window-start and window-end lines."""
    marks: list[Snapshot] = []
    other: list[str] = []
    while len(marks) < 2:
        line = await stderr.readline()
        if not line:
            raise RuntimeError("gobench load ended before its window closed:\n"
                               + "".join(other))
        if line.strip() in (b"window-start", b"window-end"):
            marks.append(Snapshot.take(proxy, client))
        else:
            other.append(line.decode(errors="replace"))
    return marks[0], marks[1], "".join(other)


class ProxyGone(RuntimeError):
    """The proxy exited while a load ran (on a shared machine, something else may stop it)."""


async def sample(target: tg.Target, load: Load, s: Settings, binary: Path, upstream: tg.Target,
                 pin: bool, session: aiohttp.ClientSession) -> Sample:
    proc = await asyncio.create_subprocess_exec(
        *load_argv(binary, target.url, load, s), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, preexec_fn=(lambda: tg.pin_to(tg.CLIENT_CPU)) if pin else None)
    assert proc.stdout is not None and proc.stderr is not None
    done = asyncio.Event()
    scrapes = asyncio.create_task(_scrape(session, target.admin, 1.0, done)) \
        if target.admin else None
    try:
        start, end, _ = await window(proc.stderr, target.pids(), [*upstream.pids(), proc.pid])
        out, err = await proc.communicate()
    finally:
        done.set()
        scraped = await scrapes if scrapes is not None else 0
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode:
        raise RuntimeError(f"gobench load against {target.name} failed:\n{err.decode()}")
    gone = target.child.proc.poll() if target.child and target.child.proc else None
    if gone is not None:  # its failures would otherwise read as the proxy's figures
        raise ProxyGone(f"{target.name} exited with {gone} during {load.key}")
    return Sample(target.name, load, orjson.loads(out), end.proxy - start.proxy,
                  end.client - start.client, end.at - start.at, busy_between(start, end),
                  scraped)


@dataclass
class Run:
    settings: Settings
    pin: bool
    origin: dict[str, str]
    samples: list[Sample] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)  # proxies that died and were rerun
    elapsed: float = 0.0

    def get(self, target: str, kind: str, dialect: str, tokens: int | None = None
            ) -> Sample | None:
        for x in self.samples:
            if (x.target, x.load.kind, x.load.dialect) == (target, kind, dialect) and \
                    (tokens is None or x.load.tokens == tokens):
                return x
        return None

    @property
    def failed(self) -> list[str]:
        return [f"{x.target} {x.load.key}: {x.result['errors']} of {x.result['requests']}"
                for x in self.samples if x.result["errors"] or not x.result["requests"]]


async def measure_all(s: Settings, pin: bool, root: Path = tg.ROOT,
                      names: tuple[str, ...] = TARGETS) -> Run:
    """Every load against every target; one proxy up at a time, so nothing else idles on the
    proxy's core (llmtap's pollers would)."""
    started = time.monotonic()
    binary = ensure_gobench()
    if "nginx" in names:
        ensure_nginx()
    run = Run(s, pin, llmtap_origin(root))
    upstream = tg.gobench_upstream(TMP, binary, pin)
    try:
        async with aiohttp.ClientSession() as session:
            for name in names:
                await measure_target(run, name, upstream, binary, pin, root, session)
                print(f"[{time.monotonic() - started:4.0f} s] {name}: "
                      f"{summary(run, name)}", flush=True)
    finally:
        if upstream.child is not None:
            upstream.child.stop()
    run.elapsed = time.monotonic() - started
    return run


async def measure_target(run: Run, name: str, upstream: tg.Target, binary: Path, pin: bool,
                         root: Path, session: aiohttp.ClientSession) -> None:
    """Every load against one proxy; a proxy that dies mid-load is restarted and that load
    rerun, once (recorded in the report)."""
    target = start_target(name, upstream.url, pin, root)
    try:
        for load in loads(run.settings):
            try:
                x = await sample(target, load, run.settings, binary, upstream, pin, session)
            except ProxyGone as gone:
                run.restarts.append(str(gone))
                print(f"{gone}: restarting it and rerunning {load.key}", flush=True)
                if target.child is not None:
                    target.child.stop()
                target = start_target(name, upstream.url, pin, root)
                x = await sample(target, load, run.settings, binary, upstream, pin, session)
            run.samples.append(x)
    finally:
        if target.child is not None:
            target.child.stop()


# ------------------------------------------------------------------------------ figures


@dataclass(frozen=True)
class PerChunk:
    """CPU per request = intercept + slope x chunks, from the two paced loads."""

    slope: float  # seconds per relayed chunk
    intercept: float  # seconds per streamed request, chunks aside
    few: Sample
    many: Sample


def per_chunk(run: Run, target: str, dialect: str) -> PerChunk | None:
    few = run.get(target, "paced", dialect, run.settings.few)
    many = run.get(target, "paced", dialect, run.settings.many)
    if few is None or many is None:
        return None
    slope = (many.cpu_per_request() - few.cpu_per_request()) / \
        (many.load.tokens - few.load.tokens)
    return PerChunk(slope, few.cpu_per_request() - slope * few.load.tokens, few, many)


def per_request(run: Run, target: str, dialect: str) -> float:
    whole = run.get(target, "whole", dialect)
    return whole.cpu_per_request() if whole is not None else float("nan")


def ratio(run: Run, target: str, dialect: str, what: str) -> float:
    if what == "request":
        return per_request(run, target, dialect) / per_request(run, "nginx", dialect)
    ours, floor = per_chunk(run, target, dialect), per_chunk(run, "nginx", dialect)
    return ours.slope / floor.slope if ours and floor and floor.slope > 0 else float("nan")


def summary(run: Run, target: str) -> str:
    if target == "direct":
        whole = run.get(target, "whole", "ollama")
        return f"{whole.result['requests_per_s']:.0f} req/s without a proxy" if whole else ""
    parts = []
    for dialect, framing in FRAMINGS.items():
        chunk = per_chunk(run, target, dialect)
        parts.append(f"{framing} {us(per_request(run, target, dialect))} µs/request, "
                     f"{us(chunk.slope) if chunk else '-'} µs/chunk")
    return "; ".join(parts)


def us(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1e6:.0f}"  # NaN: not measured


def pct(share: float) -> str:
    return f"{share * 100:.0f}%"


# ------------------------------------------------------------------------------ reporting


def render(run: Run, command: str, note: str = "") -> str:
    s = run.settings
    lines = [
        "# Proxy CPU per request and per chunk, side by side",
        "",
        f"Command: `{command}`, {time.strftime('%Y-%m-%d')}, {run.elapsed:.0f} s. Machine: "
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu_model()}), Python "
        f"{platform.python_version()}, " + ("pinned: gobench upstream and load on core 0, "
                                             "proxy on core 1." if run.pin else "not pinned."),
        f"llmtap from {run.origin['root']} at commit {run.origin['commit'][:12] or '?'} "
        f"({run.origin['subject']}; exporter/: {run.origin['exporter_changes']}).",
        "Upstream and client: gobench (Go, stdlib only), one Write+Flush per chunk, closed "
        f"loop on keep-alive connections, {s.warmup:g} s warm-up then {s.duration:g} s "
        "measured per load. CPU = the proxy's processes (schedstat) in the measured window. "
        "llmtap: access log on, /metrics scraped every second, no OTLP exporter; llmtap-off: "
        "access log off, not scraped; nginx: one worker, proxy_buffering off, access log on.",
    ]
    other = sorted(max(0.0, x.core_busy.get(tg.PROXY_CPU, 0.0) - x.proxy_share)
                   for x in run.samples)
    if run.pin and other:
        lines.append(f"Other work on the proxy's core (its busy share minus the proxy's own) "
                     f"during the windows: median {pct(other[len(other) // 2])}, max "
                     f"{pct(other[-1])}: above a few % the machine was shared and the proxy "
                     "did not have its core to itself.")
    scrapes = sum(x.scrapes for x in run.samples)
    if scrapes:
        lines.append(f"/metrics was scraped {scrapes} times during llmtap's loads.")
    if run.restarts:
        lines.append("Restarted mid-run (the load then rerun): " + "; ".join(run.restarts)
                     + ".")
    if note:
        lines += ["", note]
    return "\n".join(lines + tables(run)) + "\n"


def tables(run: Run) -> list[str]:
    """The section's tables (run.py puts them in its own report too)."""
    return whole_table(run) + chunk_table(run) + flood_table(run) + ratio_table(run)


def whole_table(run: Run) -> list[str]:
    lines = ["", f"Per request: whole answers (stream: false, {run.settings.few} tokens), "
             f"{run.settings.whole_connections} connections back to back. Core 0 = upstream + "
             "client + anything else there; a proxy core near 100% is the bottleneck.", "",
             "| framing | proxy | requests/s | CPU µs / request | proxy core | core 0 busy | "
             "core 1 busy | failed |",
             "|---|---|---|---|---|---|---|---|"]
    for dialect, framing in FRAMINGS.items():
        for target in TARGETS:
            x = run.get(target, "whole", dialect)
            if x is None:
                continue
            proxy = "" if target == "direct" else us(x.cpu_per_request())
            share = "" if target == "direct" else pct(x.proxy_share)
            lines.append(f"| {framing} | {target} | {x.result['requests_per_s']:.0f} | {proxy} | "
                         f"{share} | {pct(x.core_busy.get(0, 0))} | "
                         f"{pct(x.core_busy.get(1, 0))} | {x.result['errors']} |")
    return lines


def chunk_table(run: Run) -> list[str]:
    s = run.settings
    lines = ["", f"Per chunk: paced streams ({s.pace_us} µs asked between chunks), "
             f"{s.paced_connections} connections; CPU per request at {s.few} and {s.many} "
             "tokens, the slope between them per relayed chunk, the intercept per streamed "
             "request. Chunks per read near 1: every chunk reached the client as its own read "
             "(none coalesced).", "",
             f"| framing | proxy | chunks/s at {s.many} | gap µs | CPU µs / request at "
             f"{s.few} | at {s.many} | **µs / chunk** | µs / streamed request | proxy core at "
             f"{s.many} | chunks per read |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for dialect, framing in FRAMINGS.items():
        for target in TARGETS:
            fit = per_chunk(run, target, dialect)
            if fit is None:
                continue
            many = fit.many
            gap = f"{many.result['gap_mean'] * 1e6:.0f}"
            if target == "direct":
                cells = ["", "", "", "", ""]
            else:
                cells = [us(fit.few.cpu_per_request()), us(many.cpu_per_request()),
                         f"**{us(fit.slope)}**", us(fit.intercept), pct(many.proxy_share)]
            lines.append(f"| {framing} | {target} | {many.result['chunks_per_s']:.0f} | {gap} | "
                         + " | ".join(cells) + f" | {many.chunks_per_read():.2f} |")
    return lines


def flood_table(run: Run) -> list[str]:
    s = run.settings
    lines = ["", f"Saturation: unpaced {s.many}-token streams, {s.flood_connections} "
             "connections. Chunks/s per core = chunks/s / proxy core share (the figure to "
             "publish when the proxy core is the bottleneck; *italic* where it was not, i.e. "
             f"under {pct(SATURATED)}).", "",
             "| framing | proxy | chunks/s | proxy core | **chunks/s per core** | CPU µs / chunk "
             "| chunks per read | core 0 busy |",
             "|---|---|---|---|---|---|---|---|"]
    for dialect, framing in FRAMINGS.items():
        for target in TARGETS:
            x = run.get(target, "flood", dialect)
            if x is None:
                continue
            rate = x.result["chunks_per_s"]
            if target == "direct":
                cells = ["", "", ""]
            else:
                per_core = f"{rate / x.proxy_share:.0f}" if x.proxy_share else "-"
                per_core = f"**{per_core}**" if x.proxy_share >= SATURATED else f"*{per_core}*"
                cells = [pct(x.proxy_share), per_core,
                         us(x.proxy_cpu / x.result["chunks"]) if x.result["chunks"] else "-"]
            lines.append(f"| {framing} | {target} | {rate:.0f} | " + " | ".join(cells) +
                         f" | {x.chunks_per_read():.1f} | {pct(x.core_busy.get(0, 0))} |")
    return lines


def ratio_table(run: Run) -> list[str]:
    lines = ["", "Against nginx (DESIGN.md's targets: per request ≤ 3x, per chunk ≤ 2x, "
             "every observer on):", "",
             "| proxy | per request NDJSON | per request SSE | per chunk NDJSON | "
             "per chunk SSE |", "|---|---|---|---|---|"]
    for target in ("llmtap", "llmtap-off"):
        if not any(x.target == target for x in run.samples):
            continue
        cells = [f"{ratio(run, target, d, what):.2f}x" for what in ("request", "chunk")
                 for d in FRAMINGS]
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    return lines


def target_rows(run: Run) -> list[str]:
    """DESIGN.md's CPU targets as rows of run.py's targets table (llmtap here: access log and
    /metrics scrapes, no OTLP exporter)."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    rows = []
    for dialect, framing in FRAMINGS.items():
        head = f"| CPU section ({framing}):"
        req = ratio(run, "llmtap", dialect, "request")
        rows.append(f"{head} CPU per request <= 3x nginx's | "
                    f"{us(per_request(run, 'llmtap', dialect))} µs vs nginx "
                    f"{us(per_request(run, 'nginx', dialect))} µs ({req:.2f}x) | "
                    f"{verdict(req <= 3)} |")
        ours, floor = per_chunk(run, "llmtap", dialect), per_chunk(run, "nginx", dialect)
        if ours and floor:
            chunk = ratio(run, "llmtap", dialect, "chunk")
            rows.append(f"{head} CPU per relayed chunk <= 2x nginx's | {us(ours.slope)} µs vs "
                        f"nginx {us(floor.slope)} µs ({chunk:.2f}x) | {verdict(chunk <= 2)} |")
        flood = run.get("llmtap", "flood", dialect)
        if flood is not None and flood.proxy_share:
            rows.append(f"{head} chunks per second per core at saturation published | "
                        f"{flood.result['chunks_per_s'] / flood.proxy_share:.0f} (core "
                        f"{pct(flood.proxy_share)} busy) | met |")
    return rows


def write(run: Run, report: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    figures: dict[str, Any] = {}
    for target in TARGETS:
        for dialect, framing in FRAMINGS.items():
            fit = per_chunk(run, target, dialect)
            figures[f"{target}/{framing}"] = {
                "cpu_per_request": per_request(run, target, dialect),
                "cpu_per_chunk": fit.slope if fit else None,
                "cpu_per_streamed_request": fit.intercept if fit else None}
    samples = [{**asdict(x), "cpu_per_request": x.cpu_per_request(),
                "proxy_share": x.proxy_share} for x in run.samples]
    path.with_suffix(".json").write_bytes(orjson.dumps(
        {"settings": asdict(run.settings), "pinned": run.pin, "llmtap": run.origin,
         "elapsed": run.elapsed, "restarts": run.restarts, "figures": figures,
         "samples": samples},
        option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


# ------------------------------------------------------------------------------ entry point


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short windows; output in tmp/")
    parser.add_argument("--llmtap-root", type=Path, default=tg.ROOT,
                        help="checkout whose exporter package is run (default: this one)")
    parser.add_argument("--output", type=Path,
                        help="markdown file to write; its .json beside it (default: "
                             "results/cpu.md, or tmp/cpu.md with --quick)")
    parser.add_argument("--note", default="", help="a line added to the report")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    if pin:
        tg.pin_to(tg.CLIENT_CPU)
    names = tuple(n for n in args.targets.split(",") if n)
    unknown = set(names) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    run = await measure_all(QUICK if args.quick else FULL, pin, args.llmtap_root.resolve(),
                            names)
    command = ".venv/bin/python -m benchmarks.overhead.cpu" + "".join(
        f" {shlex.quote(a)}" for a in sys.argv[1:])
    report = render(run, command, args.note)
    out = args.output or (TMP if args.quick else RESULTS) / "cpu.md"
    write(run, report, out)
    print(report)
    if run.failed:
        print(f"FAILED: {'; '.join(run.failed)}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    sys.exit(asyncio.run(amain(parse())))


if __name__ == "__main__":
    main()
