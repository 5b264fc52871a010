"""Prometheus finds the real pods through Kubernetes service discovery, as the chart's
ServiceMonitors and PodMonitor tell it to, and scrapes every metric the chart's
dashboards and alerts use.

Prometheus (the pinned one cluster/build.sh builds; Debian's has no Kubernetes
discovery) runs on the host: a loopback port, its own config and data folder. Its
scrape jobs are the chart's monitors (rendered for this release with
`metrics.serviceMonitor/podMonitor.enabled`) turned into `kubernetes_sd_configs` the
way prometheus-operator does: the gateway's and operator's Services through their
EndpointSlices, the worker pods directly, selected by the monitors' labels and port
names, listed from the API server with the admin's client certificate. So the
monitors' selectors and ports are checked against the real Services and pods, and
the targets are the pods' own addresses, as for an in-cluster Prometheus. Stopped
by pid at the end.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.localcluster import free_port
from tests.chart.helm import (
    alert_exprs,
    alert_rules,
    dashboard_exprs,
    dashboards,
    find,
    metric_names,
    prometheus_bin,
    promtool_bin,
    render,
)
from tests.chart.test_prometheus import Prometheus, grafana_to_promql, http_ok
from tests.e2e.system import RELEASE, System
from tests.waiting import wait_for

# The first test also builds and imports the images when their inputs changed (minutes).
pytestmark = [pytest.mark.cluster, pytest.mark.real_nodes, pytest.mark.timeout(2400)]

MONITORING = {"enabled": True, "interval": "1s", "scrapeTimeout": "900ms"}


def meta(name: str) -> str:
    """A Kubernetes label name as a discovery meta label's suffix (app.kubernetes.io/x -> app_kubernetes_io_x)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def selected(kind: str, match_labels: dict[str, str]) -> list[dict]:
    """Keep the targets whose Service (kind "service") or pod carries every label of the selector."""
    return [
        {
            "source_labels": [f"__meta_kubernetes_{kind}_label_{meta(k)}"],
            "regex": re.escape(v),
            "action": "keep",
        }
        for k, v in match_labels.items()
    ]


def scrape_job(
    name: str, role: str, namespaces: list[str], endpoint: dict, relabel: list[dict], sd: dict
) -> dict:
    """One endpoint's scrape job; its targets labelled as prometheus-operator labels them."""
    return {
        "job_name": name,
        "scrape_interval": endpoint["interval"],
        "scrape_timeout": endpoint["scrapeTimeout"],
        "metrics_path": endpoint.get("path", "/metrics"),
        "honor_labels": endpoint.get("honorLabels", False),
        "kubernetes_sd_configs": [{"role": role, "namespaces": {"names": namespaces}, **sd}],
        "relabel_configs": [
            *relabel,
            {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Failed|Succeeded", "action": "drop"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        ],
    }


def monitor_jobs(monitor: dict, sd: dict) -> list[dict]:
    """A ServiceMonitor's or PodMonitor's endpoints as Prometheus scrape jobs."""
    spec, name = monitor["spec"], f"{monitor['metadata']['namespace']}/{monitor['metadata']['name']}"
    namespaces = spec["namespaceSelector"]["matchNames"]
    if monitor["kind"] == "ServiceMonitor":
        return [
            scrape_job(f"serviceMonitor/{name}/{i}", "endpointslice", namespaces, ep, [
                *selected("service", spec["selector"]["matchLabels"]),
                {"source_labels": ["__meta_kubernetes_endpointslice_port_name"], "regex": ep["port"],
                 "action": "keep"},
                {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
            ], sd)
            for i, ep in enumerate(spec["endpoints"])
        ]  # fmt: skip
    pod_labels = [
        {"source_labels": [f"__meta_kubernetes_pod_label_{meta(label)}"], "target_label": meta(label)}
        for label in spec.get("podTargetLabels", [])
    ]
    return [
        scrape_job(f"podMonitor/{name}/{i}", "pod", namespaces, ep, [
            *selected("pod", spec["selector"]["matchLabels"]),
            {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": ep["port"], "action": "keep"},
            *pod_labels,
        ], sd)
        for i, ep in enumerate(spec["podMetricsEndpoints"])
    ]  # fmt: skip


def cost_panels(namespace: str) -> dict[str, list[str]]:
    """The GPU cost dashboard's panels but the DCGM exporter's (it needs real GPUs), their
    queries as Grafana sends them for a 15-minute time range."""
    return {
        p["title"]: [
            grafana_to_promql(t["expr"].replace("$__range_s", "900").replace("$__range", "15m"), namespace)
            for t in p["targets"]
        ]
        for p in dashboards()["gpu-cost.json"]["panels"]
        if p.get("targets") and not any("DCGM_" in t["expr"] for t in p["targets"])
    }


def check_cost_dashboard(system: System, prom: Prometheus, model: str) -> None:
    """Every cost panel has data from what Prometheus scraped from the running system; a
    job's run shows as 1 busy GPU while it runs, then as busy GPU-seconds within the
    allocated ones."""
    panels = cost_panels(system.namespace)
    by_model = lambda expr: {s["metric"].get("model"): float(s["value"][1]) for s in prom.query(expr)}  # noqa: E731
    job = system.submit(model, seed=31, steps=50, size={"width": 1024, "height": 1024})
    wait_for(lambda: system.job(job)["status"] == "running", 240, "the job to run")
    wait_for(lambda: by_model(panels["GPUs busy"][0]).get(None) == 1, 60, "1 busy GPU while the job runs")
    empty = lambda: [t for t, exprs in panels.items() if not any(prom.query(e) for e in exprs)]  # noqa: E731
    try:
        wait_for(lambda: not empty(), 60, "data in every cost panel")
    except AssertionError as e:
        raise AssertionError(f"{e}; no data in: {empty()}") from None
    assert system.wait_job(job, timeout=300)["status"] == "succeeded"
    allocated_expr, busy_expr = panels["GPU-seconds allocated vs busy per model (time range)"]
    busy = wait_for(
        lambda: by_model(busy_expr).get(model, 0) > 0 and by_model(busy_expr), 60, "busy GPU-seconds"
    )
    allocated = by_model(allocated_expr)
    assert 0 < busy[model] <= allocated[model], (busy, allocated)
    (share,) = prom.query(panels["Busy share of allocated GPU-seconds"][0])
    assert 0 < float(share["value"][1]) <= 1, share
    print(f"GPU cost on the real scrape (15 min): {model} allocated {allocated[model]:.0f} GPU-s, "
          f"busy {busy[model]:.1f} GPU-s, busy share {float(share['value'][1]):.3f}")  # fmt: skip


def test_prometheus_discovers_the_real_pods_and_scrapes_every_metric_used(system: System, tmp_path: Path):
    kubeconfig = yaml.safe_load(system.kube.kubeconfig.read_text())
    cluster, user = kubeconfig["clusters"][0]["cluster"], kubeconfig["users"][0]["user"]
    sd = {"api_server": cluster["server"], "tls_config": {"ca_file": cluster["certificate-authority"],
          "cert_file": user["client-certificate"], "key_file": user["client-key"]}}  # fmt: skip
    chart = render({"metrics": {"serviceMonitor": MONITORING, "podMonitor": MONITORING}}, tmp_path,
                   release=RELEASE, namespace=system.namespace)  # fmt: skip
    monitors = find(chart, "ServiceMonitor") + find(chart, "PodMonitor")
    jobs = [job for m in monitors for job in monitor_jobs(m, sd)]
    assert len(jobs) == 3, [j["job_name"] for j in jobs]  # gateway, operator, workers
    rules = alert_rules(tmp_path, namespace=system.namespace)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": jobs,
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    check = subprocess.run(
        [str(promtool_bin()), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(prometheus_bin()), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}")
        wait_for(lambda: proc.poll() is None and http_ok(f"{prom.url}/-/ready"), 60, "Prometheus ready")
        # Jobs, so that a worker pod runs (and is discovered) for a while.
        model = system.tiny_models["flux1"]
        submitted = [system.submit(model, seed=i, steps=20) for i in range(3)]
        up = lambda job: prom.query(f'max_over_time(up{{job="{job}", namespace="{system.namespace}"}}[15m])')  # noqa: E731
        for job in (j["job_name"] for j in jobs):
            wait_for(
                lambda job=job: any(s["value"][1] == "1" for s in up(job)), 240, f"a pod scraped by {job}"
            )
        for j in submitted:
            assert system.wait_job(j, timeout=300)["status"] == "succeeded"
        used = metric_names(dashboard_exprs()) | metric_names(alert_exprs(rules))
        missing = lambda: used - prom.names()  # noqa: E731
        try:
            wait_for(lambda: not missing(), 90, "Prometheus to scrape every metric used")
        except AssertionError:
            raise AssertionError(
                f"used by the chart but never scraped: {sorted(missing())}\n"
                f"{(tmp_path / 'prometheus.log').read_text()[-3000:]}"
            ) from None
        # The targets are the pods themselves, on the real nodes' pod network; the
        # workers' carry their ImageModel (the PodMonitor's podTargetLabels).
        targets = prom.api("targets")["activeTargets"]
        assert {t["labels"]["job"] for t in targets} >= {j["job_name"] for j in jobs[:2]}
        assert all(t["labels"]["instance"].startswith("10.244.") for t in targets), targets
        services = {t["labels"].get("service") for t in targets}
        assert {f"{RELEASE}-remotegpu-gateway", f"{RELEASE}-remotegpu-operator-metrics"} <= services, services
        workers = prom.query(f'up{{job="{jobs[2]["job_name"]}", namespace="{system.namespace}"}}[15m]')
        imagemodels = {
            m["metadata"]["name"]
            for m in system.kube.get_json("imagemodels", namespace=system.namespace)["items"]
        }
        assert workers and {s["metric"].get("remotegpu_ai_imagemodel") for s in workers} <= imagemodels, (
            workers
        )
        check_cost_dashboard(system, prom, model)
        # The system is shared with the next tests: leave the model asleep, as it was found.
        wait_for(lambda: system.state(model) == "sleeping", 180, "the model to go back to sleeping")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
