"""Where llmtap's CPU goes while it relays: py-spy samples it under the 64-stream load.

    .venv/bin/pip install py-spy   # once
    .venv/bin/python -m benchmarks.overhead.profile [--telemetry off] [--streams 64]

Starts the simulator and one llmtap (telemetry on: spans to a live OTLP receiver, access log,
/metrics scraped each second), drives it with the open-loop load generator and records with
py-spy (native frames off, idle frames off). Prints the functions with the most samples of
their own and the llmtap lines with the most samples including callees; the collapsed stacks
stay in benchmarks/overhead/tmp/profile.txt (flamegraph.pl or speedscope read them).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.overhead import targets as tg
from benchmarks.overhead.run import TMP, Scenario, measure


async def profile(streams: int, telemetry: bool, seconds: float, tokens: int) -> None:
    from tests.otlp import HTTPReceiver

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    TMP.mkdir(parents=True, exist_ok=True)
    out = TMP / "profile.txt"
    tg.pin_to(tg.CLIENT_CPU)
    upstream = tg.simulator(TMP, pin=True)
    try:
        async with HTTPReceiver() as receiver:
            tap = tg.llmtap(TMP, upstream.url, telemetry, f"http://127.0.0.1:{receiver.port}",
                            pin=True, name="profiled-llmtap")
            try:
                warm = Scenario("warm-up", "ollama", 8, 10, 1.0)
                await measure(tap, warm, 0, pin=True)
                assert tap.child is not None and tap.child.proc is not None
                recorder = await asyncio.create_subprocess_exec(
                    spy, "record", "--pid", str(tap.child.proc.pid), "--format", "raw",
                    "--output", str(out), "--rate", "250", "--duration", str(int(seconds) + 2),
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                await asyncio.sleep(1.0)
                scenario = Scenario(f"profile-{streams}", "ollama", streams, tokens, seconds)
                m = await measure(tap, scenario, 1000, pin=True, scrape_every=1.0)
                _, err = await recorder.communicate()
                if recorder.returncode:
                    raise SystemExit(f"py-spy failed: {err.decode()[-2000:]}")
            finally:
                assert tap.child is not None
                tap.child.stop()
    finally:
        assert upstream.child is not None
        upstream.child.stop()
    print(f"{m.frames} chunks relayed, {m.cpu:.2f} CPU s: "
          f"{m.cpu / max(m.frames, 1) * 1e6:.1f} µs per chunk (all per-request work included)")
    summarise(out)


# Leaf frames of a thread that waits: the /metrics executor and span batch threads asleep,
# and the event loop inside uvloop's C code (mostly epoll_wait).
IDLE = ("_worker (concurrent/futures/thread.py", "Condition.wait (threading.py",
        "Runner.run (asyncio/runners.py")


def summarise(path: Path, top: int = 25) -> None:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames[-1].startswith(IDLE):  # threads asleep, the loop in epoll_wait
            continue
        total += count
        own[frames[-1]] += count
        for function in {frame.split(":")[0] for frame in frames}:
            inclusive[function] += count
    print(f"\n{total} busy samples. Most samples of their own:")
    for frame, count in own.most_common(top):
        print(f"  {count / total:6.1%}  {frame}")
    print("\nfunctions (any line), including what they call:")
    for frame, count in inclusive.most_common(top):
        print(f"  {count / total:6.1%}  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--telemetry", choices=("on", "off"), default="on")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--tokens", type=int, default=50, help="tokens per answer")
    args = parser.parse_args()
    asyncio.run(profile(args.streams, args.telemetry == "on", args.seconds, args.tokens))


if __name__ == "__main__":
    main()
