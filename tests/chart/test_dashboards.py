"""The Grafana dashboards: well-formed, and covering the metrics an operator of the fleet
needs (the issue's list); the gateway's cold-start histogram they plot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from tests.chart.helm import dashboard_exprs, dashboards, metric_names

# What the fleet's operator must be able to see, and the series that show it.
REQUIRED = {
    "queue depth by model and state": "remotegpu_queue_depth",
    "jobs by model and outcome": "remotegpu_jobs_finished_total",
    "wait time histogram": "remotegpu_job_wait_seconds_bucket",
    "run time histogram": "remotegpu_job_run_seconds_bucket",
    "cold-start time histogram": "remotegpu_model_cold_start_seconds_bucket",
    "desired replicas per model": "remotegpu_operator_desired_replicas",
    "current replicas per model": "remotegpu_operator_replicas",
    "ready replicas per model": "remotegpu_operator_ready_replicas",
    "runtime state per model": "remotegpu_operator_model_state",
    "scale decisions": "remotegpu_operator_scale_decisions_total",
    "worker inference time": "remotegpu_worker_inference_seconds_bucket",
    "worker steps per second": "remotegpu_worker_steps_per_second",
    "model load time": "remotegpu_worker_model_load_seconds",
    "no GPU capacity": "remotegpu_operator_capacity_available",
    "allocated GPUs per model (cost)": "remotegpu_operator_worker_gpus",
    "busy GPU-seconds per model": "remotegpu_worker_job_seconds_sum",
    "Pending worker pods": "remotegpu_operator_unschedulable_replicas",
    "operator errors": "remotegpu_operator_reconcile_errors_total",
    "cold-start phase: operator reaction": "remotegpu_operator_last_wake_to_scale_seconds",
    "cold-start phase: weights load": "remotegpu_worker_model_load_seconds",
    "cold-start phase: warm-up": "remotegpu_worker_model_warmup_seconds",
    "cold-start phases": "remotegpu_cold_start_phase_seconds_bucket",
}
# NVIDIA dcgm-exporter's names (its default counters) for GPU utilisation and memory.
DCGM = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"}
# Grafana's own variables the queries may use.
GRAFANA_VARS = {"__rate_interval", "__range", "__range_s"}


def test_dashboards_cover_the_required_metrics():
    used = metric_names(dashboard_exprs())
    missing = {what: name for what, name in REQUIRED.items() if name not in used}
    assert not missing, missing
    assert DCGM <= {m for e in dashboard_exprs() for m in re.findall(r"\bDCGM_\w+", e)}
    per_model = metric_names(
        [t["expr"] for p in dashboards()["model.json"]["panels"] for t in p.get("targets", [])]
    )
    assert {
        REQUIRED[k]
        for k in (
            "wait time histogram",
            "cold-start time histogram",
            "worker inference time",
            "cold-start phases",
        )
    } <= per_model


@pytest.mark.parametrize("fname", ["fleet-overview.json", "model.json", "gpu-cost.json"])
def test_dashboard_is_well_formed(fname: str):
    d = dashboards()[fname]
    assert d["uid"].startswith("remotegpu-") and d["title"].startswith("RemoteGPU")
    assert "id" not in d or d["id"] is None  # importable into any Grafana
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    occupied: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["refId"] and t["expr"]
            assert 'namespace=~"$namespace"' in t["expr"], (p["title"], t["expr"])
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables or var in GRAFANA_VARS, (p["title"], var)
            # every selector is scoped to the dashboard's namespace
            for sel in re.findall(r"remotegpu_\w+(\{[^}]*\})?", t["expr"]):
                assert "namespace" in sel, (p["title"], t["expr"])


def test_cold_start_histogram_observes_starting_to_ready():
    from remotegpu_gateway.metrics import Metrics

    m = Metrics()
    states = {"a": "sleeping", "b": "ready"}
    update = m.track_cold_starts(lambda: dict(states)).update
    update()
    states["a"] = "starting"
    update()
    update()  # no change: nothing observed
    states["a"] = "ready"
    update()
    states["a"], states["b"] = "sleeping", "sleeping"  # scale-down: not a cold start
    update()
    states["a"] = "starting"
    update()
    states["a"] = "sleeping"  # gave up before ready: not observed either
    update()
    states["a"] = "ready"
    update()
    text = generate_latest(m.registry).decode()
    assert 'remotegpu_model_cold_start_seconds_count{model="a"} 1.0' in text
    assert 'remotegpu_model_cold_start_seconds_count{model="b"}' not in text


def test_gpu_cost_panels_compute_gpu_seconds(tmp_path: Path):
    """The cost panels' numbers on synthetic series, with promtool: a model with 2 workers of
    2 GPUs each for the 10-minute range, whose workers ran jobs for 150 s in total."""
    from tests.chart.test_alerts import run_promtool_test

    cost = {
        p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dashboards()["gpu-cost.json"]["panels"]
    }

    def filled(expr: str) -> str:
        for var, value in (("$namespace", "imaging"), ("$model", ".*"), ("$__rate_interval", "1m"),
                           ("$__range_s", "600"), ("$__range", "10m")):  # fmt: skip
            expr = expr.replace(var, value)
        return expr

    op = 'namespace="imaging", imagemodel="flux-1-dev", model="flux"'
    series = [
        {"series": f"remotegpu_operator_replicas{{{op}}}", "values": "2x20"},
        {"series": f"remotegpu_operator_worker_gpus{{{op}}}", "values": "2x20"},
        # Two worker pods: 90 s and 60 s of jobs within the range (counters from 0; each still 0
        # at the range's first sample, as Prometheus 3's ranges leave out their start).
        {"series": 'remotegpu_worker_job_seconds_sum{namespace="imaging", model="flux", outcome="succeeded", pod="a"}',
         "values": "0x11 30 60 90x7"},
        {"series": 'remotegpu_worker_job_seconds_sum{namespace="imaging", model="flux", outcome="succeeded", pod="b"}',
         "values": "0x12 60x8"},
        {"series": 'remotegpu_worker_busy{namespace="imaging", model="flux", pod="a"}', "values": "0x19 1"},
        {"series": 'remotegpu_worker_busy{namespace="imaging", model="flux", pod="b"}', "values": "0x20"},
    ]  # fmt: skip
    allocated, busy = (filled(e) for e in cost["GPU-seconds allocated vs busy per model (time range)"])
    (Path(tmp_path) / "rules.yaml").write_text("groups: []\n")
    tests = [
        {
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [
                # 4 GPUs x 600 s; 150 job seconds x 2 GPUs each.
                {"expr": allocated, "eval_time": "20m", "exp_samples": [{"labels": '{model="flux"}', "value": 2400}]},
                {"expr": busy, "eval_time": "20m", "exp_samples": [{"labels": '{model="flux"}', "value": 300}]},
                {"expr": filled(cost["GPUs allocated"][0]), "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": 4}]},
                {"expr": filled(cost["GPUs busy"][0]), "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": 2}]},
                {"expr": filled(cost["Busy share of allocated GPU-seconds"][0]), "eval_time": "20m",
                 "exp_samples": [{"labels": "{}", "value": 0.125}]},
            ],
        }
    ]  # fmt: skip
    run_promtool_test(tmp_path, {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests})
