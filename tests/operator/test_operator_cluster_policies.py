"""The operator against the local control plane (as test_operator_cluster.py): the scale subresource,
modes, quotas, validation, foreign objects, priorities, placement."""

from __future__ import annotations

import json
import time

import pytest

from tests.fixtures.cluster import Kube
from tests.operator.conftest import (
    Operators,
    QueueStub,
    apply,
    condition,
    replicas_of,
    state_of,
    wait_condition,
    wait_event,
)
from tests.operator.resources import imagemodel
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster


def scale_of(kube: Kube, ns: str, name: str) -> dict:
    out = kube.kubectl(
        "get", "--raw", f"/apis/remotegpu.ai/v1alpha1/namespaces/{ns}/imagemodels/{name}/scale"
    )
    return json.loads(out.stdout)


def test_the_scale_subresource_answers_in_every_mode_and_kubectl_scale_sets_the_floor(
    kube, namespace, operators: Operators
):
    operators.start()
    apply(kube, namespace, imagemodel("m9", "test/pin", scaling={"scaleDownLimit": 2}))
    wait_for(lambda: state_of(kube, namespace, "m9") == "sleeping", 90, "sleeping")
    # An autoscaled model (no spec.replicas) answers GET .../scale, as an HPA or KEDA needs.
    scale = scale_of(kube, namespace, "m9")
    assert scale["spec"].get("replicas", 0) == 0 and scale["status"]["replicas"] == 0  # 0 is omitted
    assert scale["status"]["selector"] == "app.kubernetes.io/name=remotegpu-worker,remotegpu.ai/imagemodel=m9"
    kube.kubectl("scale", "imagemodel", "m9", "-n", namespace, "--replicas=2")
    wait_for(lambda: replicas_of(kube, namespace, "m9") == 2, 90, "kept warm: 2")
    wait_for(
        lambda: kube.find("imagemodel", "m9", namespace)["status"].get("readyReplicas") == 2, 90, "2 ready"
    )
    scale = scale_of(kube, namespace, "m9")
    assert scale["spec"]["replicas"] == 2 and scale["status"]["replicas"] == 2
    # Scaling to 0 hands the count back to the queue (empty: to zero after the idle window).
    kube.kubectl("scale", "imagemodel", "m9", "-n", namespace, "--replicas=0")
    wait_for(lambda: replicas_of(kube, namespace, "m9") == 0, 90, "back to the autoscaler")
    # Fixed mode: the scale subresource sets the count, whatever maxReplicas says.
    kube.kubectl(
        "patch", "imagemodel", "m9", "-n", namespace, "--type=merge",
        "-p", '{"spec":{"scaling":{"mode":"Fixed","maxReplicas":1}}}',
    )  # fmt: skip
    kube.kubectl("scale", "imagemodel", "m9", "-n", namespace, "--replicas=3")
    wait_for(lambda: replicas_of(kube, namespace, "m9") == 3, 90, "fixed at 3")
    assert scale_of(kube, namespace, "m9")["spec"]["replicas"] == 3
    # The status follows the Deployment's patch (the same round, one write later).
    wait_condition(kube, namespace, "m9", "ScalingActive", "the Fixed scaling condition", reason="Fixed")


def test_a_pin_above_max_replicas_is_capped(kube, namespace, operators: Operators):
    operators.start()
    apply(kube, namespace, imagemodel("m13", "test/cap", replicas=5, scaling={"maxReplicas": 2}))
    wait_for(lambda: replicas_of(kube, namespace, "m13") == 2, 90, "capped at 2")
    time.sleep(2)
    assert replicas_of(kube, namespace, "m13") == 2
    im = kube.find("imagemodel", "m13", namespace)
    assert "capped at maxReplicas 2" in condition(im, "ScalingActive")["message"]


def test_external_mode_leaves_the_replicas_to_an_hpa_and_still_reports(
    kube, namespace, operators: Operators, queue: QueueStub
):
    operators.start()
    apply(kube, namespace, imagemodel("m14", "test/external", scaling={"mode": "External", "maxReplicas": 4}))
    wait_for(lambda: kube.find("deployment", "m14-worker", namespace) is not None, 90, "Deployment")
    queue.set("test/external", queued=3)
    # Jobs wait, but in External mode the operator does not scale: the HPA does.
    time.sleep(3)
    assert replicas_of(kube, namespace, "m14") == 0
    # As an HPA would: through the Deployment's scale subresource.
    kube.kubectl("scale", "deployment", "m14-worker", "-n", namespace, "--replicas=2")
    im = wait_for(
        lambda: (
            (o := kube.find("imagemodel", "m14", namespace))
            and (o.get("status") or {}).get("readyReplicas") == 2
            and o
        ),
        90,
        "2 ready reported",
    )
    assert im["status"]["state"] == "ready" and im["status"]["desiredReplicas"] == 2
    assert im["status"]["queueDepth"] == 3
    assert condition(im, "ScalingActive")["reason"] == "External"
    # The queue empties (idle window 3 s): the operator still leaves the count alone.
    queue.set("test/external")
    gen = kube.find("deployment", "m14-worker", namespace)["metadata"]["generation"]
    time.sleep(5)
    d = kube.find("deployment", "m14-worker", namespace)
    assert d["spec"]["replicas"] == 2 and d["metadata"]["generation"] == gen


def test_a_resource_quota_refusal_is_reported_not_starting_forever(
    kube, namespace, operators: Operators, queue: QueueStub
):
    kube.kubectl("create", "quota", "no-gpus", "-n", namespace, "--hard=requests.nvidia.com/gpu=0")
    operators.start()
    apply(kube, namespace, imagemodel("m15", "test/quota"))
    wait_for(lambda: state_of(kube, namespace, "m15") == "sleeping", 90, "sleeping")
    queue.set("test/quota", warming=1)
    im = wait_condition(kube, namespace, "m15", "CapacityAvailable", "QuotaExceeded", reason="QuotaExceeded")
    cap = condition(im, "CapacityAvailable")
    assert cap["status"] == "False" and "exceeded quota" in cap["message"]
    assert condition(im, "Ready")["reason"] == "NoCapacity"
    assert wait_event(kube, namespace, "m15", "QuotaExceeded")["type"] == "Warning"


def test_two_imagemodels_for_one_model_are_detected(kube, namespace, operators: Operators, queue: QueueStub):
    operators.start()
    apply(kube, namespace, imagemodel("m16a", "test/dup"))
    wait_for(lambda: state_of(kube, namespace, "m16a") == "sleeping", 90, "first sleeping")
    apply(kube, namespace, imagemodel("m16b", "test/dup"))
    queue.set("test/dup", warming=1)
    wait_for(lambda: replicas_of(kube, namespace, "m16a") == 1, 90, "the first one scales")
    im = wait_condition(kube, namespace, "m16b", "ScalingActive", "DuplicateModel", reason="DuplicateModel")
    assert condition(im, "ScalingActive")["status"] == "False"
    assert "m16a" in condition(im, "ScalingActive")["message"]
    assert replicas_of(kube, namespace, "m16b") == 0


def test_an_imagemodel_is_deleted_without_the_operator(kube, namespace, operators: Operators):
    op = operators.start()
    apply(kube, namespace, imagemodel("m17", "test/orphan"))
    wait_for(lambda: state_of(kube, namespace, "m17") == "sleeping", 90, "sleeping")
    assert not kube.find("imagemodel", "m17", namespace)["metadata"].get("finalizers")
    op.stop()
    # No finalizer waits for an operator that is gone (uninstall, namespace deletion).
    kube.kubectl("delete", "imagemodel", "m17", "-n", namespace, "--timeout=20s")
    assert kube.find("imagemodel", "m17", namespace) is None


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            {"scaling": {"minReplicas": 3, "maxReplicas": 1}},
            "scaling.minReplicas must be <= scaling.maxReplicas",
        ),
        ({"architecture": "sdxl"}, "Unsupported value"),
        (
            {
                "parameters": {
                    "prompt": {"maxLength": 10},
                    "size": {"default": {"width": 640, "height": 640}},
                    "steps": {"default": 4},
                    "guidance": {"default": 0.0},
                }
            },
            "size.default must be",
        ),
        (
            {
                "parameters": {
                    "prompt": {"maxLength": 10},
                    "size": {"default": {"width": 512, "height": 512}},
                    "steps": {"default": 50, "max": 10},
                    "guidance": {"default": 0.0},
                }
            },
            "steps must satisfy min <= default <= max",
        ),
        ({"worker": {"gpu": {"count": -1}}}, "should be greater than or equal to 0"),
        ({"replicas": -2}, "should be greater than or equal to 0"),
        (
            {"cache": {"nodeLocal": {}, "source": {"s3": {"bucket": "s3://models/flux"}}}},
            "cache.source.s3.bucket is not a bucket name: give the bucket alone",
        ),
        (
            {"cache": {"nodeLocal": {}, "source": {"s3": {"bucket": "models", "endpoint": "minio:9000"}}}},
            "cache.source.s3.endpoint must be the server's URL",
        ),
        (
            {"cache": {"nodeLocal": {}, "source": {"s3": {"bucket": "models"}, "hostPath": {"path": "/m"}}}},
            "cache.source takes exactly one of huggingFace, s3, pvc, hostPath",
        ),
    ],
)
def test_invalid_imagemodels_are_rejected_by_the_api_server(kube, namespace, crd, patch, message):
    obj = imagemodel("bad", "test/bad", **patch)
    out = kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    assert kube.find("imagemodel", "bad", namespace) is None


def test_a_foreign_deployment_is_not_taken_over_and_the_failure_is_an_event(
    kube, namespace, operators: Operators
):
    foreign = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "m10-worker", "labels": {"app": "someone-else"}},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "someone-else"}},
            "template": {
                "metadata": {"labels": {"app": "someone-else"}},
                "spec": {"containers": [{"name": "c", "image": "example.invalid/other:1"}]},
            },
        },
    }
    apply(kube, namespace, foreign)
    operators.start()
    apply(kube, namespace, imagemodel("m10", "test/foreign"))
    ev = wait_event(kube, namespace, "m10", "ReconcileFailed", 90)
    assert ev["type"] == "Warning" and "not managed by the RemoteGPU operator" in ev["message"]
    d = kube.find("deployment", "m10-worker", namespace)
    assert d["spec"]["template"]["spec"]["containers"][0]["image"] == "example.invalid/other:1"
    assert not d["metadata"].get("ownerReferences")


def test_an_unreachable_gateway_holds_replicas_and_says_so(kube, namespace, operators: Operators, gateway):
    im = imagemodel("m11", "test/gone", scaling={"maxReplicas": 2, "idleSeconds": 1})
    gw = gateway(im)
    operators.start(gateway_url=gw.url, REMOTEGPU_OPERATOR_QUEUE_WAIT_SECONDS="1")
    apply(kube, namespace, im)
    wait_for(lambda: state_of(kube, namespace, "m11") == "sleeping", 90, "sleeping")
    gw.submit("test/gone")
    wait_for(lambda: replicas_of(kube, namespace, "m11") == 1, 90, "replicas 1")
    gw.stop()
    im_now = wait_condition(kube, namespace, "m11", "QueueObserved", "QueueObserved=False", status="False")
    assert condition(im_now, "QueueObserved")["reason"] == "GatewayUnreachable"
    assert "queueDepth" not in im_now["status"]
    time.sleep(3)  # three idle windows: an unknown queue must not scale the model away
    assert replicas_of(kube, namespace, "m11") == 1
    wait_event(kube, namespace, "m11", "GatewayUnreachable")


def test_a_deleted_deployment_is_recreated_with_the_replicas_the_queue_needs(
    kube, namespace, operators, gateway
):
    im = imagemodel("m12", "test/recreate", scaling={"maxReplicas": 2, "idleSeconds": 300})
    gw = gateway(im)
    operators.start(gateway_url=gw.url)
    apply(kube, namespace, im)
    wait_for(lambda: state_of(kube, namespace, "m12") == "sleeping", 90, "sleeping")
    gw.submit("test/recreate")
    wait_for(lambda: replicas_of(kube, namespace, "m12") == 1, 90, "replicas 1")
    uid = kube.find("deployment", "m12-worker", namespace)["metadata"]["uid"]
    kube.kubectl("delete", "deployment", "m12-worker", "-n", namespace, "--wait=false")
    new = wait_for(
        lambda: (d := kube.find("deployment", "m12-worker", namespace)) and d["metadata"]["uid"] != uid and d,
        90,
        "a new Deployment",
    )
    assert new["metadata"]["ownerReferences"][0]["name"] == "m12"
    wait_for(lambda: replicas_of(kube, namespace, "m12") == 1, 90, "replicas 1 again")
    assert len(kube.get_json("deployments", namespace=namespace)["items"]) == 1


def test_an_idle_gpu_of_a_lower_priority_model_is_reclaimed_for_waiting_jobs(
    kube, namespace, operators: Operators, queue: QueueStub
):
    # A GPU kind of this test's own, one on one node: the two models compete for it alone.
    resource = f"example.com/gpu-{namespace[-6:]}"
    escaped = resource.replace("/", "~1")
    status = {"capacity": {resource: "1"}, "allocatable": {resource: "1"}}
    kube.kubectl(
        "patch",
        "node",
        "gpu-node-0",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
    try:
        gpu = {"count": 1, "resourceName": resource}
        worker = {"image": "example.invalid/worker:test", "gpu": gpu}
        low = imagemodel(
            "low",
            "test/low",
            worker=worker,
            scaling={"priority": 0, "minResidencySeconds": 0, "idleSeconds": 3600},
        )
        high = imagemodel("high", "test/high", worker=worker, scaling={"priority": 10})
        operators.start()
        apply(kube, namespace, low)
        apply(kube, namespace, high)
        queue.set("test/low", warming=1)
        wait_for(lambda: state_of(kube, namespace, "low") == "ready", 90, "low ready")
        queue.set("test/low")  # low's job is done; its worker idles (a 1 h idle window)
        queue.set("test/high", warming=2)
        wait_for(lambda: replicas_of(kube, namespace, "low") == 0, 90, "low's idle worker reclaimed")
        wait_for(lambda: state_of(kube, namespace, "high") == "ready", 90, "high runs on the freed GPU")
        assert "released for high" in wait_event(kube, namespace, "low", "Reclaimed")["message"]
        # Never the other way round: low's jobs wait, high's worker is not taken.
        queue.set("test/high", running=1, busy_workers=[])
        queue.set("test/low", warming=1)
        time.sleep(3)
        assert replicas_of(kube, namespace, "high") >= 1 and state_of(kube, namespace, "high") == "ready"
        im = wait_condition(
            kube, namespace, "low", "CapacityAvailable", "low waits for a GPU", status="False"
        )
        assert "held by models high" in condition(im, "CapacityAvailable")["message"]
    finally:
        kube.kubectl(
            "patch", "node", "gpu-node-0", "--subresource=status", "--type=json",
            "-p", json.dumps([{"op": "remove", "path": f"/status/capacity/{escaped}"},
                              {"op": "remove", "path": f"/status/allocatable/{escaped}"}]),
            check=False,
        )  # fmt: skip


def test_worker_pods_carry_the_models_resources_placement_and_security(kube, namespace, operators: Operators):
    """The API server admits the worker pod and classes it Guaranteed (status.qosClass)."""
    priority = f"gpu-{namespace}"  # cluster-scoped: unique per test
    kube.kubectl(
        "apply", "-f", "-",
        input=json.dumps({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                          "metadata": {"name": priority}, "value": 1000}),
    )  # fmt: skip
    try:
        operators.start()
        worker = {
            "image": "example.invalid/worker:test",
            "gpu": {"count": 1},
            "resources": {"requests": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "1Gi"}},
            "priorityClassName": priority,
            "imagePullSecrets": [{"name": "regcred"}],
            "affinity": {
                "nodeAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 1,
                            "preference": {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]},
                        }
                    ]
                }
            },
        }
        apply(kube, namespace, imagemodel("res", "test/resources", worker=worker, scaling={"minReplicas": 1}))
        pods = wait_for(
            lambda: kube.get_json("pods", namespace=namespace, selector="remotegpu.ai/imagemodel=res")[
                "items"
            ],
            90,
            "a worker pod",
        )
        pod = pods[0]
        assert pod["status"]["qosClass"] == "Guaranteed"
        assert pod["spec"]["priorityClassName"] == priority and pod["spec"]["priority"] == 1000
        assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["spec"]["affinity"] == worker["affinity"]
        c = pod["spec"]["containers"][0]
        assert c["resources"]["limits"] == {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": "1"}
        assert c["resources"]["requests"]["ephemeral-storage"] == "1Gi"
        assert c["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    finally:
        kube.kubectl("delete", "priorityclass", priority, "--wait=false", check=False)


def test_a_model_cache_prewarms_on_the_gpu_nodes_and_is_cleaned_up_after_the_model(
    kube, namespace, operators: Operators, gpu_nodes: list[str]
):
    # A missed DELETED event (a watch re-established under load lists only what exists) is
    # the sweep's to catch: every 10 s here, not 60.
    operators.start(REMOTEGPU_OPERATOR_CACHE_SWEEP_SECONDS="10")
    cache = {
        "source": {"huggingFace": {"repo": "org/model", "revision": "0" * 40}},
        "nodeLocal": {"path": "/var/lib/remotegpu/models"},
        "prewarm": True,
    }
    apply(kube, namespace, imagemodel("cached", "test/cached", cache=cache, scaling={"minReplicas": 1}))
    dep = wait_for(lambda: kube.find("deployment", "cached-worker", namespace), 90, "the Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-weights"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/weights")
    assert mount["readOnly"] is True and mount["subPath"] == f"{namespace}/cached/weights"
    ds = wait_for(lambda: kube.find("daemonset", "cached-cache", namespace), 90, "the pre-warm DaemonSet")
    assert ds["metadata"]["ownerReferences"][0]["name"] == "cached"
    # the cache status lists the nodes the fetch pods went to (KWOK reports no fetch result)
    im = wait_for(
        lambda: (
            (o := kube.find("imagemodel", "cached", namespace))
            and ((o.get("status") or {}).get("cache") or {}).get("path")
            and o
        ),
        90,
        "status.cache",
    )
    assert im["status"]["cache"]["path"] == f"{namespace}/cached"
    # a node whose cache is ready (as a real fetch container reports it)
    kube.kubectl(
        "patch", "imagemodel", "cached", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"cache": {"path": f"{namespace}/cached", "nodes": [
            {"node": "gpu-node-0", "ready": True, "sizeBytes": 5, "fetchedAt": "2026-11-28T10:00:00Z"}]}}}),
    )  # fmt: skip
    wait_for(
        lambda: any(
            n["node"] == "gpu-node-0"
            for n in kube.find("imagemodel", "cached", namespace)["status"]["cache"]["nodes"]
        ),
        90,
        "the node kept in the status",
    )
    # Recorded in the cache index first: the sweep's fallback, should the deletion go unseen.
    wait_for(
        lambda: (e := index_entry(kube, namespace, "cached")) and len(e["nodes"]) == len(gpu_nodes),
        90,
        "the cache index entry",
    )
    kube.kubectl("delete", "imagemodel", "cached", "-n", namespace)
    # one per node that had the cache: the pre-warm pods went to the GPU nodes only
    selector = "remotegpu.ai/model-cache=cached"
    jobs = wait_for(
        lambda: (
            (items := kube.get_json("jobs", namespace=namespace, selector=selector)["items"])
            and len(items) >= len(gpu_nodes)
            and items
        ),
        240,
        "a clean-up Job per GPU node",
    )
    assert sorted(j["spec"]["template"]["spec"]["nodeName"] for j in jobs) == gpu_nodes
    spec = jobs[0]["spec"]["template"]["spec"]
    assert spec["containers"][0]["command"][:5] == [
        "remotegpu",
        "cache",
        "gc",
        "--root",
        f"/cache/{namespace}",
    ]


CACHE = {
    "source": {"huggingFace": {"repo": "org/model", "revision": "0" * 40}},
    "nodeLocal": {"path": "/var/lib/remotegpu/models"},
    "prewarm": True,
}


def index_entry(kube: Kube, namespace: str, name: str) -> dict | None:
    cm = kube.find("configmap", "remotegpu-model-caches", namespace)
    text = ((cm or {}).get("data") or {}).get(name)
    return json.loads(text) if text else None


def test_switching_prewarm_off_deletes_the_daemonset_and_on_brings_it_back(
    kube, namespace, operators: Operators
):
    operators.start()
    apply(kube, namespace, imagemodel("warm", "test/warm", cache=CACHE))
    ds = wait_for(lambda: kube.find("daemonset", "warm-cache", namespace), 90, "the pre-warm DaemonSet")
    wait_for(
        lambda: kube.get_json("pods", namespace=namespace, selector="remotegpu.ai/model-cache=warm")["items"],
        90,
        "pre-warm pods",
    )
    apply(kube, namespace, imagemodel("warm", "test/warm", cache={**CACHE, "prewarm": False}))
    wait_for(lambda: kube.find("daemonset", "warm-cache", namespace) is None, 90, "the DaemonSet deleted")
    wait_for(
        lambda: (
            not kube.get_json("pods", namespace=namespace, selector="remotegpu.ai/model-cache=warm")["items"]
        ),
        60,
        "its pods gone",
    )
    assert kube.find("imagemodel", "warm", namespace) is not None  # the model and its workers stay
    assert kube.find("deployment", "warm-worker", namespace) is not None
    apply(kube, namespace, imagemodel("warm", "test/warm", cache=CACHE))
    again = wait_for(lambda: kube.find("daemonset", "warm-cache", namespace), 90, "the DaemonSet again")
    assert again["metadata"]["uid"] != ds["metadata"]["uid"]


def test_a_cached_model_deleted_while_the_operator_is_down_is_cleaned_up_when_it_returns(
    kube, namespace, operators: Operators, gpu_nodes: list[str]
):
    op = operators.start()
    apply(kube, namespace, imagemodel("gone", "test/gone", cache=CACHE))
    apply(kube, namespace, imagemodel("stays", "test/stays", cache=CACHE))
    # the index of the namespace's caches lists each model with the nodes its fetch pods went to
    entry = wait_for(
        lambda: (e := index_entry(kube, namespace, "gone")) and len(e["nodes"]) == len(gpu_nodes) and e,
        60,
        "the cache index entry with every GPU node",
    )
    assert entry["nodes"] == gpu_nodes and entry["spec"]["cache"]["prewarm"] is True
    assert entry["uid"] == kube.find("imagemodel", "gone", namespace)["metadata"]["uid"]
    # the live model's entry too, before the operator goes: it must still be there at the end
    wait_for(
        lambda: (e := index_entry(kube, namespace, "stays")) and len(e["nodes"]) == len(gpu_nodes),
        60,
        "the live model's cache index entry",
    )
    op.stop()
    kube.kubectl("delete", "imagemodel", "gone", "-n", namespace, "--timeout=20s")
    assert not kube.get_json("jobs", namespace=namespace, selector="remotegpu.ai/model-cache=gone")["items"]

    operators.start("op-back")
    jobs = wait_for(
        lambda: (
            (
                items := kube.get_json("jobs", namespace=namespace, selector="remotegpu.ai/model-cache=gone")[
                    "items"
                ]
            )
            and len(items) == len(gpu_nodes)
            and items
        ),
        90,
        "a clean-up Job per node after the operator's start",
    )
    assert sorted(j["spec"]["template"]["spec"]["nodeName"] for j in jobs) == gpu_nodes
    cmd = jobs[0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd == ["remotegpu", "cache", "gc", "--root", f"/cache/{namespace}", "--keep", "stays"]
    wait_for(lambda: index_entry(kube, namespace, "gone") is None, 90, "the entry dropped from the index")
    assert index_entry(kube, namespace, "stays") is not None  # a live model's cache is left alone
    assert not kube.get_json("jobs", namespace=namespace, selector="remotegpu.ai/model-cache=stays")["items"]
