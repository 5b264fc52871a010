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
        # Both gateways stop answering at minute 3; another namespace's is fine.
        {"series": f'up{{{NS}, job="remotegpu-gateway", instance="gw-1"}}', "values": "1x2 0x38"},
        {"series": f'up{{{NS}, job="remotegpu-gateway", instance="gw-2"}}', "values": "1x2 0x38"},
        {"series": 'up{namespace="other", job="remotegpu-gateway", instance="gw-9"}', "values": "1x40"},
        # flux-1-dev keeps a ready worker that never runs a job; fast's ran one at minute 51.
        {"series": f'remotegpu_worker_ready{{{NS}, model="{m["model"]}", pod="dev-0"}}', "values": "1x150"},
        {"series": f'remotegpu_worker_busy{{{NS}, model="{m["model"]}", pod="dev-0"}}', "values": "0x150"},
        {"series": f'remotegpu_worker_ready{{{NS}, model="fast", pod="fast-0"}}', "values": "1x150"},
        {"series": f'remotegpu_worker_busy{{{NS}, model="fast", pod="fast-0"}}', "values": "0x50 1 0x99"},
    ]
    at_30m = {
        "RemoteGPUJobsWaitingTooLong": [_alert("RemoteGPUJobsWaitingTooLong", "warning", **m)],
        "RemoteGPUModelStuckStarting": [_alert("RemoteGPUModelStuckStarting", "warning", **im)],
        "RemoteGPUHighJobFailureRate": [_alert("RemoteGPUHighJobFailureRate", "warning", **m)],
        # A shortage of GPUs is a warning (jobs wait), not a page.
        "RemoteGPUNoGPUCapacity": [_alert("RemoteGPUNoGPUCapacity", "warning", **im)],
        "RemoteGPUOperatorNotLeading": [
            _alert("RemoteGPUOperatorNotLeading", "critical", namespace="imaging")
        ],
        "RemoteGPUOperatorReconcileErrors": [
            _alert(
                "RemoteGPUOperatorReconcileErrors", "warning", namespace="imaging", imagemodel="flux-1-dev"
            )
        ],
    }
    at_30m["RemoteGPUGatewayDown"] = [_alert("RemoteGPUGatewayDown", "critical", namespace="imaging")]
    at_30m["RemoteGPUGPUsIdle"] = []  # no worker has been there for the whole hour yet
    names = [r["alert"] for g in rules["groups"] for r in g["rules"]]
    assert sorted(names) == sorted(at_30m)
    alert_tests = [{"eval_time": "30m", "alertname": n, "exp_alerts": exp} for n, exp in at_30m.items()]
    # An hour later flux-1-dev's worker has idled for the whole hour, fast's has not yet (minute 51)...
    alert_tests.append(
        {
            "eval_time": "90m",
            "alertname": "RemoteGPUGPUsIdle",
            "exp_alerts": [_alert("RemoteGPUGPUsIdle", "warning", **m)],
        }
    )
    # ... and at 2 h both have.
    alert_tests.append(
        {
            "eval_time": "120m",
            "alertname": "RemoteGPUGPUsIdle",
            "exp_alerts": [
                _alert("RemoteGPUGPUsIdle", "warning", **m),
                _alert("RemoteGPUGPUsIdle", "warning", namespace="imaging", model="fast"),
            ],
        }
    )
    # Not yet: each alert waits for its `for:` (and the queue has not been slow for long).
    alert_tests += [{"eval_time": "3m", "alertname": n, "exp_alerts": []} for n in names]
    test_file = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": alert_tests}],
    }
    run_promtool_test(tmp_path, test_file)


def run_promtool_test(tmp_path: Path, test_file: dict) -> None:
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test_file, sort_keys=False))
    out = promtool("test", "rules", str(tmp_path / "test.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_nothing_scraped_at_all_fires_too(tmp_path: Path):
    """No operator and no gateway scraped in the namespace (absent()): still alerts; with a
    leading operator and a gateway that answers, none."""
    rules = alert_rules(tmp_path=tmp_path)
    for g in rules["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    elsewhere = [
        {"series": 'remotegpu_operator_leader{namespace="other", instance="op-9"}', "values": "1x20"},
        {"series": 'up{namespace="other", job="remotegpu-gateway", instance="gw-9"}', "values": "1x20"},
    ]
    here = [
        {"series": f'remotegpu_operator_leader{{{NS}, instance="op-1"}}', "values": "1x20"},
        {"series": f'up{{{NS}, job="remotegpu-gateway", instance="gw-1"}}', "values": "0x20"},
        {"series": f'up{{{NS}, job="remotegpu-gateway", instance="gw-2"}}', "values": "1x20"},
    ]
    fired = {
        n: [_alert(n, "critical", namespace="imaging")]
        for n in ("RemoteGPUOperatorNotLeading", "RemoteGPUGatewayDown")
    }
    tests = [
        {
            "interval": "1m",
            "input_series": elsewhere,
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": n, "exp_alerts": e} for n, e in fired.items()
            ],
        },
        {
            "interval": "1m",
            "input_series": elsewhere + here,  # one gateway of two down is no outage
            "alert_rule_test": [{"eval_time": "10m", "alertname": n, "exp_alerts": []} for n in fired],
        },
    ]
    run_promtool_test(tmp_path, {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests})


def test_additional_labels_set_severity_once(tmp_path: Path):
    """`severity` in additionalAlertLabels replaces the chart's (a duplicated key is invalid
    YAML for Prometheus, and the parsers that take it keep one at random)."""
    from tests.chart.helm import template

    values = {
        "metrics": {
            "prometheusRule": {
                "enabled": True,
                "additionalAlertLabels": {"severity": "page", "team": "imaging"},
                "severities": {"RemoteGPUGPUsIdle": "info"},
            }
        }
    }
    text = template(values, tmp_path, extra=("--show-only", "templates/prometheusrule.yaml")).stdout
    rules = [r for g in yaml.safe_load(text)["spec"]["groups"] for r in g["rules"]]
    assert text.count("severity:") == len(rules) == 8
    assert all(r["labels"] == {"severity": "page", "team": "imaging"} for r in rules)
    plain = alert_rules(tmp_path=tmp_path)
    severities = {r["alert"]: r["labels"] for g in plain["groups"] for r in g["rules"]}
    assert severities["RemoteGPUNoGPUCapacity"] == {"severity": "warning"}
    values["metrics"]["prometheusRule"]["additionalAlertLabels"] = {"team": "imaging"}
    text = template(values, tmp_path, extra=("--show-only", "templates/prometheusrule.yaml")).stdout
    labels = {r["alert"]: r["labels"] for g in yaml.safe_load(text)["spec"]["groups"] for r in g["rules"]}
    assert labels["RemoteGPUGPUsIdle"] == {"severity": "info", "team": "imaging"}
