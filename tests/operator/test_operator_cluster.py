"""The operator against the local control plane: real API server, scheduler, controllers, KWOK GPU nodes.

A model's life: scaling up and down, restarts, two operators (test_operator_cluster_policies.py: the
scale subresource, modes, quotas, validation, foreign objects, priorities, placement). Two files, so that
`make test`'s workers share them.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.operator.conftest import (
    KWOK_DELAY,
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


def test_new_model_sleeps_at_zero_with_an_owned_deployment(kube, namespace, operators: Operators, gateway):
    im = imagemodel("m1", "test/sleepy")
    operators.start(gateway_url=gateway(im).url)
    apply(kube, namespace, im)
    im = wait_for(
        lambda: (
            (o := kube.find("imagemodel", "m1", namespace)) and (o.get("status") or {}).get("state") and o
        ),
        90,
        "status",
    )
    assert im["status"]["state"] == "sleeping"
    assert im["status"]["desiredReplicas"] == 0 and im["status"]["queueDepth"] == 0
    assert im["status"]["observedGeneration"] == im["metadata"]["generation"]
    assert condition(im, "Ready")["reason"] == "Sleeping"
    assert im["status"]["selector"] == "app.kubernetes.io/name=remotegpu-worker,remotegpu.ai/imagemodel=m1"
    d = kube.find("deployment", "m1-worker", namespace)
    assert d is not None and d["spec"]["replicas"] == 0
    ref = d["metadata"]["ownerReferences"][0]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
        "ImageModel",
        "m1",
        im["metadata"]["uid"],
        True,
    )
    # kubectl shows the printer columns.
    table = kube.kubectl("get", "imagemodels", "-n", namespace).stdout
    assert "sleeping" in table and "test/sleepy" in table


def test_a_low_priority_job_never_wakes_a_sleeping_model(kube, namespace, operators: Operators, gateway):
    """Low-priority jobs run only on capacity that is already up: the operator sees one waiting
    (status.queue.lowPriority) and keeps the model asleep; a normal job then wakes it."""
    im = imagemodel("m-low", "test/low", worker={"image": "example.invalid/worker:test", "gpu": {"count": 1}})
    gw = gateway(im)
    operators.start(gateway_url=gw.url)
    apply(kube, namespace, im)
    wait_for(lambda: state_of(kube, namespace, "m-low") == "sleeping", 90, "sleeping")
    gw.submit("test/low", priority="low")
    seen = wait_for(
        lambda: (
            (q := kube.find("imagemodel", "m-low", namespace)["status"].get("queue") or {}).get("lowPriority")
            == 1
            and q
        ),
        90,
        "the operator to see the low-priority job",
    )
    assert seen["queued"] == 0 and seen["warming"] == 0
    assert replicas_of(kube, namespace, "m-low") == 0 and state_of(kube, namespace, "m-low") == "sleeping"
    gw.submit("test/low")
    wait_for(lambda: replicas_of(kube, namespace, "m-low") == 1, 90, "a normal job wakes it")


def test_queued_job_scales_up_starting_then_ready_then_back_to_sleep(
    kube, namespace, operators: Operators, gateway
):
    im = imagemodel(
        "m2",
        "test/wake",
        worker={
            "image": "example.invalid/worker:test",
            "gpu": {"count": 1},
            "podAnnotations": {
                KWOK_DELAY: "10s"
            },  # a Go duration; long enough to see starting on a busy machine
        },
    )
    gw = gateway(im)
    op = operators.start(gateway_url=gw.url)
    apply(kube, namespace, im)
    wait_for(lambda: state_of(kube, namespace, "m2") == "sleeping", 90, "sleeping")
    t0 = time.monotonic()
    (job,) = gw.submit("test/wake")
    wait_for(lambda: replicas_of(kube, namespace, "m2") == 1, 90, "replicas 1", every=0.02)
    reacted = time.monotonic() - t0
    # Driven by the queue's change, not a periodic resync (30 s or more); a margin for load.
    assert reacted < 15, f"scale-up took {reacted:.2f}s"
    wait_for(lambda: state_of(kube, namespace, "m2") == "starting", 90, "starting")
    im = kube.find("imagemodel", "m2", namespace)
    assert im["status"]["queue"]["warming"] == 1 and im["status"]["queueDepth"] == 1
    assert condition(im, "Ready")["reason"] == "WorkersStarting"
    wait_for(lambda: state_of(kube, namespace, "m2") == "ready", 60, "ready")
    im = kube.find("imagemodel", "m2", namespace)
    assert im["status"]["readyReplicas"] == 1 and condition(im, "Ready")["status"] == "True"
    assert op.metric("remotegpu_operator_ready_replicas", imagemodel="m2") == 1.0
    assert op.metric("remotegpu_operator_worker_gpus", imagemodel="m2") == 1.0  # cost: x replicas
    assert op.metric("remotegpu_operator_unschedulable_replicas", imagemodel="m2") == 0.0
    assert op.metric("remotegpu_operator_model_state", imagemodel="m2", state="ready") == 1.0
    # The pod (as its worker would) leases the job, runs it, completes it; after the
    # idle window (3 s) the model sleeps again.
    pod = kube.get_json("pods", namespace=namespace, selector="remotegpu.ai/imagemodel=m2")["items"][0][
        "metadata"
    ]["name"]
    lease = gw.lease("test/wake", pod)
    # The operator told the gateway the pod's phases: the job's timeline shows them.
    timeline = wait_for(
        lambda: (
            (
                t := gw.http.get(
                    f"/v1/inference/jobs/{job}/timeline", headers={"Authorization": f"Bearer {gw.key}"}
                )
            )
            and len(t.json()["phases"]) == 4
            and t.json()
        ),
        90,
        "the pod's phases in the job's timeline",
    )
    assert timeline["waited_for_capacity"] is True and timeline["worker_id"] == pod
    assert [p["phase"] for p in timeline["phases"]] == [
        "scale_decision", "pod_scheduled", "container_started", "first_lease",
    ]  # fmt: skip
    wait_for(
        lambda: (kube.find("imagemodel", "m2", namespace)["status"].get("queue") or {}).get("running") == 1,
        90,
        "running 1 in status",
    )
    time.sleep(1)
    idle_from = time.monotonic()  # the queue empties after this instant
    gw.complete(lease)
    assert gw.depth("test/wake") == 0
    time.sleep(1.5)
    assert replicas_of(kube, namespace, "m2") == 1, "scaled down inside the idle window"
    wait_for(lambda: replicas_of(kube, namespace, "m2") == 0, 90, "replicas 0")
    assert time.monotonic() - idle_from >= 3
    wait_for(lambda: state_of(kube, namespace, "m2") == "sleeping", 90, "sleeping again")
    wait_event(kube, namespace, "m2", "ScaledUp")
    wait_event(kube, namespace, "m2", "ScaledToZero")
    assert (op.metric("remotegpu_operator_scale_decisions_total", imagemodel="m2", direction="up") or 0) >= 1


def test_spec_change_rolls_the_deployment_and_scaling_changes_do_not(kube, namespace, operators: Operators):
    operators.start()
    apply(kube, namespace, imagemodel("m3", "test/roll"))
    wait_for(lambda: state_of(kube, namespace, "m3") == "sleeping", 90, "sleeping")
    d0 = kube.find("deployment", "m3-worker", namespace)
    h0 = d0["metadata"]["annotations"]["remotegpu.ai/template-hash"]
    # A scaling-only change must not restart workers.
    kube.kubectl(
        "patch",
        "imagemodel",
        "m3",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"scaling":{"maxReplicas":3}}}',
    )
    time.sleep(2)
    d1 = kube.find("deployment", "m3-worker", namespace)
    assert d1["metadata"]["annotations"]["remotegpu.ai/template-hash"] == h0
    assert d1["metadata"]["generation"] == d0["metadata"]["generation"]
    # An image change rolls the pod template.
    kube.kubectl(
        "patch",
        "imagemodel",
        "m3",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"worker":{"image":"example.invalid/worker:v2"}}}',
    )
    d2 = wait_for(
        lambda: (
            (d := kube.find("deployment", "m3-worker", namespace))
            and d["metadata"]["annotations"]["remotegpu.ai/template-hash"] != h0
            and d
        ),
        90,
        "new template",
    )
    assert d2["spec"]["template"]["spec"]["containers"][0]["image"] == "example.invalid/worker:v2"
    im = wait_for(
        lambda: (
            (o := kube.find("imagemodel", "m3", namespace))
            and o["status"].get("observedGeneration") == o["metadata"]["generation"]
            and o
        ),
        90,
        "observed",
    )
    assert im["metadata"]["generation"] >= 3
    wait_event(kube, namespace, "m3", "DeploymentUpdated")


def test_deleting_the_imagemodel_removes_its_deployment(kube, namespace, operators: Operators):
    operators.start()
    apply(kube, namespace, imagemodel("m4", "test/delete", replicas=1))
    wait_for(lambda: state_of(kube, namespace, "m4") == "ready", 90, "ready (pinned 1)")
    assert (
        len(kube.get_json("pods", namespace=namespace, selector="remotegpu.ai/imagemodel=m4")["items"]) == 1
    )
    kube.kubectl("delete", "imagemodel", "m4", "-n", namespace, "--timeout=30s")
    # The garbage collector (kube-controller-manager) follows the owner reference. It picks up
    # a new CRD's kind on its discovery resync (every 30 s), so on a fresh cluster this can
    # take that long.
    wait_for(lambda: kube.find("deployment", "m4-worker", namespace) is None, 90, "deployment gone")
    wait_for(
        lambda: (
            not kube.get_json("pods", namespace=namespace, selector="remotegpu.ai/imagemodel=m4")["items"]
        ),
        90,
        "pods gone",
    )


def test_more_replicas_than_gpus_reports_capacity_and_does_not_thrash(
    kube, namespace, operators: Operators, gateway
):
    # No node has 3 GPUs: the first pod can never be scheduled.
    im = imagemodel(
        "m5",
        "test/huge",
        worker={"image": "example.invalid/worker:test", "gpu": {"count": 3}},
        scaling={"maxReplicas": 4, "idleSeconds": 1, "scaleUpLimit": 4},
    )
    gw = gateway(im)
    op = operators.start(gateway_url=gw.url)
    apply(kube, namespace, im)
    wait_for(lambda: state_of(kube, namespace, "m5") == "sleeping", 90, "sleeping")
    gw.submit("test/huge", 4)
    im = wait_condition(kube, namespace, "m5", "CapacityAvailable", "capacity condition", status="False")
    cap = condition(im, "CapacityAvailable")
    assert cap["reason"] == "InsufficientGPU", cap
    assert "Insufficient nvidia.com/gpu" in cap["message"]
    assert im["status"]["state"] == "starting" and condition(im, "Ready")["reason"] == "NoCapacity"
    # Held: no pile of Pending pods, and never scaled to zero while jobs wait (idle window is 1 s).
    first = replicas_of(kube, namespace, "m5")
    assert first is not None and 1 <= first <= 4
    gen = kube.find("deployment", "m5-worker", namespace)["metadata"]["generation"]
    time.sleep(4)
    d = kube.find("deployment", "m5-worker", namespace)
    assert d["spec"]["replicas"] == first and d["metadata"]["generation"] == gen
    assert wait_event(kube, namespace, "m5", "InsufficientGPU")["type"] == "Warning"
    # The dashboards' Pending pods and the alert's capacity, as metrics.
    assert (op.metric("remotegpu_operator_unschedulable_replicas", imagemodel="m5") or 0) >= 1
    assert op.metric("remotegpu_operator_capacity_available", imagemodel="m5") == 0.0
    assert op.metric("remotegpu_operator_worker_gpus", imagemodel="m5") == 3.0


def test_operator_restart_mid_scale_converges_without_duplicates(
    kube, namespace, operators: Operators, gateway
):
    im = imagemodel("m6", "test/restart", scaling={"maxReplicas": 3, "idleSeconds": 300, "scaleUpLimit": 1})
    gw = gateway(im)
    op = operators.start("op-a", gateway_url=gw.url)
    apply(kube, namespace, im)
    wait_for(lambda: state_of(kube, namespace, "m6") == "sleeping", 90, "sleeping")
    gw.submit("test/restart", 3)
    wait_for(lambda: (replicas_of(kube, namespace, "m6") or 0) >= 1, 90, "first step", every=0.02)
    op.stop(signal.SIGKILL)  # no Lease release, no cleanup
    # Mid-scale: fewer replicas than the queue needs. op-a steps up every 0.5 s, so on a
    # loaded machine it may have reached 3 before the kill; set the partial state instead
    # of racing it.
    kube.kubectl("scale", "deployment/m6-worker", "-n", namespace, "--replicas=1")
    assert replicas_of(kube, namespace, "m6") == 1
    operators.start("op-b", gateway_url=gw.url)
    wait_for(lambda: replicas_of(kube, namespace, "m6") == 3, 90, "converged to 3")
    wait_for(lambda: state_of(kube, namespace, "m6") == "ready", 90, "ready")
    deps = kube.get_json("deployments", namespace=namespace, selector="remotegpu.ai/imagemodel=m6")["items"]
    assert len(deps) == 1
    rss = kube.get_json("replicasets", namespace=namespace, selector="remotegpu.ai/imagemodel=m6")["items"]
    assert len(rss) == 1, "the pod template changed across the restart"
    # A restart changes nothing that is already right.
    before = kube.find("deployment", "m6-worker", namespace)["metadata"]["resourceVersion"]
    operators.procs[-1].stop()
    op_c = operators.start("op-c", gateway_url=gw.url)
    wait_for(
        lambda: op_c.metric("remotegpu_operator_desired_replicas", imagemodel="m6") == 3.0,
        90,
        "op-c reconciled m6",
    )
    time.sleep(2)
    assert kube.find("deployment", "m6-worker", namespace)["metadata"]["resourceVersion"] == before


def test_two_operators_do_not_fight(kube, namespace, operators: Operators, gateway):
    im = imagemodel("m7", "test/pair", scaling={"maxReplicas": 2, "idleSeconds": 300})
    gw = gateway(im)
    a = operators.start("op-a", gateway_url=gw.url)
    b = operators.start("op-b", gateway_url=gw.url)
    leader = operators.leader()
    standby = b if leader is a else a
    time.sleep(1)
    assert not standby.is_leader()
    lease = kube.get_json("lease", "remotegpu-operator", namespace=namespace)
    assert lease["spec"]["holderIdentity"] == leader.identity
    apply(kube, namespace, im)
    wait_for(lambda: state_of(kube, namespace, "m7") == "sleeping", 90, "sleeping")
    gen0 = kube.find("deployment", "m7-worker", namespace)["metadata"]["generation"]
    gw.submit("test/pair")
    wait_for(lambda: replicas_of(kube, namespace, "m7") == 1, 90, "replicas 1")
    time.sleep(3)
    d = kube.find("deployment", "m7-worker", namespace)
    assert d["spec"]["replicas"] == 1 and d["metadata"]["generation"] == gen0 + 1, (
        "more than one replica write"
    )
    # The leader goes away; the standby takes over (released Lease: at once) and acts on the queue.
    leader.stop()
    wait_for(standby.is_leader, 90, "standby takes over")
    assert (
        kube.get_json("lease", "remotegpu-operator", namespace=namespace)["spec"]["holderIdentity"]
        == standby.identity
    )
    gw.submit("test/pair")
    wait_for(lambda: replicas_of(kube, namespace, "m7") == 2, 90, "replicas 2 by the new leader")


def test_scale_down_takes_idle_pods_and_spares_busy_ones(
    kube, namespace, operators: Operators, queue: QueueStub
):
    operators.start()
    apply(kube, namespace, imagemodel("m8", "test/busy", scaling={"maxReplicas": 2, "idleSeconds": 2}))
    wait_for(lambda: state_of(kube, namespace, "m8") == "sleeping", 90, "sleeping")
    queue.set("test/busy", warming=2)
    wait_for(
        lambda: kube.find("imagemodel", "m8", namespace)["status"].get("readyReplicas") == 2, 90, "2 ready"
    )
    names = sorted(
        p["metadata"]["name"]
        for p in kube.get_json("pods", namespace=namespace, selector="remotegpu.ai/imagemodel=m8")["items"]
    )
    busy = names[1]
    queue.set("test/busy", running=1, busy_workers=[busy])

    def cost(pod: str) -> str | None:
        p = kube.find("pod", pod, namespace)
        return ((p or {}).get("metadata", {}).get("annotations") or {}).get(
            "controller.kubernetes.io/pod-deletion-cost"
        )

    wait_for(lambda: cost(busy) == "1000", 90, "busy pod marked")
    assert cost(names[0]) in (None, "0")
    wait_for(lambda: replicas_of(kube, namespace, "m8") == 1, 90, "scale down to the busy one")
    wait_for(
        lambda: (
            [
                p["metadata"]["name"]
                for p in kube.get_json("pods", namespace=namespace, selector="remotegpu.ai/imagemodel=m8")[
                    "items"
                ]
            ]
            == [busy]
        ),
        90,
        "idle pod removed",
    )
    time.sleep(3)
    assert replicas_of(kube, namespace, "m8") == 1, "a running job's worker was scaled away"
