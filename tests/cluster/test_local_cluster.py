"""The local control plane is real: scheduling, GPU capacity, CRDs and helm work against it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from cluster.localcluster import POD_READY_DELAY_ANNOTATION
from tests.fixtures.cluster import REPO, Kube, is_ready
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster


def gpu_deployment(name: str, gpus: int, annotations: dict | None = None) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}, "annotations": annotations or {}},
                    "spec": {
                        "containers": [
                            {
                                "name": "worker",
                                "image": "example/worker:1",
                                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                            }
                        ]
                    },
                },
            },
        }
    )


def pods(kube: Kube, namespace: str, app: str) -> list[dict]:
    return kube.get_json("pods", namespace=namespace, selector=f"app={app}")["items"]


def test_fake_gpu_nodes_are_ready_with_gpu_allocatable(kube: Kube):
    nodes = kube.get_json("nodes")["items"]
    gpu_nodes = [n for n in nodes if "nvidia.com/gpu" in n["status"].get("allocatable", {})]
    assert len(gpu_nodes) >= 2
    for n in gpu_nodes:
        assert int(n["status"]["allocatable"]["nvidia.com/gpu"]) >= 1
        assert n["metadata"]["labels"].get("nvidia.com/gpu.product")
        assert is_ready(n)


def test_gpu_deployment_gets_a_ready_pod_on_a_gpu_node(kube: Kube, namespace: str):
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=gpu_deployment("gpu-worker", 1))
    pod = wait_for(
        lambda: next((p for p in pods(kube, namespace, "gpu-worker") if is_ready(p)), None),
        what="a Ready GPU pod",
    )
    node = kube.get_json("node", pod["spec"]["nodeName"])
    assert "nvidia.com/gpu" in node["status"]["allocatable"], "GPU pod landed on a node without GPUs"
    assert pod["status"]["phase"] == "Running"


def test_pod_ready_delay_shows_a_starting_phase(kube: Kube, namespace: str):
    # Long enough that a loaded machine still sees the scheduled pod before it turns Ready.
    delayed = {POD_READY_DELAY_ANNOTATION: "10s"}
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=gpu_deployment("slow", 1, delayed))
    scheduled = wait_for(
        lambda: next((p for p in pods(kube, namespace, "slow") if p["spec"].get("nodeName")), None),
        what="the pod to be scheduled",
        every=0.2,
    )
    assert not is_ready(scheduled), "the pod turned Ready before its start delay"
    started = time.monotonic()
    wait_for(
        lambda: any(is_ready(p) for p in pods(kube, namespace, "slow")), what="the delayed pod to turn Ready"
    )
    assert time.monotonic() - started >= 3.0


def test_asking_for_more_gpus_than_exist_stays_pending_with_an_event(kube: Kube, namespace: str):
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=gpu_deployment("greedy", 64))
    pod = wait_for(lambda: next(iter(pods(kube, namespace, "greedy")), None), what="the pod to be created")

    def scheduling_event():
        events = kube.get_json(
            "events", namespace=namespace, fields=f"involvedObject.name={pod['metadata']['name']}"
        )["items"]
        return next((e for e in events if e["reason"] == "FailedScheduling"), None)

    event = wait_for(scheduling_event, what="a FailedScheduling event")
    assert "nvidia.com/gpu" in event["message"]
    pod = kube.get_json("pod", pod["metadata"]["name"], namespace=namespace)
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")


def test_crd_registers_and_validates_imagemodels(kube: Kube, crd: None, namespace: str):
    # Every entry of the bundled catalog is a valid ImageModel for the API server.
    catalog = (REPO / "base" / "remotegpu_base" / "models.yaml").read_text()
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=catalog)
    listed = kube.get_json("imagemodels", namespace=namespace)["items"]
    assert len(listed) == len([d for d in yaml.safe_load_all(catalog) if d])
    # Defaults from the schema are applied by the API server.
    one = next(m for m in listed if m["metadata"]["name"] == "flux-1-schnell")
    assert one["spec"]["scaling"]["jobsPerReplica"] == 1
    assert "1024x1024" in one["spec"]["parameters"]["size"]["allowed"]
    # An invalid model is refused with the rule's message.
    bad = yaml.safe_load(catalog.split("---")[0])
    bad["metadata"]["name"] = "bad"
    bad["spec"]["scaling"] = {"minReplicas": 3, "maxReplicas": 1}
    out = kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert out.returncode != 0
    assert "minReplicas must be <= scaling.maxReplicas" in out.stderr
    bad["spec"]["scaling"] = {"minReplicas": 0, "maxReplicas": 1}
    bad["spec"]["parameters"]["size"]["default"] = {"width": 640, "height": 480}
    out = kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert out.returncode != 0
    assert "size.default must be a known size preset" in out.stderr
    # The serving speed-ups: fp8 and a step cache are accepted; the first-block cache
    # is refused on FLUX.2 (it breaks there in diffusers 0.42) with what to use instead.
    flux2 = next(d for d in yaml.safe_load_all(catalog) if d and d["metadata"]["name"] == "flux-2-dev")
    flux2["metadata"]["name"] = "flux2-fast"
    flux2["spec"]["model"] = "example/flux2-fast"
    flux2["spec"]["serving"].update(quantization="fp8", stepCache={"type": "taylorseer", "interval": 3})
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(flux2))
    flux2["spec"]["serving"]["stepCache"] = {"type": "first-block"}
    out = kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(flux2), check=False)
    assert out.returncode != 0
    assert "use stepCache.type taylorseer" in out.stderr


def test_helm_lint_and_template_pass_on_the_chart(kube: Kube):
    chart = REPO / "charts" / "remotegpu"
    lint = kube.helm("lint", str(chart))
    assert "0 chart(s) failed" in lint.stdout
    rendered = kube.helm("template", "demo", str(chart), "--include-crds")
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert any(d["kind"] == "CustomResourceDefinition" for d in docs)


def test_chart_ships_the_very_crd_file():
    assert (REPO / "charts/remotegpu/crds/imagemodels.yaml").read_bytes() == (
        REPO / "crds/imagemodels.yaml"
    ).read_bytes()


def test_kubeconfig_is_usable(kubeconfig: Path):
    cfg = yaml.safe_load(kubeconfig.read_text())
    assert cfg["clusters"][0]["cluster"]["server"].startswith("https://127.0.0.1:")
