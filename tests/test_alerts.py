"""Alert rules, checked and unit-tested with the real promtool (Debian's prometheus)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ALERTS = Path(__file__).resolve().parent.parent / "alerts"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:  # CI installs it (scripts/test): missing is a failure, not a skip
        raise RuntimeError("promtool is not installed: run `bash scripts/test`, which "
                           "installs Debian's prometheus package")
    return path


def test_rules_are_valid() -> None:
    result = subprocess.run([promtool(), "check", "rules", *map(str, ALERTS.glob("*.yml"))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    tests = sorted(map(str, (ALERTS / "tests").glob("*_test.yml")))
    assert tests
    result = subprocess.run([promtool(), "test", "rules", *tests], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
