"""A bounded atheris run over the observers (a coverage-guided complement to hypothesis)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_atheris_finds_nothing_in_20000_inputs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_observers", "-runs=20000", "-max_len=2048",
         "-seed=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Done 20000 runs" in output, output[-3000:]
