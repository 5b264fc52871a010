"""The PrometheusRule's alerts: valid for promtool, and firing (only) when they should,
checked with `promtool test rules` on synthetic series."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import yaml

from tests.chart.helm import alert_rules, promtool_bin

NS = 'namespace="imaging"'


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(promtool_bin()), *args], text=True, capture_output=True)


def test_promtool_check_rules(tmp_path: Path):
    rules = alert_rules(tmp_path=tmp_path)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in rules['groups'])} rules found" in out.stdout


def test_promtool_rejects_a_broken_rule(tmp_path: Path):
    """The check above can fail: a rule with a PromQL syntax error does not pass."""
    rules = copy.deepcopy(alert_rules(tmp_path=tmp_path))
    rules["groups"][0]["rules"][0]["expr"] = "max by (model) (remotegpu_queue_oldest_wait_seconds > "
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", str(path)).returncode != 0


def _alert(name: str, severity: str, **labels: str) -> dict:
    return {"exp_labels": {"alertname": name, "severity": severity, **labels}}


def test_alerts_fire_on_synthetic_series(tmp_path: Path):
    rules = alert_rules(tmp_path=tmp_path)
    for g in rules["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)  # rendered text is not what this test is about
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    m = {"namespace": "imaging", "model": "black-forest-labs/FLUX.1-dev"}
    im = {**m, "imagemodel": "flux-1-dev"}
    series = [
        # Two gateways report the same shared queue; the oldest job ages 60 s per minute.
        {
            "series": f'remotegpu_queue_oldest_wait_seconds{{{NS}, model="{m["model"]}", instance="gw-1"}}',
            "values": "0+60x40",
        },
        {
            "series": f'remotegpu_queue_oldest_wait_seconds{{{NS}, model="{m["model"]}", instance="gw-2"}}',
            "values": "0+60x40",
        },
        {
            "series": f'remotegpu_queue_oldest_wait_seconds{{{NS}, model="fast", instance="gw-1"}}',
            "values": "30x40",
        },
        {
            "series": 'remotegpu_queue_oldest_wait_seconds{namespace="other", model="x", instance="gw-9"}',
            "values": "0+60x40",
        },
        # flux-1-dev stays starting; fast was starting 5 minutes, then ready.
        {
            "series": f'remotegpu_operator_model_state{{{NS}, imagemodel="flux-1-dev", model="{m["model"]}", state="starting"}}',
            "values": "1x40",
        },
        {
            "series": f'remotegpu_operator_model_state{{{NS}, imagemodel="fast", model="fast", state="starting"}}',
            "values": "1x5 0x35",
        },
        # 20 % of flux-1-dev's jobs fail, none of fast's.
        {
            "series": f'remotegpu_jobs_finished_total{{{NS}, model="{m["model"]}", status="failed"}}',
            "values": "0+2x40",
        },
        {
            "series": f'remotegpu_jobs_finished_total{{{NS}, model="{m["model"]}", status="succeeded"}}',
            "values": "0+8x40",
        },
        {
            "series": f'remotegpu_jobs_finished_total{{{NS}, model="fast", status="succeeded"}}',
            "values": "0+10x40",
        },
        # flux-1-dev's pods cannot be scheduled; fast's can.
        {
            "series": f'remotegpu_operator_capacity_available{{{NS}, imagemodel="flux-1-dev", model="{m["model"]}"}}',
            "values": "0x40",
        },
        {
            "series": f'remotegpu_operator_capacity_available{{{NS}, imagemodel="fast", model="fast"}}',
            "values": "1x40",
        },
        # Two operator replicas, neither leads.
        {"series": f'remotegpu_operator_leader{{{NS}, instance="op-1"}}', "values": "0x40"},
        {"series": f'remotegpu_operator_leader{{{NS}, instance="op-2"}}', "values": "0x40"},
        {
            "series": f'remotegpu_operator_reconcile_errors_total{{{NS}, imagemodel="flux-1-dev"}}',
            "values": "0+1x40",
        },
        {"series": f'remotegpu_operator_reconcile_errors_total{{{NS}, imagemodel="fast"}}', "values": "3x40"},
    ]
    at_30m = {
        "RemoteGPUJobsWaitingTooLong": [_alert("RemoteGPUJobsWaitingTooLong", "warning", **m)],
        "RemoteGPUModelStuckStarting": [_alert("RemoteGPUModelStuckStarting", "warning", **im)],
        "RemoteGPUHighJobFailureRate": [_alert("RemoteGPUHighJobFailureRate", "warning", **m)],
        "RemoteGPUNoGPUCapacity": [_alert("RemoteGPUNoGPUCapacity", "critical", **im)],
        "RemoteGPUOperatorNotLeading": [
            _alert("RemoteGPUOperatorNotLeading", "critical", namespace="imaging")
        ],
        "RemoteGPUOperatorReconcileErrors": [
            _alert(
                "RemoteGPUOperatorReconcileErrors", "warning", namespace="imaging", imagemodel="flux-1-dev"
            )
        ],
    }
    names = [r["alert"] for g in rules["groups"] for r in g["rules"]]
    assert sorted(names) == sorted(at_30m)
    alert_tests = [{"eval_time": "30m", "alertname": n, "exp_alerts": exp} for n, exp in at_30m.items()]
    # Not yet: each alert waits for its `for:` (and the queue has not been slow for long).
    alert_tests += [{"eval_time": "3m", "alertname": n, "exp_alerts": []} for n in names]
    test_file = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": alert_tests}],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test_file, sort_keys=False))
    out = promtool("test", "rules", str(tmp_path / "test.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
