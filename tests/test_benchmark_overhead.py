"""The overhead benchmark's quick variant: it must run, and every chunk must arrive, in order.

No timing is asserted (this machine is shared and noisy): the figures are the benchmark's
business, benchmarks/README.md holds them. What is asserted is that the benchmark still
measures what it claims: the same answers through every proxy as directly, chunk for chunk.
LiteLLM is left out here (its proxy is a 750 MB install and takes half a minute to start);
the full command, `python -m benchmarks.overhead.run`, installs and runs it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson

from tests.helpers import ROOT

RESULTS = ROOT / "benchmarks" / "overhead" / "tmp" / "results.json"


def test_quick_benchmark_relays_every_chunk_in_order() -> None:
    assert shutil.which("nginx") or Path("/usr/sbin/nginx").exists(), \
        "nginx missing: scripts/test installs Debian's nginx-light"
    RESULTS.unlink(missing_ok=True)
    run = subprocess.run([sys.executable, "-m", "benchmarks.overhead.run", "--quick",
                          "--skip-litellm"], cwd=ROOT, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = orjson.loads(RESULTS.read_bytes())
    scenarios = results["scenarios"]
    assert {"ndjson-4", "sse-4", "burst-ndjson"} <= set(scenarios)
    for name, row in scenarios.items():
        assert set(row) == {"direct", "llmtap-full", "llmtap-off", "nginx"}, name
        for target, figures in row.items():
            assert figures["requests"] > 0 and figures["failed"] == 0, (name, target)
            per_request = figures["tokens"] if figures["stream"] else 1
            # Every content chunk of every answer arrived...
            assert figures["frames"] == figures["requests"] * per_request, (name, target)
            # ...and each answer equals, chunk for chunk, the one given directly.
            assert figures["lost"] == 0 and figures["mismatched"] == 0, (name, target)
