"""The README stays true: every flag, env var and exported metric is documented."""

from __future__ import annotations

from pathlib import Path

from exporter.config import OPTIONS
from tests.helpers import Llmtap, Metrics

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_documents_every_option() -> None:
    for option in OPTIONS:
        assert f"`{option.flag} " in README, option.flag
        assert f"`{option.env}`" in README, option.env


def test_readme_documents_every_metric_llmtap_exports(sim_tap: Llmtap) -> None:
    metrics: Metrics = sim_tap.metrics()
    families = {line.split()[2] for line in metrics.text.splitlines()
                 if line.startswith("# TYPE ")}
    assert families, "nothing exported"
    for family in families:  # counters' families lack the _total the README shows
        assert f"`{family}" in README, f"{family} is missing from the README's catalogue"


def test_openmetrics_when_asked(sim_tap: Llmtap) -> None:
    import urllib.request

    request = urllib.request.Request(
        sim_tap.admin + "/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert resp.read().rstrip().endswith(b"# EOF")


def test_operations_page_cites_tests_that_exist() -> None:
    """docs/operations.md states guarantees with the tests that prove them: every cited
    file and test must exist, or the page is making promises nothing checks."""
    import re

    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "operations.md").read_text()
    cited = re.findall(r"`(tests/[\w/]+\.py|alerts/[\w/]+\.yml|benchmarks/[\w/.]+)"
                       r"(?:::(\w+))?`", page)
    assert cited
    current = None
    for path, name in cited:
        assert (root / path).is_file(), path
        current = path
        if name:
            assert f"def {name}(" in (root / current).read_text(), f"{path}::{name}"
    for name in re.findall(r"`::(\w+)`", page):  # short form: same file as the cell's first
        assert any(f"def {name}(" in (root / p).read_text() for p, _ in cited
                   if p.endswith(".py")), name
