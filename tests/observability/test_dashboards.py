"""The Grafana side without Grafana: the checked-in JSON is what build.py generates, every panel queries the
provisioned datasource, and every metric or recorded series a panel names exists in the contract."""

from __future__ import annotations

import importlib.util
import re
from types import ModuleType

import yaml

from gateway.metrics import Metrics
from tests.observability.exprs import (
    DASHBOARD_FILES,
    GRAFANA_DIR,
    dashboard_queries,
    dashboards,
    panels,
    recording_rules,
    variables,
)

EXPECTED = {"fleet.json", "cost.json", "model-servers.json"}
_TOKEN = re.compile(r"[a-zA-Z_:][\w:]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qlp_grafana_build", GRAFANA_DIR / "build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _gateway_series() -> set[str]:
    """Every series name the gateway can expose (histograms as _bucket/_sum/_count, counters as _total)."""
    names: set[str] = set()
    for metric in Metrics().registry.collect():
        kind, n = metric.type, metric.name
        if kind == "histogram":
            names |= {f"{n}_bucket", f"{n}_sum", f"{n}_count"}
        elif kind == "counter":
            names.add(f"{n}_total")
        else:
            names.add(n)
    return names


def test_checked_in_dashboards_are_what_build_py_generates() -> None:
    built = _build().build()
    assert set(built) == EXPECTED == {f.name for f in DASHBOARD_FILES}
    stale = [name for name, text in built.items() if (GRAFANA_DIR / "dashboards" / name).read_text() != text]
    assert not stale, f"{stale} out of date: run .venv/bin/python services/grafana/build.py"


def test_every_panel_queries_the_provisioned_datasource() -> None:
    ds = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    for name, d in dashboards().items():
        for p in panels(d):
            if p["type"] in ("row", "text"):
                continue
            assert p["datasource"]["uid"] == uid, (name, p["title"])
            assert p["targets"], (name, p["title"])
            assert all(t["datasource"]["uid"] == uid and t["expr"].strip() for t in p["targets"]), (name, p["title"])
        for v in d["templating"]["list"]:
            assert v["datasource"]["uid"] == uid, (name, v["name"])


def test_dashboard_provisioning_loads_the_dashboard_folder() -> None:
    prov = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "qlp.yml").read_text())
    assert prov["providers"][0]["type"] == "file" and prov["providers"][0]["options"]["path"]


def test_dashboards_have_unique_uids_and_panels_that_do_not_overlap() -> None:
    uids = [d["uid"] for d in dashboards().values()]
    assert len(set(uids)) == len(uids)
    for name, d in dashboards().items():
        cells: set[tuple[int, int]] = set()
        for p in panels(d):
            g = p["gridPos"]
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert g["x"] + g["w"] <= 24 and not cells & mine, (name, p["title"])
            cells |= mine
        ids = [p["id"] for p in panels(d)]
        assert len(set(ids)) == len(ids), name


def test_every_series_a_dashboard_names_is_exported_or_recorded() -> None:
    """A typo in a metric name shows up here without Prometheus (the end-to-end test catches the rest)."""
    known = _gateway_series() | {r["record"] for r in recording_rules()}
    seen = set()
    for q in dashboard_queries():
        # Our series all contain "qlp" (metrics and recording rules alike); label names never do.
        for name in {t for t in _TOKEN.findall(_STRING.sub('""', q.expr)) if "qlp" in t}:
            assert name in known, f"{q.where}: {name} is neither a gateway metric nor a recording rule"
            seen.add(name)
    assert len(seen) > 10, seen


def test_template_variables_are_label_values_queries() -> None:
    for name, d in dashboards().items():
        assert variables(name, d), name
