"""Dashboards: generated, fresh, following the conventions, referencing only real metrics."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import catalogued_names

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
PANEL_TYPES = {"timeseries", "stat", "heatmap", "table", "bargauge"}
SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def exprs(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(board) for t in p["targets"]] + [
        v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]


def test_committed_json_is_what_the_generator_writes() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "dashboards" / "generate.py"),
                             "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in DASHBOARDS} == {"llmtap-overview.json", "llmtap-gpu.json",
                                            "llmtap-routing.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_conventions(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["uid"] == path.stem and board["id"] is None
    assert board["schemaVersion"] >= 39
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "job", "instance", "model"]
    chain = {v["name"]: v["definition"] for v in board["templating"]["list"]
             if v["type"] == "query"}
    assert "$job" in chain["instance"] and "$instance" in chain["model"]
    for panel in panels(board):
        title = panel["title"]
        assert panel["type"] in PANEL_TYPES, title
        assert panel["description"], title
        assert panel["fieldConfig"]["defaults"]["unit"], title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], title
        if title in ("Time to first token", "Request duration", "TTFT distribution",
                     "Duration distribution"):
            assert all(t.get("exemplar") for t in panel["targets"][:3]), title
    for expr in exprs(board):
        for window in re.findall(r"rate\([^\[]*\[([^\]]+)\]", expr):
            assert window == "$__rate_interval" or "increase" in expr, expr
        for inner in re.findall(r"histogram_quantile\([^,]+, (\w+ by \([^)]*\))", expr):
            assert inner.startswith("sum by (le"), expr
        for divisor in expr.split(" / ")[1:]:
            assert divisor.startswith("clamp_min("), f"unguarded division: {expr}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_reference_only_exported_metrics(path: Path) -> None:
    known = catalogued_names()
    assert "gen_ai_server_time_to_first_token_seconds" in known
    board = json.loads(path.read_text())
    for expr in exprs(board):
        for name in re.findall(r"\b((?:gen_ai|llmtap)_[a-z_]+)", expr):
            base = name
            for suffix in SUFFIXES:
                if base.endswith(suffix) and base not in known:
                    base = base[: -len(suffix)]
            assert name in known or base in known, f"{path.name}: unknown metric {name}"
