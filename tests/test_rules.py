"""Prometheus rules (alerts/llmtap.rules.yml): promtool, runbook, metric names, conventions.

promtool is Debian's prometheus package; a missing promtool fails these tests (never skips).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import metric_catalogue

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "alerts"
RULES = ALERTS / "llmtap.rules.yml"
RUNBOOK = ALERTS / "runbook.md"
RUNBOOK_URL = "alerts/runbook.md#"
SEVERITIES = {"critical", "warning", "info"}
# Scraped by Prometheus itself, not exported by llmtap.
PROMETHEUS_METRICS = {"up"}
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "bool", "offset", "inf", "nan"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:  # CI installs it (scripts/test): missing is a failure, not a skip
        raise RuntimeError("promtool is not installed: run `bash scripts/test`, which "
                           "installs Debian's prometheus package")
    return path


def rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}, "plain rule groups only (drops into a PrometheusRule spec)"
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alerts() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def catalogue() -> set[str]:
    """Every series name llmtap exports, from README.md's metric catalogue table."""
    names: set[str] = set()
    for line in metric_catalogue().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        kind = cells[1]
        for name in re.findall(r"`((?:llmtap|gen_ai)_[a-z0-9_]+)`", cells[0]):
            names.add(name)
            if kind.startswith("histogram"):
                names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
            elif kind.startswith("counter") and not name.endswith("_total"):
                names.add(name + "_total")
    assert len(names) > 40, "the catalogue table was not found in README.md"
    return names


def metric_names(expr: str) -> set[str]:
    """Series names an expression selects (labels, strings, ranges and functions left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    expr = re.sub(r"\{[^{}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\[\]]*\]", " ", expr)  # ranges and subqueries
    # grouping and matching clauses, so that `sum by (x) (...)` reads as a call of sum
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", expr):
        name, call = match.groups()
        if call or name.lower() in PROMQL_KEYWORDS:
            continue  # a function call, or an operator / modifier
        names.add(name)
    return names


def unknown_metrics(expr: str, known: set[str]) -> set[str]:
    return metric_names(expr) - known


def known_metrics() -> set[str]:
    return catalogue() | recorded() | PROMETHEUS_METRICS


def test_rules_are_valid() -> None:
    result = subprocess.run([promtool(), "check", "rules", *map(str, ALERTS.glob("*.yml"))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    tests = sorted(map(str, (ALERTS / "tests").glob("*_test.yml")))
    assert len(tests) > 1
    result = subprocess.run([promtool(), "test", "rules", *tests], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(tests), result.stdout


def test_every_series_name_is_exported_by_llmtap() -> None:
    known = known_metrics()
    bad = {rule.get("alert") or rule["record"]: unknown_metrics(rule["expr"], known)
           for rule in rules()}
    assert not {name: names for name, names in bad.items() if names}


@pytest.mark.parametrize("typo", [
    "rate(gen_ai_server_time_to_first_token_second_bucket[5m]) > 1",
    'sum by (job) (llmtap_requests_wating{gen_ai_request_model="x"})',
    "llmtap:gen_ai_requests:rate1m > 0.1",
    "llmtap_upstream_up_total == 0",
    "llmtap_gpu_throttled_bucket == 1",  # a gauge has no buckets
])
def test_the_metric_name_check_catches_typos(typo: str) -> None:
    assert unknown_metrics(typo, known_metrics())


def test_the_metric_name_check_ignores_labels_and_functions() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, gen_ai_request_model) '
            '(rate(gen_ai_server_time_to_first_token_seconds_bucket{gen_ai_token_type="x"}[5m])))'
            ' and on (job, gen_ai_request_model) llmtap:gen_ai_requests:rate5m > 1e-9')
    assert metric_names(expr) == {"gen_ai_server_time_to_first_token_seconds_bucket",
                                  "llmtap:gen_ai_requests:rate5m"}


def test_alerts_follow_the_conventions() -> None:
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert "LLMTapProxyWithoutAuth" in names
    for rule in alerts():
        name = rule["alert"]
        assert re.fullmatch(r"LLMTap[A-Z][A-Za-z0-9]*", name), name
        assert rule.get("for"), f"{name} has no for:"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), name
        if not rule["expr"].startswith("absent("):  # absent() has no labels to show
            assert "{{" in annotations.get("description", ""), f"{name}: untemplated"
        assert annotations.get("runbook_url") == RUNBOOK_URL + name.lower(), name


def test_recording_rules_follow_the_conventions() -> None:
    for name in recorded():
        assert re.fullmatch(r"llmtap:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_every_alert_has_a_runbook_entry() -> None:
    sections = re.findall(r"^## (\S+)\s*$", RUNBOOK.read_text(), re.MULTILINE)
    assert len(sections) == len(set(sections))
    alert_names = {rule["alert"] for rule in alerts()}
    assert set(sections) == alert_names  # GitHub anchors: the heading, lowercased
    for anchor in re.findall(r"\]\(#([a-z0-9-]+)\)", RUNBOOK.read_text()):
        assert anchor in {name.lower() for name in alert_names}, anchor


def unit_tests() -> list[dict]:
    groups = []
    for path in sorted((ALERTS / "tests").glob("*_test.yml")):
        groups += yaml.safe_load(path.read_text())["tests"]
    return groups


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for group in unit_tests():
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    alert_names = {rule["alert"] for rule in alerts()}
    assert alert_names - firing == set(), "alerts never seen firing"
    assert alert_names - silent == set(), "alerts never seen staying silent"


def test_every_recording_rule_has_an_expression_test() -> None:
    exprs = " ".join(case["expr"] for group in unit_tests()
                     for case in group.get("promql_expr_test", []))
    untested = {name for name in recorded() if not re.search(re.escape(name) + r"\b", exprs)}
    assert not untested
