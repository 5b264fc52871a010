"""A real Prometheus (the pinned one cluster/build.sh builds) scrapes a running gateway,
operator and worker, and every metric the chart's dashboards and alerts use is among
what it scraped.

The gateway serves its catalog from ImageModels in the test namespace of the local
control plane; the operator reconciles them there (KWOK plays the worker pod); a real
worker process serves the tiny random-weight FLUX.1 model on the CPU and runs one job.
Prometheus runs on a loopback port with its own config and data folder and loads the
chart's alert rules; everything is stopped by pid at the end.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from remotegpu_base.catalog import load_models_file

from cluster.localcluster import free_port
from tests.chart.helm import (
    REPO,
    alert_exprs,
    alert_rules,
    dashboard_exprs,
    dashboards,
    metric_names,
    prometheus_bin,
)
from tests.fixtures.cluster import Kube
from tests.fixtures.processes import Proc
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

TOKEN = "prometheus-test-worker-token"
MODEL = "remotegpu/tiny-random-flux1"


def http_json(url: str, data: dict | None = None, headers: dict | None = None, timeout: float = 10) -> Any:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def http_text(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return ""


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def clean_env(kube: Kube, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("REMOTEGPU_") and k != "KUBERNETES_SERVICE_HOST"
    }
    env.update(KUBECONFIG=str(kube.kubeconfig), REMOTEGPU_WORKER_TOKEN=TOKEN, PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")  # fmt: skip
    env.update(extra)
    return env


def tiny_imagemodel(namespace: str) -> dict[str, Any]:
    (entry,) = [m for m in load_models_file() if m.spec.model == MODEL]
    res = entry.to_resource(namespace)
    res["spec"]["worker"]["image"] = "example.invalid/remotegpu-worker:test"  # KWOK runs no image
    res["spec"]["worker"]["gpu"] = {"count": 1}  # KWOK's nodes have GPUs: the cost panels count one
    return res


WORKER_POD = "tiny-random-flux1-worker-0"
DCGM_UTIL = 87


class DcgmExporter:
    """What NVIDIA's dcgm-exporter serves for the worker pod's GPU (its metric names and its
    Kubernetes pod labels), from a loopback port: there is no GPU here."""

    def __init__(self, namespace: str):
        labels = (
            f'gpu="0",UUID="GPU-5fd4bd5c-0000-0000-0000-000000000000",device="nvidia0",'
            f'modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",container="worker",'
            f'namespace="{namespace}",pod="{WORKER_POD}"'
        )
        body = "".join(
            f"# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {value}\n"
            for name, help, value in (
                ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", DCGM_UTIL),
                ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", 40960),
                ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", 40960),
            )
        ).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dcgm(namespace: str) -> Iterator[DcgmExporter]:
    exporter = DcgmExporter(namespace)
    yield exporter
    exporter.stop()


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        q = f"?{urllib.parse.urlencode(params)}" if params else ""
        out = http_json(f"{self.url}/api/v1/{path}{q}")
        assert out["status"] == "success", out
        return out["data"]

    def names(self) -> set[str]:
        return set(self.api("label/__name__/values"))

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]


def grafana_to_promql(expr: str, namespace: str) -> str:
    """A dashboard query as Prometheus runs it once Grafana has filled in its variables."""
    m = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr.strip(), re.S)
    if m:  # a template variable's query: the series whose label values it lists
        expr = m.group(1)
    for var, value in (("$namespace", namespace), ("$model", ".*"), ("$__rate_interval", "1m"),
                       ("$__range_s", "300"), ("$__range", "5m")):  # fmt: skip
        expr = expr.replace(var, value)
    return expr


def test_prometheus_scrapes_every_metric_the_dashboards_and_alerts_use(
    kube: Kube,
    crd: None,
    namespace: str,
    tiny_data_dir: Path,
    procs: Callable[..., Proc],
    dcgm: DcgmExporter,
    tmp_path: Path,
):
    gw_port, op_port, wk_port, prom_port = free_port(), free_port(), free_port(), free_port()
    gateway_url = f"http://127.0.0.1:{gw_port}"

    # Prometheus first, with the chart's alert rules; targets labelled as a ServiceMonitor would.
    rules = alert_rules(tmp_path, namespace=namespace)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    target = lambda job, port, **kw: {  # noqa: E731
        "job_name": job, "scrape_interval": "1s", "scrape_timeout": "900ms", **kw,
        "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": namespace}}],
    }  # fmt: skip
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [
            target("gateway", gw_port),
            target("operator", op_port, honor_labels=True),
            target("worker", wk_port),
            # As a ServiceMonitor scrapes the exporter in its own namespace (no honorLabels):
            # the GPU's pod labels become exported_namespace / exported_pod.
            {
                "job_name": "dcgm",
                "scrape_interval": "1s",
                "scrape_timeout": "900ms",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{dcgm.port}"],
                        "labels": {"namespace": "gpu-operator", "pod": "nvidia-dcgm-exporter-x1"},
                    }
                ],
            },  # fmt: skip
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_proc = procs(
        [str(prometheus_bin()), f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--storage.tsdb.retention.time=1h"],
        dict(os.environ), tmp_path / "prometheus.log", name="prometheus",
    )  # fmt: skip
    prom = Prometheus(f"http://127.0.0.1:{prom_port}")
    wait_for(lambda: prom_proc.alive() and http_ok(f"{prom.url}/-/ready"), 60, "Prometheus ready")

    remotegpu = [sys.executable, "-m", "remotegpu.cli"]
    gw_data = tmp_path / "gateway"
    gateway = procs(
        [*remotegpu, "gateway", "--host", "127.0.0.1", "--port", str(gw_port), "--namespace", namespace,
         "--data-dir", str(gw_data), "--public-url", gateway_url],
        clean_env(kube), tmp_path / "gateway.log", name="gateway",
    )  # fmt: skip
    wait_for(lambda: gateway.alive() and http_ok(f"{gateway_url}/readyz"), 90, "the gateway")
    operator = procs(
        [*remotegpu, "operator", "--namespace", namespace, "--gateway-url", gateway_url,
         "--host", "127.0.0.1", "--port", str(op_port)],
        clean_env(kube, REMOTEGPU_OPERATOR_INTERVAL="0.5", POD_NAME="operator-test", POD_NAMESPACE=namespace),
        tmp_path / "operator.log", name="operator",
    )  # fmt: skip
    try:
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(tiny_imagemodel(namespace)))
        wait_for(
            lambda: operator.alive()
            and "remotegpu_operator_leader 1.0" in http_text(f"http://127.0.0.1:{op_port}/metrics"),
            90, "the operator to lead",
        )  # fmt: skip
        wait_for(
            lambda: MODEL in [m["model"] for m in http_json(f"{gateway_url}/v1/inference/models")["image"]]
            if http_ok(f"{gateway_url}/v1/inference/models") else False,
            30, "the gateway to serve the ImageModel",
        )  # fmt: skip

        # A job for the sleeping model: the operator scales from zero, KWOK's pod turns Ready.
        key = subprocess.run(
            [*remotegpu, "keys", "create", "--name", "prom", "--scope", "inference", "--data-dir", str(gw_data)],
            env=clean_env(kube), cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        auth = {"Authorization": f"Bearer {key}"}
        job = http_json(
            f"{gateway_url}/v1/inference/image", {"model": MODEL, "prompt": "a fox", "steps": 2}, auth
        )
        wait_for(
            lambda: (kube.get_json("imagemodel", "tiny-random-flux1", namespace=namespace).get("status") or {}).get("state")
            == "ready",
            60, "the operator to scale up and report ready",
        )  # fmt: skip

        # The worker process behind the pod: loads the tiny model and runs the job.
        worker = procs(
            [*remotegpu, "worker", "--model", MODEL, "--gateway-url", gateway_url, "--host", "127.0.0.1",
             "--port", str(wk_port), "--data-dir", str(tiny_data_dir)],
            clean_env(kube, REMOTEGPU_DEVICE="cpu", REMOTEGPU_WORKER_ID="tiny-random-flux1-worker-0",
                      REMOTEGPU_TORCH_THREADS="1"),
            tmp_path / "worker.log", name="worker",
        )  # fmt: skip
        status = wait_for(
            lambda: worker.alive()
            and http_json(f"{gateway_url}/v1/inference/jobs/{job['job_id']}", headers=auth)["status"]
            in ("succeeded", "failed", "cancelled")
            and http_json(f"{gateway_url}/v1/inference/jobs/{job['job_id']}", headers=auth)["status"],
            240, "the job to finish",
        )  # fmt: skip
        assert status == "succeeded", worker.tail()

        # Every metric the dashboards and alerts use is in what Prometheus scraped.
        used = metric_names(dashboard_exprs()) | metric_names(alert_exprs(rules))
        assert len(used) > 20
        used |= {m for e in dashboard_exprs() for m in re.findall(r"\bDCGM_\w+", e)}
        missing = lambda: used - prom.names()  # noqa: E731
        try:
            wait_for(lambda: not missing(), 60, "Prometheus to scrape every metric used")
        except AssertionError:
            raise AssertionError(f"used by the chart but never scraped: {sorted(missing())}") from None

        # Every target's last scrape up (one slow answer on a loaded machine may miss a timeout).
        targets = lambda: prom.api("targets")["activeTargets"]  # noqa: E731
        try:
            wait_for(lambda: all(t["health"] == "up" for t in targets()), 30, "every target to be up")
        except AssertionError:
            raise AssertionError([(t["labels"]["job"], t["lastError"]) for t in targets()]) from None
        assert sorted(t["labels"]["job"] for t in targets()) == ["dcgm", "gateway", "operator", "worker"]

        # The alert rules load and evaluate without errors in a real Prometheus.
        groups = wait_for(
            lambda: [g for g in prom.api("rules")["groups"] if all(r["lastEvaluation"][:4] != "0001" for r in g["rules"])],
            30, "the rules to be evaluated",
        )  # fmt: skip
        evaluated = [r for g in groups for r in g["rules"]]
        assert len(evaluated) == len(alert_exprs(rules))
        assert all(r["health"] == "ok" for r in evaluated), [
            (r["name"], r.get("lastError")) for r in evaluated
        ]

        # Each dashboard query runs; the variables' queries find this namespace and model.
        for expr in dashboard_exprs():
            promql = grafana_to_promql(expr, namespace)
            try:
                prom.query(promql)
            except urllib.error.HTTPError as e:
                raise AssertionError(
                    f"dashboard query refused ({e.code}): {promql}\n{e.read().decode()}"
                ) from None
        models = {
            s["metric"]["model"] for s in prom.query(f'remotegpu_queue_depth{{namespace="{namespace}"}}')
        }
        assert MODEL in models
        # What the dashboards plot has values from this run.
        for expr, want in [
            (f'sum(remotegpu_jobs_finished_total{{namespace="{namespace}", status="succeeded"}})', 1),
            (f'sum(remotegpu_job_wait_seconds_count{{namespace="{namespace}"}})', 1),
            (f'sum(remotegpu_model_cold_start_seconds_count{{namespace="{namespace}"}})', 1),
            (f'sum(remotegpu_worker_inference_seconds_count{{namespace="{namespace}"}})', 1),
            (f'sum(remotegpu_operator_scale_decisions_total{{namespace="{namespace}", direction="up"}})', 1),
            (f'max(remotegpu_operator_ready_replicas{{namespace="{namespace}"}})', 1),
        ]:
            got = wait_for(lambda e=expr: prom.query(e), 30, expr)
            assert float(got[0]["value"][1]) >= want, (expr, got)

        # The GPU cost dashboard's panels show this run: one GPU allocated to the model, busy
        # GPU-seconds from its job, and the worker pod's GPU utilisation as DCGM reported it.
        cost = {
            p["title"]: [grafana_to_promql(t["expr"], namespace) for t in p.get("targets", [])]
            for p in dashboards()["gpu-cost.json"]["panels"]
        }
        alloc = wait_for(lambda: prom.query(cost["GPUs allocated"][0]), 30, "allocated GPUs")
        assert float(alloc[0]["value"][1]) == 1, alloc
        allocated_expr, _busy_expr = cost["GPU-seconds allocated vs busy per model (time range)"]
        allocated = prom.query(allocated_expr)
        assert [s["metric"]["model"] for s in allocated] == [MODEL] and float(allocated[0]["value"][1]) > 0
        # The busy side (increase() of the worker's job seconds) ran above like every query; its
        # values are checked on synthetic series (test_dashboards.py): here the loaded worker
        # process may not be scraped twice within the window.
        exported, honored = cost["GPU utilisation by worker pod"]
        (util,) = prom.query(exported)
        assert util["metric"] == {"exported_pod": WORKER_POD} and float(util["value"][1]) == DCGM_UTIL
        assert prom.query(honored) == []  # the exporter's own pod is no worker
        (share,) = prom.query(cost["GPU memory used share by worker pod"][0])
        assert float(share["value"][1]) == 0.5
        (pending,) = prom.query(cost["Pending worker pods by model"][0])
        assert pending["metric"] == {"model": MODEL} and float(pending["value"][1]) == 0
    finally:
        # Delete the ImageModel while the operator still runs (it holds a finalizer).
        kube.kubectl("delete", "imagemodels", "--all", "-n", namespace, "--timeout=30s", check=False)
        for name in kube.kubectl(
            "get", "imagemodels", "-n", namespace, "-o", "name", check=False
        ).stdout.split():
            kube.kubectl("patch", name, "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                         check=False)  # fmt: skip
