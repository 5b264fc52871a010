"""The Grafana dashboards: well-formed, and covering the metrics an operator of the fleet
needs (the issue's list); the gateway's cold-start histogram they plot."""

from __future__ import annotations

import re

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
    "cold-start phases": "remotegpu_cold_start_phase_seconds_bucket",
}


def test_dashboards_cover_the_required_metrics():
    used = metric_names(dashboard_exprs())
    missing = {what: name for what, name in REQUIRED.items() if name not in used}
    assert not missing, missing
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


@pytest.mark.parametrize("fname", ["fleet-overview.json", "model.json"])
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
                assert var in variables or var == "__rate_interval", (p["title"], var)
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
