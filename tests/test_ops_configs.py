"""The shipped monitoring configs: configs/prometheus (scrape config, alert and recording rules,
their promtool unit tests) and configs/grafana (the dashboard). promtool validates the rules and
runs alerts_test.yml; every metric the rules and the dashboard name must be one a running server
(`gb28181 serve` with simulated devices and a live stream) actually exposes on /metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import http, listed, wait_until

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "configs" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
DASHBOARD = ROOT / "configs" / "grafana" / "gb28181.json"

#: Series Prometheus makes itself for every target; not in the server's exposition.
SYNTHETIC = {"up"}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus; scripts/test.sh does)")


def promtool(*args: str, cwd: Path = ROOT) -> str:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


# -- PromQL metric names --------------------------------------------------------------------------

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2"}
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not function calls,
    keywords, label names (inside braces or grouping clauses) or numbers/durations."""
    expr = re.sub(r"\$\{?\w+\}?", "x", expr)  # Grafana variables: $__rate_interval, ${tier}
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = _LABEL_LISTS.sub("", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, call = match.groups()
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def test_metric_names_parser():
    assert metric_names('sum by (result) (rate(a_total{result=~"rejected:.*"}[5m])) offset 5m') == {"a_total"}
    assert metric_names("b < on (tier) group_left () c:d:target and e > 0.9") == {"b", "c:d:target", "e"}
    assert metric_names('min by (tier) (r{job=~"$job", tier=~"$tier"}[$__rate_interval:])') == {"r"}
    assert metric_names("vector(0.95) * 1e3") == set()


def rule_groups() -> list[dict]:
    return yaml.safe_load(ALERTS.read_text())["groups"]


def rules_exprs() -> list[str]:
    return [rule["expr"] for group in rule_groups() for rule in group["rules"]]


def recorded() -> set[str]:
    return {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows carry their panels
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", []) if t.get("expr")]


def variable_metrics() -> set[str]:
    """Metrics the template variables read: label_values(metric{...}, label)."""
    names = set()
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        found = re.fullmatch(r"label_values\((\w+)(\{[^}]*\})?,\s*\w+\)", query)
        assert found, f"variable {var['name']}: unexpected query {query!r}"
        names.add(found.group(1))
    return names


# -- promtool ---------------------------------------------------------------------------------------

@needs_promtool
def test_promtool_checks_the_rules():
    out = promtool("check", "rules", str(ALERTS))
    assert "SUCCESS" in out


@needs_promtool
def test_promtool_checks_the_scrape_config():
    promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))


@needs_promtool
def test_promtool_unit_tests_of_the_alerts():
    """alerts_test.yml: tier 1 at 90 % fires after its `for:`, at 97 % it does not, and more."""
    promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS)


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    """Each panel query (Grafana variables replaced) goes through promtool as a recording rule."""
    def concrete(expr: str) -> str:
        return re.sub(r"\$\{?\w+\}?", lambda m: "5m" if "interval" in m.group(0) else ".*", expr)

    rules = [{"record": f"dashboard:query_{i}", "expr": concrete(e)} for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(path))


# -- the dashboard's shape --------------------------------------------------------------------------

def test_dashboard_is_importable_and_covers_the_issue():
    d = dashboard()
    assert d["schemaVersion"] >= 36 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        if panel.get("targets"):
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    exprs = "\n".join(dashboard_exprs())
    for wanted in ("gb28181_devices_online", "gb28181_channel_online_ratio", "gb28181_channels{",
                   "gb28181_media_node_streams", "gb28181_media_node_bitrate_bps",
                   "gb28181_register_requests_total", "gb28181_auth_failures_total",
                   "gb28181_keepalives_total", "gb28181_sip_timeouts_total",
                   "gb28181_upstream_registered", "gb28181_media_node_cpu"):
        assert wanted in exprs, wanted


def test_alerts_carry_severity_and_explain_themselves():
    alerts = [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]
    names = {rule["alert"] for rule in alerts}
    assert {"GbTierOnlineRateBelowTarget", "GbDevicesOffline", "GbRegistrationsRejected",
            "GbUpstreamNotRegistered", "GbMediaNodeLost", "GbNoMediaNodes"} <= names
    for rule in alerts:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    targets = [rule for group in rule_groups() for rule in group["rules"]
               if rule.get("record") == "gb28181:channel_online_ratio:target"]
    assert {r["labels"]["tier"]: r["expr"] for r in targets} == {
        "1": "vector(0.95)", "2": "vector(0.90)", "3": "vector(0.80)"}


# -- every metric named exists on a live server -----------------------------------------------------

def exposed_names(text: str) -> set[str]:
    """Names a query can select from one exposition: sample names plus each family's
    suffixed names (_total, _created, _bucket/_count/_sum), also for families with no samples yet."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created"), "gaugehistogram": ("_bucket", "_gcount", "_gsum")}
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def test_every_metric_used_exists_on_a_live_server(served, sims):
    server = served()
    sims(server, "--devices", "3", "--nvr", "--channels", "2", "--password", "12345678")
    sims(server, "--devices", "1", "--first-id", "34020000001320009000", "--password", "not-it")
    def channels() -> list[dict]:
        status, body = server.api("/api/v1/channels")
        return listed(body) if status == 200 and len(listed(body)) == 6 else []

    channel_id = wait_until(channels, 30, "the catalogs of 3 NVRs", server.exited)[0]["channel_id"]
    status, body = server.api(f"/api/v1/channels/{channel_id}/play", "POST")
    assert status == 200, body

    def scrape() -> str:
        status, body = http(server.base + "/metrics")
        assert status == 200
        return body.decode() if isinstance(body, bytes) else body

    def ready() -> str | None:
        text = scrape()
        live = re.search(r"gb28181_media_node_streams\{[^}]*\} [1-9]", text)
        return text if live and 'result="rejected:' in text else None

    text = wait_until(ready, 30, "a rejected REGISTER and a live stream in /metrics", server.exited)
    exposed = exposed_names(text)

    own = recorded()
    used_by_rules = set().union(*map(metric_names, rules_exprs()))
    used_by_dashboard = set().union(*map(metric_names, dashboard_exprs())) | variable_metrics()
    assert "gb28181_channel_online_ratio" in used_by_rules and len(used_by_dashboard) > 20

    missing = {name for name in used_by_rules | used_by_dashboard
               if name not in exposed and name not in own and name not in SYNTHETIC}
    assert not missing, f"not on /metrics: {sorted(missing)}"
    assert not (used_by_dashboard & own), "the dashboard must work without the recording rules loaded"
