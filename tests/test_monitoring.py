"""The Grafana dashboard and the Prometheus alerts (issue 20), checked against the daemon.

Every metric a dashboard query or an alert names must be one the daemon exports (its
registry, watcher/core/metrics.py, with the suffixes each type's samples carry), and the
labels a selector matches on must be the metric's own or ones the scrape adds; so renaming a
metric fails here, not on an operator's empty panel or a silent alert. The rules are checked
and unit-tested by promtool (tests/fixtures/prometheus/watcher-rules-test.yaml), and the
Prometheus Operator's PrometheusRule must carry the same groups as the plain rules file.
Nothing here talks to a Prometheus or a Grafana.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from watcher.core.metrics import Metrics
from watcher.engines.supervisor import WorkerState

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "watcher-dashboard.json"
GRAFANA_README = REPO / "deploy" / "grafana" / "README.md"
RULES = REPO / "deploy" / "prometheus" / "watcher-rules.yaml"
PROMETHEUS_RULE = REPO / "deploy" / "kubernetes" / "monitoring" / "prometheusrule.yaml"
RULES_TEST = REPO / "tests" / "fixtures" / "prometheus" / "watcher-rules-test.yaml"

# Labels the scrape adds to every series: the Prometheus Operator's target labels for a
# PodMonitor (deploy/kubernetes/monitoring/podmonitor.yaml, tests/test_deploy.py's
# scraped_labels), its podTargetLabels, and a plain scrape config's instance.
TARGET_LABELS = frozenset({"namespace", "pod", "container", "endpoint", "job", "instance",
                           "app_kubernetes_io_name"})
# Series that come from Prometheus itself, not from the daemon.
PROMETHEUS_SERIES: dict[str, frozenset[str]] = {"up": frozenset()}
# The sample names each metric type exports, from its family's name.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}
# Grafana's variables, as Prometheus would see them once Grafana has put in their values.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                     "$namespace": ".*", "$pod": ".*"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_IDENTIFIER = re.compile(r"(?<![\w$.:])[A-Za-z_:][\w:]*")
_SELECTOR = re.compile(r"(?<![\w$.:])(watcher_\w+|up)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Exported:
    """What the daemon exports: each sample name with its label names, and the values the
    registry already shows for a label (children created up front)."""

    labels: dict[str, frozenset[str]]
    values: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)


def exported() -> Exported:
    metrics = Metrics()
    # The engine's worker gauge gets its children at the first scrape; the states are these.
    for state in WorkerState:
        metrics.engine_workers.labels(state.value)
    # A labelled metric with no child yet has no samples to show its labels: take them from
    # the metric objects (a family's name is its metric's, suffixes aside).
    declared = {metric._name: frozenset(metric._labelnames) for metric in vars(metrics).values()
                if isinstance(metric, MetricWrapperBase)}
    labels: dict[str, frozenset[str]] = dict(PROMETHEUS_SERIES)
    seen: dict[tuple[str, str], set[str]] = {}
    for family in metrics.registry.collect():
        own = declared.get(family.name, frozenset())
        for sample in family.samples:
            own |= sample.labels.keys() - {"le", "quantile"}
        for suffix in SUFFIXES[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            labels[family.name + suffix] = own | extra
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label not in ("le", "quantile"):
                    for suffix in SUFFIXES[family.type]:
                        seen.setdefault((family.name + suffix, label), set()).add(value)
    return Exported(labels, {key: frozenset(values) for key, values in seen.items()})


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: identifiers outside strings that start
    with watcher_, and Prometheus' own up."""
    code = _STRING.sub('""', expr)
    return {name for name in _IDENTIFIER.findall(code) if name.startswith("watcher_") or name == "up"}


def check_expr(expr: str, known: Exported) -> list[str]:
    """What is wrong with one expression's metrics and label matchers; empty when nothing."""
    problems = []
    names = metric_names(expr)
    if not names:
        problems.append(f"selects no watcher metric: {expr}")
    for name in sorted(names - known.labels.keys()):
        problems.append(f"{name} is not exported by the daemon: {expr}")
    for name, matchers in _SELECTOR.findall(expr):
        if name not in known.labels:
            continue
        allowed = known.labels[name] | TARGET_LABELS
        for label, op, value in _MATCHER.findall(matchers):
            if label not in allowed:
                problems.append(f"{name} has no label {label} (it has {sorted(allowed)}): {expr}")
                continue
            values = known.values.get((name, label))
            if values is None or "$" in value or op.startswith("!"):
                continue
            words = value.split("|") if op == "=~" else [value]
            for word in words:
                if re.fullmatch(r"\w+", word) and word not in values:
                    problems.append(f'{name}{{{label}="{word}"}}: the daemon uses {sorted(values)}: {expr}')
    return problems


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those folded into collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def load_rules() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return rules


def rules_of(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for group in groups for rule in group["rules"]]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: install Debian's prometheus package "
                    "(apt-get install prometheus), which ships /usr/bin/promtool")
    return path


@pytest.fixture(scope="module")
def known() -> Exported:
    return exported()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


# --- the dashboard -----------------------------------------------------------------------

def test_the_dashboard_is_importable(dashboard: dict[str, Any]) -> None:
    for key in ("schemaVersion", "title", "uid", "version", "panels", "templating"):
        assert key in dashboard, f"the dashboard has no {key}"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert re.fullmatch(r"[\w-]{1,40}", dashboard["uid"])
    # An exported dashboard's numeric id would clash with the importing Grafana's.
    assert dashboard.get("id") is None
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "two panels share an id"
    rows = [panel for panel in panels(dashboard) if panel["type"] == "row"]
    assert len(rows) >= 6
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"{panel['title']}: no queries"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_dashboard_asks_for_its_datasource(dashboard: dict[str, Any]) -> None:
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "pod"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    # No panel names a datasource of the exporting Grafana.
    assert "${DS_" not in DASHBOARD.read_text()


def test_the_dashboard_covers_what_operators_watch(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(expr) for expr in dashboard_exprs(dashboard)))
    for name in ("watcher_backlog_documents", "watcher_pickup_seconds_bucket", "watcher_documents_total",
                 "watcher_pages_total", "watcher_stage_seconds_bucket", "watcher_engine_workers",
                 "watcher_engine_restarts_total", "watcher_vlm_request_limit",
                 "watcher_vlm_requests_inflight", "watcher_vlm_server_requests",
                 "watcher_s3_requests_total", "watcher_list_requests_per_second_budget",
                 "watcher_callbacks_total", "watcher_notifications_total", "watcher_ready",
                 "watcher_s3_reachable"):
        assert name in used, f"no panel shows {name}"


def test_every_dashboard_query_uses_exported_metrics(dashboard: dict[str, Any], known: Exported) -> None:
    problems = [p for expr in dashboard_exprs(dashboard) for p in check_expr(expr, known)]
    assert not problems, "\n".join(problems)


def test_the_dashboard_queries_parse_as_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each query (Grafana's variables put in) as a recording rule's."""
    rules = []
    for n, expr in enumerate(dashboard_exprs(dashboard)):
        if expr.startswith("label_values("):
            continue
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("mistake", ["renamed metric", "unknown label", "unknown label value"])
def test_the_check_catches_a_query_out_of_step(
    dashboard: dict[str, Any], known: Exported, mistake: str
) -> None:
    """The check above can fail: the dashboard with one query edited as a rename would leave it."""
    edited = copy.deepcopy(dashboard)
    target = next(t for p in panels(edited) for t in p.get("targets", [])
                  if "watcher_documents_total" in t["expr"])
    name = "watcher_documents_total"
    if mistake == "renamed metric":
        target["expr"] = target["expr"].replace(name, "watcher_documents_finished_total")
        expected = "watcher_documents_finished_total is not exported"
    elif mistake == "unknown label":
        target["expr"] = target["expr"].replace(name + "{", name + '{status="done", ')
        expected = "has no label status"
    else:
        target["expr"] = target["expr"].replace(name + "{", name + '{outcome="ok", ')
        expected = 'outcome="ok"'
    problems = [p for expr in dashboard_exprs(edited) for p in check_expr(expr, known)]
    assert any(expected in p for p in problems), problems
    assert not [p for expr in dashboard_exprs(dashboard) for p in check_expr(expr, known)]


def test_metric_names_are_read_from_promql() -> None:
    expr = ('sum by (namespace) (rate(watcher_s3_requests_total{op="list", pod=~"$pod"}[$__rate_interval]))'
            ' / max(watcher_list_requests_per_second_budget) or absent(up{job=~".*watcher_x.*"})')
    assert metric_names(expr) == {"watcher_s3_requests_total", "watcher_list_requests_per_second_budget",
                                  "up"}


# --- the alerts --------------------------------------------------------------------------

def test_every_alert_uses_exported_metrics(known: Exported) -> None:
    rules = rules_of(load_rules()["groups"])
    assert rules
    problems = [p for rule in rules for p in check_expr(str(rule["expr"]), known)]
    assert not problems, "\n".join(problems)


def test_every_alert_is_actionable() -> None:
    rules = rules_of(load_rules()["groups"])
    names = {rule["alert"] for rule in rules}
    assert names == {"WatcherDown", "WatcherNotReady", "WatcherS3Unreachable", "WatcherBacklogStuck",
                     "WatcherEngineRestartStorm", "WatcherErrorRecordRateHigh",
                     "WatcherListBudgetSaturated", "WatcherCallbacksFailing"}
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 80, rule["alert"]


def test_the_prometheus_rule_carries_the_same_groups() -> None:
    resource = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == load_rules()["groups"]
    pod_monitor = yaml.safe_load((PROMETHEUS_RULE.parent / "podmonitor.yaml").read_text())
    assert resource["metadata"]["labels"] == pod_monitor["metadata"]["labels"]


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = subprocess.run([promtool(), "test", "rules", str(RULES_TEST)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_unit_tests_use_these_rules() -> None:
    spec = yaml.safe_load(RULES_TEST.read_text())
    files = [(RULES_TEST.parent / name).resolve() for name in spec["rule_files"]]
    assert files == [RULES]


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    spec = yaml.safe_load(RULES_TEST.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in spec["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {rule["alert"] for rule in rules_of(load_rules()["groups"])}
    assert alerts - firing == set(), f"no case where these fire: {sorted(alerts - firing)}"
    assert alerts - quiet == set(), f"no case where these stay quiet: {sorted(alerts - quiet)}"
    unknown = (firing | quiet) - alerts
    assert not unknown, f"cases for alerts that do not exist: {sorted(unknown)}"


def test_the_readme_names_every_row(dashboard: dict[str, Any]) -> None:
    text = GRAFANA_README.read_text()
    for panel in panels(dashboard):
        if panel["type"] == "row":
            assert panel["title"] in text, f"deploy/grafana/README.md leaves out row {panel['title']!r}"
    assert "tests/test_monitoring.py" in text


def test_the_readme_names_every_metric_the_daemon_exports() -> None:
    readme = (REPO / "README.md").read_text()
    families = [family.name for family in Metrics().registry.collect()]
    assert families and all(name.startswith("watcher_") for name in families)
    missing = [name for name in families if not re.search(rf"`{name}(_total)?[`{{]", readme)]
    assert not missing, f"add these to the README's /metrics list: {missing}"
