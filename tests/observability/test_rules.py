"""The Prometheus config and rules: promtool accepts them, the rule unit tests pass, every alert is unit
tested both firing and quiet, and every alert follows the threshold convention the end-to-end test needs."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.observability.exprs import PROM_DIR, RULE_FILES, alerts, has_top_level_operator, strip_threshold
from tests.observability.prom import require_binary

UNIT_TESTS = tuple(sorted((PROM_DIR / "tests").glob("*.yml")))


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_binary("promtool")


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=PROM_DIR, capture_output=True, text=True, timeout=120)


def test_prometheus_config_passes_promtool_check(promtool: str) -> None:
    r = _run([promtool, "check", "config", "prometheus.yml"])
    assert r.returncode == 0, r.stdout + r.stderr


def test_rule_files_pass_promtool_check(promtool: str) -> None:
    r = _run([promtool, "check", "rules", *map(str, RULE_FILES)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_rule_unit_tests_pass(promtool: str) -> None:
    assert UNIT_TESTS, "no promtool unit tests in services/prometheus/tests"
    r = _run([promtool, "test", "rules", *map(str, UNIT_TESTS)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for f in UNIT_TESTS:
        for case in yaml.safe_load(f.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names, "no alerts found"
    assert names <= firing, f"alerts never shown firing in a promtool test: {sorted(names - firing)}"
    assert names <= quiet, f"alerts never shown quiet in a promtool test: {sorted(names - quiet)}"
    assert not (firing | quiet) - names, f"tests of alerts that do not exist: {sorted((firing | quiet) - names)}"


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_alert_is_a_threshold_on_one_expression(alert: dict[str, object]) -> None:
    """`<expression> <comparison> <number>`, nothing else at the top level: the end-to-end test queries
    <expression> and requires data, so an alert cannot watch a series that never exists."""
    expr = str(alert["expr"])
    watched = strip_threshold(expr)
    assert not has_top_level_operator(watched), f"{alert['alert']}: {watched!r} has another top-level operator"


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_alert_says_how_bad_and_what_to_do(alert: dict[str, object]) -> None:
    labels, annotations = alert.get("labels") or {}, alert.get("annotations") or {}
    assert isinstance(labels, dict) and labels.get("severity") in {"page", "warning"}, alert["alert"]
    assert isinstance(annotations, dict) and annotations.get("summary") and annotations.get("description")
    assert alert.get("for"), f"{alert['alert']}: an alert without `for` pages on a single bad scrape"
