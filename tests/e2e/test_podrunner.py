"""The test-only pod runner behaves like a kubelet for the pods on its node."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.podrunner import PodRunner
from tests.fixtures.cluster import Kube
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def runner(kube: Kube, tmp_path: Path):
    r = PodRunner(kube.kubeconfig, f"runner-{os.getpid()}", tmp_path, Path(sys.executable).parent)
    r.start()
    yield r
    r.stop()
    kube.kubectl("delete", "node", r.node_name, "--wait=false", check=False)


def web_deployment(name: str, port: int, node: str, env: dict | None = None) -> str:
    return yaml.safe_dump_all(
        [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": name}},
                    "template": {
                        "metadata": {"labels": {"app": name}},
                        "spec": {
                            "nodeSelector": {"kubernetes.io/hostname": node},
                            "terminationGracePeriodSeconds": 5,
                            "containers": [
                                {
                                    "name": "web",
                                    "image": "python:3.11",
                                    # Starts serving only after 2 s, so Ready must lag Running.
                                    "command": [
                                        sys.executable,
                                        "-c",
                                        "import time,sys,http.server as h; time.sleep(2); "
                                        "h.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), h.SimpleHTTPRequestHandler).serve_forever()",
                                        "0.0.0.0",
                                        str(port),
                                    ],
                                    "env": [{"name": k, "value": v} for k, v in (env or {}).items()]
                                    + [
                                        {
                                            "name": "POD_NAME",
                                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                        }
                                    ],
                                    "ports": [{"name": "http", "containerPort": port}],
                                    "readinessProbe": {"httpGet": {"path": "/", "port": "http"}},
                                }
                            ],
                        },
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name},
                "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": port}]},
            },
        ]
    )


def the_pod(kube: Kube, ns: str, app: str) -> dict | None:
    items = kube.get_json("pods", "-n", ns, "-l", f"app={app}")["items"]
    return items[0] if items else None


def ready(pod: dict | None) -> bool:
    return bool(pod) and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
    )


def test_runs_the_pod_as_a_process_ready_only_when_it_answers(kube: Kube, namespace: str, runner: PodRunner):
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=web_deployment("web", 18080, runner.node_name))
    running = wait_for(
        lambda: (p := the_pod(kube, namespace, "web")) and p["status"].get("phase") == "Running" and p,
        what="pod Running",
    )
    ip = running["status"]["podIP"]
    assert ip.startswith("127.0.0.") and ip != "127.0.0.1"
    assert not ready(running), "Ready before the process answered its readiness probe"
    pod = wait_for(lambda: ready(p := the_pod(kube, namespace, "web")) and p, what="pod Ready")
    assert httpx.get(f"http://{ip}:18080/").status_code == 200
    [proc] = runner.processes(namespace, "web")
    env = Path(f"/proc/{proc.proc.pid}/environ").read_bytes().split(b"\0")
    assert f"POD_NAME={pod['metadata']['name']}".encode() in env

    # A client pod's Service URL resolves to the Service's stable loopback address,
    # which forwards to a ready pod behind it (there is no kube-proxy here).
    kube.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=web_deployment("client", 18081, runner.node_name, {"UPSTREAM": "http://web:80/x"}),
    )
    wait_for(lambda: ready(the_pod(kube, namespace, "client")), what="client Ready")
    [client_proc] = runner.processes(namespace, "client")
    env = dict(
        kv.split(b"=", 1)
        for kv in Path(f"/proc/{client_proc.proc.pid}/environ").read_bytes().split(b"\0")
        if kv
    )
    upstream = env[b"UPSTREAM"].decode()
    assert upstream.startswith("http://127.0.1.") and upstream.endswith(":80/x")
    service_url = upstream.removesuffix("/x") + "/"
    assert httpx.get(service_url).status_code == 200

    # The Service address survives a restart of the pod behind it (new pod, new IP).
    kube.kubectl("delete", "pod", "-n", namespace, pod["metadata"]["name"])
    wait_for(
        lambda: (
            (p := the_pod(kube, namespace, "web"))
            and p["metadata"]["name"] != pod["metadata"]["name"]
            and ready(p)
        ),
        what="a new Ready web pod",
    )
    assert proc.proc.poll() is not None, "the deleted pod's process still runs"
    assert httpx.get(service_url).status_code == 200
    [proc] = runner.processes(namespace, "web")
    ip = proc.ip

    # Deleting the pod stops the process (SIGTERM) and removes the pod.
    kube.kubectl("scale", "-n", namespace, "deployment/web", "--replicas=0")
    wait_for(lambda: the_pod(kube, namespace, "web") is None, what="pod removed")
    assert proc.proc.poll() is not None
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{ip}:18080/", timeout=1)
