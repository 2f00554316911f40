"""Every PromQL expression the project ships (dashboard panels, template variables, rules), and the two
transformations the end-to-end test applies before querying them:

* Grafana variables are replaced by concrete values: `$tier` by the values its own variable query returns
  (as Grafana sends "All": `(T0|T1|...)`), `$__rate_interval` and friends by fixed durations.
* An alert is queried without its threshold. Alerts are written `<expression> <comparison> <number>` with
  the comparison last and at the top level (test_rules checks that), so stripping that comparison leaves
  the series the alert watches, which must have data in a healthy fleet even when the alert is quiet.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "services" / "prometheus"
RULE_FILES = (PROM_DIR / "rules" / "recording.yml", PROM_DIR / "rules" / "alerts.yml")
GRAFANA_DIR = ROOT / "services" / "grafana"
DASHBOARD_FILES = tuple(sorted((GRAFANA_DIR / "dashboards").glob("*.json")))

# What Grafana would send for a one-minute-ish view of a fleet scraped every second.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "__range_s": "3600"}

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_TRAILING_THRESHOLD = re.compile(
    rf"^(?P<expr>.*?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?:bool\s+)?(?P<num>{_NUMBER})\s*$", re.S
)
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)\s*$", re.S)


@dataclass(frozen=True)
class Query:
    where: str  # for messages: "fleet.json / Requests/s by tier / A", "alert QLPHighErrorRate"
    expr: str


@dataclass(frozen=True)
class Variable:
    dashboard: str
    name: str
    selector: str  # the series selector of label_values(selector, label)
    label: str
    regex: str  # Grafana's regex filter, "/.../" or ""


def rules() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in RULE_FILES:
        for group in yaml.safe_load(f.read_text())["groups"]:
            out.extend(group["rules"])
    return out


def alerts() -> list[dict[str, Any]]:
    return [r for r in rules() if "alert" in r]


def recording_rules() -> list[dict[str, Any]]:
    return [r for r in rules() if "record" in r]


def dashboards() -> dict[str, dict[str, Any]]:
    return {f.name: json.loads(f.read_text()) for f in DASHBOARD_FILES}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def dashboard_queries() -> list[Query]:
    return [
        Query(f"{name} / {p['title']} / {t['refId']}", t["expr"])
        for name, d in dashboards().items()
        for p in panels(d)
        for t in p.get("targets", [])
    ]


def variables(dashboard_name: str, dashboard: dict[str, Any]) -> list[Variable]:
    out = []
    for v in dashboard["templating"]["list"]:
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = _LABEL_VALUES.match(q)
        if v["type"] != "query" or m is None:
            raise AssertionError(f"{dashboard_name}: variable {v['name']} is not label_values(selector, label)")
        out.append(Variable(dashboard_name, v["name"], m["selector"], m["label"], v.get("regex", "")))
    return out


def strip_threshold(expr: str) -> str:
    """`X > 0.05` -> `X`; raises ValueError when the expression does not end in a comparison."""
    m = _TRAILING_THRESHOLD.match(expr.strip())
    if m is None:
        raise ValueError(f"alert expression does not end in `<comparison> <number>`: {expr!r}")
    return m["expr"].strip()


def top_level(expr: str) -> str:
    """The expression with everything inside (), [], {} and quotes blanked out."""
    out, depth, quote = [], 0, ""
    for ch in expr:
        if quote:
            if ch == quote:
                quote = ""
            out.append(" ")
        elif ch in "\"'`":
            quote = ch
            out.append(" ")
        elif ch in "([{":
            depth += 1
            out.append(" ")
        elif ch in ")]}":
            depth -= 1
            out.append(" ")
        else:
            out.append(ch if depth == 0 else " ")
    return "".join(out)


def has_top_level_operator(expr: str) -> bool:
    """True when `expr` has a comparison or set operator outside parentheses (so stripping a trailing
    threshold would not leave the series the alert watches)."""
    top = top_level(expr)
    return bool(re.search(r"\b(and|or|unless)\b|==|!=|>=|<=|(?<![=!<>])[<>](?!=)", top))


def substitute(expr: str, values: dict[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VAR.sub(repl, expr)


def regex_value(values: list[str]) -> str:
    """A multi-value variable as Grafana renders "All" into a regex matcher."""
    escaped = [re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def grafana_regex_filter(regex: str, values: list[str]) -> list[str]:
    if not regex:
        return values
    pattern = re.compile(regex.strip("/"))
    return [v for v in values if pattern.search(v)]
