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
