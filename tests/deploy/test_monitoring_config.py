"""monitoring/: the Prometheus config and alert rules pass `promtool check`, every PromQL
expression of every Grafana panel parses (promtool, as recording rules), the alerts fire on the
data they are meant for (`promtool test rules`), and the dashboards are well-formed and cover
every metric the services export. tests/deploy/test_deploy_monitoring.py evaluates the same
expressions against a live stack."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_helpers import (
    ALL_METRICS,
    DASHBOARDS,
    MONITORING,
    SPEC_DECODE_METRICS,
    dashboard_targets,
    find_binary,
    grafana_to_promql,
    metric_names,
)

DATASOURCE_UID = "pagedserve-prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = find_binary("promtool")
    if path is None:
        pytest.skip("promtool not found: apt-get install -y prometheus (.ci/run does)")
    return path


def _run(*argv: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, cwd=cwd, timeout=60)
    assert proc.returncode == 0, f"{' '.join(argv)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_promtool_check_config_and_rules(promtool):
    _run(promtool, "check", "config", str(MONITORING / "prometheus.yml"))
    out = _run(promtool, "check", "rules", str(MONITORING / "alerts.yml"))
    assert "SUCCESS" in out


def test_prometheus_config_scrapes_every_service():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"frontend", "engine", "worker"} <= set(jobs)
    # Every frontend replica, not one behind a load balancer.
    assert jobs["frontend"]["dns_sd_configs"] == [
        {"names": ["frontend"], "type": "A", "port": 8000, "refresh_interval": "15s"}]
    assert jobs["engine"]["static_configs"][0]["targets"] == ["engine:8001"]
    assert jobs["worker"]["static_configs"][0]["targets"] == ["worker:8002"]


def test_alert_rules_cover_the_brief():
    rules = {r["alert"]: r for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    assert {"PagedserveEngineDown", "PagedserveNoFrontendUp", "PagedserveKVCacheFull", "PagedserveHighTTFT",
            "PagedserveHighErrorRatio"} <= set(rules)
    assert "> 0.95" in rules["PagedserveKVCacheFull"]["expr"] and rules["PagedserveKVCacheFull"]["for"] == "5m"
    assert "histogram_quantile(0.99" in rules["PagedserveHighTTFT"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]


def test_dashboard_expressions_parse(promtool, tmp_path):
    """Every panel query, as Grafana would send it, parses: promtool checks them as recording rules."""
    rules = []
    for path in DASHBOARDS:
        for i, (where, expr) in enumerate(dashboard_targets(path)):
            rules.append({"record": f"dashboard:{path.stem.replace('-', '_')}:{i}", "expr": grafana_to_promql(expr)})
    assert len(rules) > 40
    file = tmp_path / "dashboards.rules.yml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    _run(promtool, "check", "rules", str(file))


def test_dashboards_are_well_formed():
    assert {p.stem for p in DASHBOARDS} >= {"pagedserve-overview", "pagedserve-services"}
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] not in uids
        uids.add(board["uid"])
        variables = {v["name"] for v in board["templating"]["list"]}
        ids = set()
        for panel in board["panels"]:
            assert panel["id"] not in ids, (path.name, panel["title"])
            ids.add(panel["id"])
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, (path.name, panel["title"])
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == DATASOURCE_UID, (path.name, panel["title"])
            assert panel["targets"], (path.name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DATASOURCE_UID and target["refId"]
                for var in re.findall(r"\$(\w+)", target["expr"]):
                    assert var in variables or var.startswith("__"), (path.name, panel["title"], var)
                # A multi-value variable only works as a regex match.
                assert '="$' not in target["expr"], (path.name, panel["title"])
    datasource = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["uid"] == DATASOURCE_UID


def test_dashboards_cover_every_metric():
    used = set()
    for path in DASHBOARDS:
        for _, expr in dashboard_targets(path):
            used |= {re.sub(r"_bucket$", "", name) for name in metric_names(expr)}
    missing = (set(ALL_METRICS) | set(SPEC_DECODE_METRICS)) - used
    assert not missing, f"no panel shows {sorted(missing)}"
    overview = " ".join(e for _, e in dashboard_targets(MONITORING / "grafana/dashboards/pagedserve-overview.json"))
    for needle in ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "generation_tokens_total",
                   "requests_running", "requests_waiting", "kv_cache_usage_ratio", "prefix_cache_hit",
                   "preemptions", "finish_reason", "up{", 'status=~"5..'):
        assert needle in overview, needle
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(pagedserve_frontend_time_to_first_token" in overview


# promtool's rule unit tests compare annotations too; these tests are about when alerts fire, so
# they run against a copy of the rules without annotations.
_ALERT_TESTS = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="engine", instance="engine:8001"}'
        values: '1 1 0x10'
      - series: 'up{job="worker", instance="worker:8002"}'
        values: '1x12'
      - series: 'up{job="frontend", instance="10.0.0.2:8000"}'
        values: '1 1 0x10'
      - series: 'up{job="frontend", instance="10.0.0.3:8000"}'
        values: '1 1 1 1 0x10'
    alert_rule_test:
      - eval_time: 10m
        alertname: PagedserveEngineDown
        exp_alerts:
          - exp_labels: {severity: critical, job: engine, instance: "engine:8001"}
      - eval_time: 10m
        alertname: PagedserveNoFrontendUp
        exp_alerts:
          - exp_labels: {severity: critical}
      - eval_time: 4m
        alertname: PagedserveNoFrontendUp
        exp_alerts: []
      - eval_time: 10m
        alertname: PagedserveWorkerDown
        exp_alerts: []
  - interval: 1m
    input_series:
      - series: 'pagedserve_frontend_replica_up{model_name="m", replica="0", instance="a"}'
        values: '1x12'
      - series: 'pagedserve_frontend_replica_up{model_name="m", replica="1", instance="a"}'
        values: '1 1 0x10'
    alert_rule_test:
      - eval_time: 3m
        alertname: PagedserveReplicaDown
        exp_alerts: []
      - eval_time: 6m
        alertname: PagedserveReplicaDown
        exp_alerts:
          - exp_labels: {severity: warning, instance: a, replica: "1"}
  - interval: 1m
    input_series: []
    alert_rule_test:
      - eval_time: 5m
        alertname: PagedserveEngineDown
        exp_alerts:
          - exp_labels: {severity: critical, job: engine}
  - interval: 1m
    input_series:
      - series: 'pagedserve_engine_kv_cache_usage_ratio{model_name="m", instance="engine:8001", job="engine"}'
        values: '0.5 0.5 0.97x10'
      - series: 'pagedserve_engine_kv_cache_usage_ratio{model_name="n", instance="engine:8001", job="engine"}'
        values: '0.9x12'
    alert_rule_test:
      - eval_time: 5m
        alertname: PagedserveKVCacheFull
        exp_alerts: []
      - eval_time: 10m
        alertname: PagedserveKVCacheFull
        exp_alerts:
          - exp_labels: {severity: warning, model_name: m}
  - interval: 1m
    input_series:
      - series: 'pagedserve_frontend_requests_total{model_name="m", finish_reason="stop", instance="a"}'
        values: '0+100x30'
      - series: 'pagedserve_frontend_requests_total{model_name="m", finish_reason="error", instance="a"}'
        values: '0+20x30'
      - series: 'pagedserve_frontend_requests_total{model_name="n", finish_reason="stop", instance="a"}'
        values: '0+100x30'
      - series: 'pagedserve_frontend_requests_total{model_name="n", finish_reason="error", instance="a"}'
        values: '0+1x30'
      - series: 'pagedserve_frontend_http_responses_total{model_name="m", endpoint="/v1/completions", status="200"}'
        values: '0+100x30'
      - series: 'pagedserve_frontend_http_responses_total{model_name="m", endpoint="/v1/completions", status="503"}'
        values: '0+10x30'
      - series: 'pagedserve_frontend_time_to_first_token_seconds_bucket{model_name="m", le="1"}'
        values: '0+10x30'
      - series: 'pagedserve_frontend_time_to_first_token_seconds_bucket{model_name="m", le="10"}'
        values: '0+20x30'
      - series: 'pagedserve_frontend_time_to_first_token_seconds_bucket{model_name="m", le="+Inf"}'
        values: '0+20x30'
      - series: 'pagedserve_frontend_time_to_first_token_seconds_bucket{model_name="n", le="1"}'
        values: '0+20x30'
      - series: 'pagedserve_frontend_time_to_first_token_seconds_bucket{model_name="n", le="10"}'
        values: '0+20x30'
      - series: 'pagedserve_frontend_time_to_first_token_seconds_bucket{model_name="n", le="+Inf"}'
        values: '0+20x30'
    alert_rule_test:
      - eval_time: 20m
        alertname: PagedserveHighErrorRatio
        exp_alerts:
          - exp_labels: {severity: warning, model_name: m}
      - eval_time: 20m
        alertname: PagedserveHigh5xxRatio
        exp_alerts:
          - exp_labels: {severity: warning, model_name: m}
      - eval_time: 20m
        alertname: PagedserveHighTTFT
        exp_alerts:
          - exp_labels: {severity: warning, model_name: m}
      - eval_time: 8m
        alertname: PagedserveHighTTFT
        exp_alerts: []
"""


def test_alerts_fire_when_they_should(promtool, tmp_path):
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "tests.yml").write_text(_ALERT_TESTS)
    _run(promtool, "test", "rules", "tests.yml", cwd=tmp_path)
