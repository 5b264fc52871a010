"""The worker Deployment manifest (pure) and the status it leads to."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

from remotegpu_base import catalog
from remotegpu_base.protocol import ModelQueue
from remotegpu_operator import deployment, status
from remotegpu_operator.deployment import WorkerSettings

SETTINGS = WorkerSettings(gateway_url="http://gw:8000", token_secret="tok", token_secret_key="k")


def body(**spec_overrides) -> dict:
    model = next(m for m in catalog.load_models_file() if m.spec.model == "black-forest-labs/FLUX.1-schnell")
    res = model.to_resource("ns1")
    res["metadata"].update(name="tiny", uid="uid-1", generation=1)
    res["spec"].update(spec_overrides)
    return res


def test_manifest_shape():
    b = body()
    d = deployment.build(b, SETTINGS, replicas=0)
    spec = catalog.ImageModelSpec.model_validate(b["spec"])
    assert d["metadata"]["name"] == "tiny-worker" and d["metadata"]["namespace"] == "ns1"
    assert d["spec"]["replicas"] == 0
    ref = d["metadata"]["ownerReferences"][0]
    assert ref["kind"] == "ImageModel" and ref["uid"] == "uid-1" and ref["controller"] is True
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/managed-by"] == "remotegpu-operator"
    assert labels[deployment.LABEL_MODEL] == deployment.label_value(spec.model)
    c = d["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][:4] == ["remotegpu", "worker", "--model", spec.model]
    assert "--gateway-url" in c["command"] and "http://gw:8000" in c["command"] and "8001" in c["command"]
    env = {e["name"]: e for e in c["env"]}
    assert json.loads(env["REMOTEGPU_MODEL_SPEC"]["value"])["model"] == spec.model
    assert env["REMOTEGPU_WORKER_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "tok", "key": "k"}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["REMOTEGPU_GATEWAY_URL"]["value"] == "http://gw:8000"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == spec.worker.gpu.count
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8001}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8001}
    # Neither probe has the default 1 s timeout (a worker busy on the GPU can be slow to answer).
    assert c["readinessProbe"]["timeoutSeconds"] >= 5 and c["livenessProbe"]["timeoutSeconds"] >= 5
    assert (
        d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        == spec.worker.termination_grace_period_seconds
    )


def test_worker_settings_from_the_spec():
    b = body(
        worker={
            "image": "img:1",
            "command": ["run-me"],
            "gpu": {"count": 2, "resourceName": "amd.com/gpu"},
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "env": [{"name": "X", "value": "1"}],
            "podAnnotations": {"a": "b"},
            "volumes": [{"name": "hf", "persistentVolumeClaim": {"claimName": "weights"}}],
            "volumeMounts": [{"name": "hf", "mountPath": "/cache"}],
            "serviceAccountName": "worker-sa",
            "resources": {"limits": {"memory": "10Gi"}},
            "terminationGracePeriodSeconds": 7,
        }
    )
    d = deployment.build(b, SETTINGS, replicas=1)
    pod = d["spec"]["template"]
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["run-me"] and c["image"] == "img:1"
    assert c["resources"]["limits"] == {"memory": "10Gi", "amd.com/gpu": 2}
    assert pod["spec"]["nodeSelector"] == {"gpu": "h100"}
    assert pod["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 7
    assert c["env"][-1] == {"name": "X", "value": "1"}
    assert pod["metadata"]["annotations"]["a"] == "b"
    assert pod["spec"]["volumes"] == [{"name": "hf", "persistentVolumeClaim": {"claimName": "weights"}}]
    assert c["volumeMounts"] == [{"name": "hf", "mountPath": "/cache"}]
    assert pod["spec"]["serviceAccountName"] == "worker-sa"


def test_same_input_same_manifest_and_scaling_changes_do_not_roll():
    a = deployment.build(body(), SETTINGS, 0)
    assert a == deployment.build(body(), SETTINGS, 0)
    scaled = deployment.build(body(replicas=3, scaling={"maxReplicas": 9}), SETTINGS, 3)
    assert scaled["spec"]["template"] == a["spec"]["template"]
    assert deployment.differs(a, scaled) == []


def test_spec_changes_roll_the_template():
    a = deployment.build(body(), SETTINGS, 0)
    b = body()
    b["spec"]["parameters"]["steps"]["default"] = 3
    changed = deployment.build(b, SETTINGS, 0)
    assert (
        changed["metadata"]["annotations"][deployment.TEMPLATE_HASH]
        != a["metadata"]["annotations"][deployment.TEMPLATE_HASH]
    )
    assert deployment.differs(a, changed) == ["pod template"]


def test_merge_keeps_replicas_and_foreign_metadata():
    live = deployment.build(body(), SETTINGS, 0)
    live["spec"]["replicas"] = 5
    live["metadata"]["resourceVersion"] = "42"
    live["metadata"]["annotations"]["someone/else"] = "x"
    live["status"] = {"replicas": 5}
    b = body()
    b["spec"]["worker"] = {"image": "new:2"}
    want = deployment.build(b, SETTINGS, 0)
    out = deployment.merged(live, want)
    assert out["spec"]["replicas"] == 5 and out["metadata"]["resourceVersion"] == "42"
    assert out["metadata"]["annotations"]["someone/else"] == "x"
    assert out["spec"]["template"] == want["spec"]["template"] and "status" not in out
    assert deployment.differs(out, want) == []


def test_owner_reference_drift_is_detected():
    d = deployment.build(body(), SETTINGS, 0)
    other = copy.deepcopy(d)
    other["metadata"]["ownerReferences"][0]["uid"] = "uid-old"
    assert deployment.differs(other, d) == ["owner reference"]


def test_label_values_are_valid():
    for text in ["black-forest-labs/FLUX.1-schnell", "x" * 300, "-a-", "a/b/c"]:
        v = deployment.label_value(text)
        assert len(v) <= 63 and v[0].isalnum() and v[-1].isalnum()
    assert deployment.label_value("black-forest-labs/FLUX.1-schnell") == "black-forest-labs_FLUX.1-schnell"
    assert len(deployment.deployment_name("n" * 253)) <= 63


NOW = datetime(2026, 1, 1, tzinfo=UTC)


def observed(**kw) -> status.Observed:
    base = dict(
        generation=3,
        deployment="tiny-worker",
        selector="a=b",
        desired=0,
        replicas=0,
        ready=0,
        queue=ModelQueue(),
    )
    return status.Observed(**{**base, **kw})


def conds(st):
    return {c["type"]: c for c in st["conditions"]}


def test_states():
    assert status.compute(observed(), None, NOW)["state"] == "sleeping"
    assert status.compute(observed(desired=1, replicas=1), None, NOW)["state"] == "starting"
    st = status.compute(observed(desired=1, replicas=1, ready=1), None, NOW)
    assert st["state"] == "ready" and conds(st)["Ready"]["status"] == "True"
    assert st["observedGeneration"] == 3 and st["selector"] == "a=b"


PENDING = {
    "metadata": {"name": "p1"},
    "status": {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/4 nodes are available: 2 Insufficient nvidia.com/gpu, 2 node(s) didn't match.",
            }
        ],
    },
}


def test_capacity_condition_carries_the_scheduler_message():
    un = status.unschedulable_pods([PENDING, {"metadata": {"name": "ok"}, "status": {"phase": "Running"}}])
    assert [u.pod for u in un] == ["p1"]
    st = status.compute(observed(desired=2, replicas=2, ready=1, unschedulable=un), None, NOW)
    cap = conds(st)["CapacityAvailable"]
    assert cap["status"] == "False" and cap["reason"] == "InsufficientGPU"
    assert "Insufficient nvidia.com/gpu" in cap["message"]


def test_transition_time_moves_only_on_flips_and_equal_status_is_not_rewritten():
    first = status.compute(observed(), None, NOW)
    later = status.compute(observed(), first["conditions"], NOW + timedelta(minutes=5))
    assert later == first and status.changed(first, later) == {}
    flipped = status.compute(
        observed(desired=1, replicas=1, ready=1), first["conditions"], NOW + timedelta(1)
    )
    assert conds(flipped)["Ready"]["lastTransitionTime"] != conds(first)["Ready"]["lastTransitionTime"]
    assert (
        conds(flipped)["CapacityAvailable"]["lastTransitionTime"]
        == conds(first)["CapacityAvailable"]["lastTransitionTime"]
    )
    assert set(status.changed(first, flipped)) >= {"state", "conditions", "desiredReplicas"}


def test_unknown_queue_is_a_condition():
    st = status.compute(observed(queue=None), None, NOW)
    assert conds(st)["QueueObserved"]["status"] == "False"
    assert st["queueDepth"] is None and st["queue"] is None  # the merge patch removes the old reading


def _container(b: dict) -> dict:
    return deployment.build(b, SETTINGS, 1)["spec"]["template"]["spec"]["containers"][0]


def _qos(container: dict) -> str:
    """The pod's QoS class as the kubelet computes it for one container (cpu and memory)."""
    req, lim = container["resources"].get("requests", {}), container["resources"].get("limits", {})
    if not any(k in req or k in lim for k in ("cpu", "memory")):
        return "BestEffort"
    if all(k in lim and req.get(k, lim[k]) == lim[k] for k in ("cpu", "memory")):
        return "Guaranteed"
    return "Burstable"


def test_catalog_models_get_their_resources_and_none_is_best_effort():
    """Every catalog model's workers have requests; the FLUX models are Guaranteed."""
    for m in catalog.load_models_file():
        b = m.to_resource("ns1")
        b["metadata"].update(uid="u")
        c = _container(b)
        want = "Burstable" if m.spec.weights.random else "Guaranteed"
        assert _qos(c) == want, m.name
        assert "ephemeral-storage" in c["resources"]["requests"], m.name
    flux2 = next(m for m in catalog.load_models_file() if m.name == "flux-2-dev").to_resource("ns1")
    flux1 = next(m for m in catalog.load_models_file() if m.name == "flux-1-dev").to_resource("ns1")
    flux2["metadata"]["uid"] = flux1["metadata"]["uid"] = "u"
    mem2 = _container(flux2)["resources"]["limits"]["memory"]
    mem1 = _container(flux1)["resources"]["limits"]["memory"]
    assert int(mem2.removesuffix("Gi")) > 2 * int(mem1.removesuffix("Gi"))


def test_guaranteed_limits_equal_requests_and_burstable_keeps_what_is_given():
    c = _container(
        body(worker={"resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "3"}}})
    )
    assert c["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": 1}
    c = _container(body(worker={"resources": {"limits": {"memory": "8Gi"}}}))  # a limit alone is the request
    assert c["resources"]["requests"] == {"memory": "8Gi"} and c["resources"]["limits"]["memory"] == "8Gi"
    c = _container(
        body(worker={"qos": "Burstable", "resources": {"requests": {"cpu": "2", "memory": "1Gi"}}})
    )
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"nvidia.com/gpu": 1}}
    assert _qos(c) == "Burstable"


def test_scheduling_and_security_settings_reach_the_pod():
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["H100"]}
                        ]
                    }
                ]
            }
        }
    }
    b = body(
        worker={
            "affinity": affinity,
            "priorityClassName": "gpu-high",
            "runtimeClassName": "nvidia",
            "imagePullSecrets": [{"name": "regcred"}],
        }
    )
    pod = deployment.build(b, SETTINGS, 1)["spec"]["template"]["spec"]
    assert pod["affinity"] == affinity and pod["priorityClassName"] == "gpu-high"
    assert pod["runtimeClassName"] == "nvidia" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    restricted = pod["containers"][0]["securityContext"]
    assert restricted == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    own = _container(body(worker={"securityContext": {"runAsUser": 0}}))["securityContext"]
    assert own == {"runAsUser": 0}
    plain = deployment.build(body(), SETTINGS, 1)["spec"]["template"]["spec"]
    assert not {"affinity", "priorityClassName", "runtimeClassName", "imagePullSecrets"} & set(plain)


def test_a_model_without_cpu_or_memory_is_not_best_effort():
    c = _container(body(worker={"gpu": {"count": 1}}))
    assert c["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"nvidia.com/gpu": 1}}
    assert _qos(c) == "Burstable"
