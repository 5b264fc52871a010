"""Debian's Prometheus finds the real pods through Kubernetes service discovery and
scrapes every metric the chart's dashboards and alerts use.

Prometheus runs on the host (a loopback port, its own config and data folder) and
lists the release's pods from the API server (`kubernetes_sd_configs`, role pod, the
admin's client certificate); it scrapes the gateway, operator and worker containers
on their pod addresses, as an in-cluster Prometheus would. Stopped by pid at the end.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.localcluster import free_port
from tests.chart.helm import alert_exprs, alert_rules, dashboard_exprs, metric_names
from tests.chart.test_prometheus import Prometheus, http_ok
from tests.e2e.system import System
from tests.waiting import wait_for

# The first test also builds and imports the images when their inputs changed (minutes).
pytestmark = [pytest.mark.cluster, pytest.mark.real_nodes, pytest.mark.timeout(2400)]

COMPONENTS = {"gateway": "http", "operator": "metrics", "worker": "http"}


def sd_job(component: str, port_name: str, namespace: str, kubeconfig: dict) -> dict:
    """A scrape job for one component's pods, discovered through the API server."""
    cluster, user = kubeconfig["clusters"][0]["cluster"], kubeconfig["users"][0]["user"]
    tls = {"ca_file": cluster["certificate-authority"], "cert_file": user["client-certificate"],
           "key_file": user["client-key"]}  # fmt: skip
    return {
        "job_name": component,
        "scrape_interval": "1s",
        "scrape_timeout": "900ms",
        "honor_labels": component == "operator",  # its per-model series carry their own namespace
        "kubernetes_sd_configs": [
            {"role": "pod", "api_server": cluster["server"], "tls_config": tls, "namespaces": {"names": [namespace]}}
        ],
        "relabel_configs": [
            {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"], "regex": component,
             "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": port_name, "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Running", "action": "keep"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        ],
    }  # fmt: skip


def test_prometheus_discovers_the_real_pods_and_scrapes_every_metric_used(system: System, tmp_path: Path):
    prometheus_bin = shutil.which("prometheus")
    assert prometheus_bin, "prometheus is missing: `make system-deps` installs Debian's prometheus package"
    kubeconfig = yaml.safe_load(system.kube.kubeconfig.read_text())
    rules = alert_rules(tmp_path, namespace=system.namespace)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [sd_job(c, p, system.namespace, kubeconfig) for c, p in COMPONENTS.items()],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    check = subprocess.run(
        [
            str(Path(prometheus_bin).with_name("promtool")),
            "check",
            "config",
            str(tmp_path / "prometheus.yml"),
        ],
        capture_output=True,
        text=True,
    )
    if "field kubernetes_sd_configs not found" in check.stdout + check.stderr:
        # Debian's build leaves the Kubernetes discovery out (client-go is not packaged).
        pytest.skip(f"{prometheus_bin} is built without kubernetes_sd_configs")
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}")
        wait_for(lambda: proc.poll() is None and http_ok(f"{prom.url}/-/ready"), 60, "Prometheus ready")
        # Jobs, so that a worker pod runs (and is discovered) for a while.
        model = system.tiny_models["flux1"]
        jobs = [system.submit(model, seed=i, steps=20) for i in range(3)]
        up = lambda job: prom.query(f'max_over_time(up{{job="{job}", namespace="{system.namespace}"}}[15m])')  # noqa: E731
        for job in COMPONENTS:
            wait_for(lambda job=job: any(s["value"][1] == "1" for s in up(job)), 240, f"a {job} pod scraped")
        for j in jobs:
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
        # The targets are the pods themselves, on the real nodes' pod network.
        targets = prom.api("targets")["activeTargets"]
        assert {t["labels"]["job"] for t in targets} >= {"gateway", "operator"}
        assert all(t["labels"]["instance"].startswith("10.244.") for t in targets), targets
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
