"""contrib/: the Prometheus rules and the Grafana dashboard.

The rules are checked and unit-tested by Prometheus' own `promtool` (Debian
package `prometheus`; without it these tests FAIL, they do not skip). Every
PromQL expression in the rules and in the dashboard is then read for the
metric names it uses, and each name must be one nitro exports: the names come
from nitro/metrics.py's registry itself, never from a list kept here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from nitro.metrics import make_registry

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "contrib" / "prometheus" / "nitro-rules.yml"
RULES_TEST = REPO / "contrib" / "prometheus" / "nitro-rules.test.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "nitro.json"

#: Series Prometheus itself makes for every scrape target (not nitro's).
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS"}

#: Sample names of each metric family type, as the text exposition shows them.
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install the Debian package 'prometheus' (tools/install-deps.sh)")
    return path


def exported_names() -> set[str]:
    """Every sample name nitro's /metrics can show. The collector yields all
    its families on every scrape (empty ones too), so a scrape with no
    devices lists them all."""
    registry = make_registry(lambda: [], lambda: {})
    return {family.name + suffix for family in registry.collect() for suffix in _SUFFIXES[family.type]}


# -- PromQL -> metric names ---------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not
    functions (followed by "("), keywords, label names in a selector or a
    grouping, strings or durations."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub("{}", text)
    text = _RANGE.sub("[]", text)
    text = _GROUPING.sub(" ", text)
    return {name for name in _IDENT.findall(text) if name.lower() not in _KEYWORDS}


@pytest.mark.parametrize("expr, names", [
    ('sum by (device, op) (rate(nitro_blk_requests_total{op=~"in|out", x="a{b}"}[5m]))',
     {"nitro_blk_requests_total"}),
    ("histogram_quantile(0.99, sum(rate(a_bucket[1m] offset 1h)) by (le)) > 1e-3", {"a_bucket"}),
    ("x / on (device) group_left (socket) y_info and bool z unless job:up:sum", {"x", "y_info", "z", "job:up:sum"}),
    ('label_replace(m, "allowance", "bw_in", "", "") or 8 * n', {"m", "n"}),
])
def test_metric_names(expr, names):
    assert metric_names(expr) == names


# -- the rules -----------------------------------------------------------------

def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_rules_check():
    proc = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_unit_tests():
    """nitro-rules.test.yml: each alert fires on its case and stays quiet on a look-alike."""
    proc = subprocess.run([promtool(), "test", "rules", RULES_TEST.name], cwd=RULES_TEST.parent,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_is_unit_tested():
    tested = {case["alertname"] for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for case in test.get("alert_rule_test", ())}
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts - tested == set()


def test_rules_use_only_exported_metrics():
    known = exported_names() | PROMETHEUS_SERIES | {rule["record"] for rule in rules() if "record" in rule}
    for rule in rules():
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown} not exported by nitro"


def test_unknown_metric_is_caught():
    """The name check above must see a misspelt metric."""
    assert metric_names("rate(nitro_blk_request_total[5m])") - exported_names() == {"nitro_blk_request_total"}


# -- the dashboard ---------------------------------------------------------------

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for panel in dash["panels"]:
        out += [panel, *panel.get("panels", ())]  # collapsed rows hold their panels
    return out


def dashboard_exprs(dash: dict) -> dict[str, str]:
    """{where: PromQL} of every query: panel targets, annotations, and the
    selector inside each variable's label_values(...)."""
    exprs = {}
    for panel in panels(dash):
        for target in panel.get("targets", ()):
            exprs[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for note in dash["annotations"]["list"]:
        if "expr" in note:
            exprs[f"annotation {note['name']!r}"] = note["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
            assert match, var["definition"]
            exprs[f"variable {var['name']}"] = match.group(1)
    return exprs


def without_variables(expr: str) -> str:
    """Grafana's variables replaced by what Grafana would put there."""
    expr = re.sub(r"\$__(?:rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def test_dashboard_queries_use_only_exported_metrics():
    known = exported_names() | PROMETHEUS_SERIES
    exprs = dashboard_exprs(dashboard())
    assert len(exprs) > 20
    for where, expr in exprs.items():
        assert metric_names(expr), f"{where}: no metric in {expr!r}"
        unknown = metric_names(expr) - known
        assert not unknown, f"{where}: {unknown} not exported by nitro"


def test_dashboard_queries_parse(tmp_path):
    """promtool parses every dashboard query (as a recording rule)."""
    exprs = dashboard_exprs(dashboard())
    group = {"name": "dashboard", "rules": [
        {"record": f"dashboard:query:{i}", "expr": without_variables(expr)} for i, expr in enumerate(exprs.values())]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    proc = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_covers_the_issue():
    """Per-device blk ops and bytes, latency from the histogram, switch
    throughput and drops per port, allowances, guest faults."""
    used = set().union(*map(metric_names, dashboard_exprs(dashboard()).values()))
    assert {"nitro_blk_requests_total", "nitro_blk_bytes_total", "nitro_blk_request_duration_seconds_bucket",
            "nitro_net_packets_total", "nitro_net_bytes_total", "nitro_net_drops_total",
            "nitro_net_bw_in_allowance_exceeded_total", "nitro_net_bw_out_allowance_exceeded_total",
            "nitro_net_pps_allowance_exceeded_total", "nitro_net_linklocal_allowance_exceeded_total",
            "nitro_guest_errors_total", "nitro_device_broken"} <= used


def test_dashboard_datasource_and_variables():
    """Importable anywhere: every query goes to the chosen Prometheus and
    every $variable it uses is defined."""
    dash = dashboard()
    defined = {var["name"] for var in dash["templating"]["list"]}
    assert {"datasource", "instance", "device", "interface"} <= defined
    for panel in panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(?!__)\{?(\w+)", target["expr"]))
            assert used <= defined, (panel["title"], used - defined)
    ids = [panel["id"] for panel in panels(dash)]
    assert len(ids) == len(set(ids))
