"""Every way a worker can fail to come up has a condition with a reason and message (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from remotegpu_base.protocol import ModelQueue
from remotegpu_operator import status

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def pod(name: str, phase: str = "Pending", conditions=(), containers=(), gates=()) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {"schedulingGates": [{"name": g} for g in gates]} if gates else {},
        "status": {"phase": phase, "conditions": list(conditions), "containerStatuses": list(containers)},
    }


def compute(**kw) -> dict:
    base = dict(
        generation=1, deployment="m-worker", selector="s", desired=1, replicas=1, ready=0, queue=ModelQueue()
    )
    return status.compute(status.Observed(**{**base, **kw}), None, NOW)


def cond(st: dict, type_: str) -> dict:
    return next(c for c in st["conditions"] if c["type"] == type_)


def test_a_resource_quota_refusal_is_missing_capacity_not_starting_forever():
    dep = {
        "spec": {"replicas": 2},
        "status": {
            "conditions": [
                {
                    "type": "ReplicaFailure",
                    "status": "True",
                    "reason": "FailedCreate",
                    "message": 'pods "m-worker-abc" is forbidden: exceeded quota: gpus, requested: '
                    "requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=0, limited: requests.nvidia.com/gpu=0",
                }
            ]
        },
    }
    waiting = status.unschedulable_pods([], deployment=dep)
    assert len(waiting) == 2 and waiting[0].reason == "QuotaExceeded"
    st = compute(unschedulable=waiting)
    cap = cond(st, "CapacityAvailable")
    assert (
        cap["status"] == "False" and cap["reason"] == "QuotaExceeded" and "exceeded quota" in cap["message"]
    )
    assert cond(st, "Ready")["reason"] == "NoCapacity"


def test_a_scheduling_gate_is_missing_capacity():
    gated = pod(
        "p1",
        gates=["kueue.x-k8s.io/admission"],
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}],
    )
    waiting = status.unschedulable_pods([gated])
    assert [w.reason for w in waiting] == ["SchedulingGated"]
    assert "kueue.x-k8s.io/admission" in waiting[0].message


def test_no_gpu_names_the_models_that_hold_them():
    p = pod(
        "p1",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }
        ],
    )
    st = compute(unschedulable=status.unschedulable_pods([p]), holders=["flux-dev", "sdxl"])
    cap = cond(st, "CapacityAvailable")
    assert cap["reason"] == "InsufficientGPU" and "held by models flux-dev, sdxl" in cap["message"]


def test_a_crash_loop_and_an_image_pull_failure_are_failures_with_their_reason():
    crash = pod(
        "p1",
        phase="Running",
        containers=[{"state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s"}}}],
    )
    pull = pod(
        "p2", containers=[{"state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}]
    )
    failing = status.failing_pods([crash, pull])
    assert [f.reason for f in failing] == ["CrashLoopBackOff", "ImagePullBackOff"]
    st = compute(failing=failing)
    assert st["state"] == "starting"
    ready = cond(st, "Ready")
    assert ready["reason"] == "CrashLoopBackOff" and "back-off" in ready["message"]
    healthy = cond(st, "WorkersHealthy")
    assert healthy["status"] == "False" and "2 worker pod(s) failing" in healthy["message"]
    assert cond(compute(), "WorkersHealthy")["status"] == "True"


def test_the_scaling_decision_is_a_condition():
    st = compute(scaling=(True, "ScaleDownRateLimited", "next scale-down in 40s"))
    assert cond(st, "ScalingActive")["reason"] == "ScaleDownRateLimited"
    st = compute(scaling=(False, "DuplicateModel", "ImageModel a already serves x"))
    assert cond(st, "ScalingActive")["status"] == "False"


def test_a_waiting_backlog_needs_no_status_write_per_tick():
    # The oldest job's age grows every tick; the status holds a time that stays put.
    first = compute(queue=ModelQueue(queued=2, oldest_wait_seconds=31.0))
    later = status.compute(
        status.Observed(
            generation=1, deployment="m-worker", selector="s", desired=1, replicas=1, ready=0,
            queue=ModelQueue(queued=2, oldest_wait_seconds=32.5),
        ),
        first["conditions"],
        NOW + timedelta(seconds=1.5),
    )  # fmt: skip
    assert status.changed(first, later) == {}
    assert first["queue"]["oldestQueuedTime"] == "2026-01-01T11:59:20Z"
