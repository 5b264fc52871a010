"""The local cluster's real nodes: containers run, Services and DNS work, kubectl reaches them.

Two kubelets, each with its own containerd, beside the KWOK nodes; one kube-proxy in
nftables mode; CoreDNS for cluster.local; fake GPUs as an extended resource.
"""

from __future__ import annotations

import json
import socket
import subprocess

import httpx
import pytest
import yaml

from cluster import images
from tests.fixtures.cluster import Kube, RealNodes, is_ready
from tests.waiting import wait_for

# The first test also builds and imports the images when their inputs changed (minutes).
pytestmark = [pytest.mark.cluster, pytest.mark.real_nodes, pytest.mark.timeout(2400)]

GPU = "nvidia.com/gpu"


def web_pod(real: RealNodes, name: str, node: str, gpus: int = 0) -> dict:
    """A pod of the gateway image serving its folder on :8080 (Python's http.server)."""
    repository, tag = real.ref("remotegpu")
    container: dict = {
        "name": "web",
        "image": f"{repository}:{tag}",
        "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-m", "http.server", "8080", "--directory", "/opt/remotegpu"],
        "ports": [{"containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
    }
    if gpus:
        container["resources"] = {"limits": {GPU: gpus}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {**real.node_selector, "kubernetes.io/hostname": node},
            "tolerations": real.tolerations,
            "containers": [container],
            "terminationGracePeriodSeconds": 1,
        },
    }


def ready(kube: Kube, namespace: str, name: str) -> bool:
    return is_ready(kube.get_json("pod", name, namespace=namespace))


def test_real_nodes_run_containerd_beside_the_kwok_nodes_with_fake_gpus(kube: Kube, real_nodes: RealNodes):
    nodes = {n["metadata"]["name"]: n for n in kube.get_json("nodes")["items"]}
    assert len(real_nodes.addresses) >= 2
    for name, ip in real_nodes.addresses.items():
        node = nodes[name]
        assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
        assert {"type": "InternalIP", "address": ip} in node["status"]["addresses"]
        assert node["status"]["allocatable"][GPU] == "2"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"]
    # KWOK's nodes are still there (tests that need many GPUs or nodes use them).
    assert any(
        n["metadata"].get("annotations", {}).get("kwok.x-k8s.io/node") == "fake" for n in nodes.values()
    )
    wide = kube.kubectl("get", "nodes", "-o", "wide").stdout
    assert "containerd://" in wide and "fake" in wide, wide


def test_pods_on_two_nodes_reach_each_other_by_service_dns_name(
    kube: Kube, real_nodes: RealNodes, namespace: str
):
    [node_a, node_b] = list(real_nodes.addresses)[:2]
    docs = [web_pod(real_nodes, "web", node_a, gpus=1), web_pod(real_nodes, "client", node_b)]
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
        }
    )
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))
    for name in ("web", "client"):
        wait_for(lambda name=name: ready(kube, namespace, name), 120, f"pod {name} Ready")
    pod = kube.get_json("pod", "web", namespace=namespace)
    assert pod["spec"]["nodeName"] == node_a  # where its fake GPU is
    # From the pod on the other node, through CoreDNS and kube-proxy's ClusterIP.
    fetch = (
        "import socket, urllib.request; "
        f"print(socket.gethostbyname('web.{namespace}.svc.cluster.local')); "
        "print(urllib.request.urlopen('http://web/', timeout=10).status)"
    )
    cluster_ip = kube.get_json("service", "web", namespace=namespace)["spec"]["clusterIP"]
    out = wait_for(
        lambda: (
            (
                r := kube.kubectl(
                    "exec", "-n", namespace, "client", "--", "python3", "-c", fetch, check=False
                )
            ).returncode
            == 0
            and r.stdout
        ),
        60,
        "the Service through DNS",
    )
    assert out.split() == [cluster_ip, "200"]
    # Names outside the cluster are not resolved (nothing leaves the host).
    outside = kube.kubectl(
        "exec", "-n", namespace, "client", "--", "python3", "-c",
        "import socket; socket.gethostbyname('pypi.org')", check=False,
    )  # fmt: skip
    assert outside.returncode != 0


def test_kubectl_logs_exec_and_port_forward_reach_a_real_node(
    kube: Kube, real_nodes: RealNodes, namespace: str
):
    node = list(real_nodes.addresses)[-1]
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(web_pod(real_nodes, "web", node)))
    wait_for(lambda: ready(kube, namespace, "web"), 120, "pod web Ready")
    assert kube.kubectl("exec", "-n", namespace, "web", "--", "id", "-u").stdout.strip() == "10001"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    forward = subprocess.Popen(
        [str(kube.bins / "kubectl"), "port-forward", "-n", namespace, "pod/web", f"{port}:8080",
         "--address", "127.0.0.1"],
        env=kube.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        r = wait_for(lambda: _get(f"http://127.0.0.1:{port}/"), 60, "the port-forward")
        assert r.status_code == 200 and "bin/" in r.text
    finally:
        forward.terminate()
        forward.wait(timeout=10)
    # The request above is in the container's log (http.server logs to stderr).
    logs = wait_for(
        lambda: "GET / " in (t := kube.kubectl("logs", "-n", namespace, "web").stdout) and t, 30, "logs"
    )
    assert '"GET / HTTP/1.1" 200' in logs


def test_a_pod_asking_for_more_gpus_than_a_real_node_has_stays_pending(
    kube: Kube, real_nodes: RealNodes, namespace: str
):
    pod = web_pod(real_nodes, "greedy", list(real_nodes.addresses)[0], gpus=3)
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(pod))
    unschedulable = wait_for(
        lambda: [
            c
            for c in kube.get_json("pod", "greedy", namespace=namespace)["status"].get("conditions", [])
            if c["type"] == "PodScheduled" and c["status"] == "False"
        ],
        60,
        "the scheduler's verdict",
    )
    assert "Insufficient nvidia.com/gpu" in json.dumps(unschedulable), unschedulable


def test_a_node_keeps_each_image_once_unpacked_without_its_layer_blobs(
    kube: Kube, real_nodes: RealNodes, namespace: str
):
    """The worker's dependency layer is 5 GB: kept as a blob beside its unpacked snapshot,
    it would take 11 GB of each node's disk, and every older build kept would add 6 GB. The
    import drops the blobs and the older builds, and containers still start (from the snapshot)."""
    assert kube.cluster is not None
    for node in kube.cluster.real_nodes().nodes:
        ctr = ["ctr", "--address", str(node.socket), "--namespace", "k8s.io"]
        blobs = set(
            subprocess.run(
                [*ctr, "content", "ls", "-q"], capture_output=True, text=True, check=True
            ).stdout.split()
        )
        for built in real_nodes.images.values():
            layers = images.layer_digests(ctr, built.ref)
            assert layers and not blobs & set(layers), f"{node.name} keeps layer blobs of {built.ref}"
        # No older build stays behind, by name or by the CRI plugin's `sha256:<id>` reference.
        targets = images.image_targets(ctr)
        for built in real_nodes.images.values():
            repository = built.ref.rsplit(":", 1)[0]
            assert [r for r in targets if r.rsplit(":", 1)[0] == repository] == [built.ref], targets
        named = {t for r, t in targets.items() if not r.startswith("sha256:")}
        assert all(t in named for r, t in targets.items() if r.startswith("sha256:")), targets
    node = list(real_nodes.addresses)[0]
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(web_pod(real_nodes, "web", node)))
    wait_for(lambda: ready(kube, namespace, "web"), 120, "pod web Ready")


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


# Prints how many of the modules it imported (argv) have no bytecode in the image.
UNCOMPILED = """
import importlib, os, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
cached = {n: getattr(m, "__cached__", None) for n, m in list(sys.modules.items())}
missing = sorted(n for n, c in cached.items()
                 if isinstance(c, str) and c.startswith("/opt/remotegpu/") and not os.path.exists(c))
print(len(missing), " ".join(missing[:20]))
"""


@pytest.mark.parametrize(
    "image,modules",
    [
        (
            "worker",
            ["remotegpu.cli", "remotegpu_worker.main", "remotegpu_worker.engine", "diffusers", "torch"],
        ),
        ("remotegpu", ["remotegpu.cli", "remotegpu_gateway.app", "remotegpu_operator.handlers"]),
    ],
)
def test_a_container_start_compiles_no_python(
    kube: Kube, real_nodes: RealNodes, namespace: str, image: str, modules: list[str]
):
    """The images run with PYTHONDONTWRITEBYTECODE and a fresh writable layer per container:
    bytecode not shipped is compiled again at every start (about 10 CPU-seconds for the
    worker's stack, on every scale-from-zero). Every module the processes import has it."""
    repository, tag = real_nodes.ref(image)
    node = list(real_nodes.addresses)[0]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "imports"},
        "spec": {
            "nodeSelector": {**real_nodes.node_selector, "kubernetes.io/hostname": node},
            "tolerations": real_nodes.tolerations,
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "imports",
                    "image": f"{repository}:{tag}",
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python3", "-c", UNCOMPILED, *modules],
                }
            ],
        },
    }
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(pod))
    phase = wait_for(
        lambda: (
            (p := kube.get_json("pod", "imports", namespace=namespace)["status"].get("phase"))
            in ("Succeeded", "Failed")
            and p
        ),
        300,
        "the import pod to finish",
    )
    out = kube.kubectl("logs", "-n", namespace, "imports").stdout
    assert phase == "Succeeded", out
    count, _, names = out.strip().partition(" ")
    assert count == "0", f"{count} imported modules have no bytecode in the {image} image: {names}"
