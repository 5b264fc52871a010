"""The ImageModel's status, computed from what the operator observed (pure functions).

`state` follows the design: `sleeping` = 0 replicas wanted; `starting` = replicas
wanted but none ready; `ready` = at least one ready worker. Conditions follow the
Kubernetes API conventions (type, status, reason, message, lastTransitionTime that
only moves when the status flips, observedGeneration):

- Ready: a worker is ready to take jobs (False with Sleeping / WorkersStarting /
  NoCapacity / a failing pod's reason such as CrashLoopBackOff or ImagePullBackOff).
- CapacityAvailable: every wanted pod could be placed; False with InsufficientGPU,
  Unschedulable, SchedulingGated (Kueue) or QuotaExceeded / FailedCreate, the
  cluster's own message, and the models that hold the GPUs.
- WorkersHealthy: no worker pod is crash-looping or failing to pull its image.
- QueueObserved: the gateway's queue depth is being read (False: GatewayUnreachable, NoGateway,
  Waiting for the first read).
- ScalingActive: the autoscaler's last decision as its reason (ScaledUp, IdleWindow,
  ScaleDownRateLimited, ColdStartPayback, Pinned, Fixed, External, ...); False with
  QueueUnknown or DuplicateModel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from remotegpu_base.protocol import ModelQueue, RuntimeState


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class Unschedulable:
    """A worker pod (or a missing one) waiting for capacity, and why."""

    pod: str
    message: str
    reason: str = "Unschedulable"  # InsufficientGPU, Unschedulable, SchedulingGated, QuotaExceeded


@dataclass(frozen=True)
class Failing:
    """A worker pod that will not get ready by waiting: a crash loop, an image that does not pull."""

    pod: str
    reason: str
    message: str


# Container waiting reasons that do not fix themselves.
FAILING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)


def _live_pending(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        p
        for p in pods
        if not p.get("metadata", {}).get("deletionTimestamp")
        and (p.get("status") or {}).get("phase", "Pending") == "Pending"
    ]


def unschedulable_pods(
    pods: list[dict[str, Any]], gpu_resource: str = "nvidia.com/gpu", deployment: dict[str, Any] | None = None
) -> list[Unschedulable]:
    """Worker pods waiting for capacity: not placed by the scheduler, held by a scheduling
    gate (Kueue), or never created because a ResourceQuota refuses them."""
    out = []
    for pod in _live_pending(pods):
        name = pod["metadata"]["name"]
        if (pod.get("spec") or {}).get("schedulingGates"):
            gates = ", ".join(g.get("name", "?") for g in pod["spec"]["schedulingGates"])
            out.append(
                Unschedulable(name, f"pod {name} is held by scheduling gates: {gates}", "SchedulingGated")
            )
            continue
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") != "PodScheduled" or c.get("status") != "False":
                continue
            if c.get("reason") == "Unschedulable":
                message = c.get("message") or "unschedulable"
                out.append(Unschedulable(name, message, capacity_reason(message, gpu_resource)))
            elif c.get("reason") == "SchedulingGated":
                out.append(
                    Unschedulable(name, c.get("message") or "held by a scheduling gate", "SchedulingGated")
                )
    if deployment is not None:
        out += _refused_pods(deployment, len(pods))
    return out


def _refused_pods(deployment: dict[str, Any], existing: int) -> list[Unschedulable]:
    """Pods the ReplicaSet could not create (a ResourceQuota, a LimitRange): one entry per missing pod."""
    st = deployment.get("status") or {}
    for c in st.get("conditions") or []:
        if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
            message = c.get("message") or "the ReplicaSet could not create pods"
            reason = "QuotaExceeded" if "exceeded quota" in message else "FailedCreate"
            missing = max(1, int((deployment.get("spec") or {}).get("replicas") or 0) - existing)
            return [Unschedulable("", message, reason)] * missing
    return []


def failing_pods(pods: list[dict[str, Any]]) -> list[Failing]:
    """Worker pods stuck in a crash loop or an image pull that keeps failing."""
    out = []
    for pod in pods:
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in FAILING_REASONS:
                message = waiting.get("message") or waiting["reason"]
                out.append(
                    Failing(
                        pod["metadata"]["name"], waiting["reason"], f"{pod['metadata']['name']}: {message}"
                    )
                )
                break
    return out


def runtime_state(desired: int, ready: int) -> RuntimeState:
    if ready >= 1 and desired >= 1:
        return RuntimeState.READY
    if desired >= 1:
        return RuntimeState.STARTING
    return RuntimeState.SLEEPING


@dataclass(frozen=True)
class Observed:
    generation: int
    deployment: str
    selector: str
    desired: int  # the Deployment's spec.replicas
    replicas: int  # the Deployment's status.replicas (pods that exist)
    ready: int
    queue: ModelQueue | None
    unschedulable: list[Unschedulable] = field(default_factory=list)
    gpu_resource: str = "nvidia.com/gpu"
    last_active: datetime | None = None
    last_saturated: datetime | None = None
    last_scale: datetime | None = None
    deployment_current: bool = True  # the Deployment matches this generation's spec
    # (reason, message) when `queue` is None
    queue_unknown: tuple[str, str] = ("GatewayUnreachable", "the gateway's queue depth cannot be read")
    failing: list[Failing] = field(default_factory=list)
    holders: list[str] = field(default_factory=list)  # models holding the GPUs this one waits for
    # The autoscaler's last decision (reason, message); ok=False when it cannot scale.
    scaling: tuple[bool, str, str] = (True, "Steady", "")


def _condition(
    type_: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int,
    previous: dict[str, dict[str, Any]],
    now: datetime,
) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = previous.get(type_)
    since = before["lastTransitionTime"] if before and before.get("status") == status else rfc3339(now)
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def capacity_reason(message: str, gpu_resource: str) -> str:
    return "InsufficientGPU" if f"Insufficient {gpu_resource}" in message else "Unschedulable"


def compute(obs: Observed, previous_conditions: list[dict[str, Any]] | None, now: datetime) -> dict[str, Any]:
    """The status to write. Equal inputs give an equal dict, so unchanged status is never re-written."""
    prev: dict[str, dict[str, Any]] = {c["type"]: c for c in previous_conditions or [] if c.get("type")}

    def cond(type_: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
        return _condition(type_, ok, reason, message, obs.generation, prev, now)

    state = runtime_state(obs.desired, obs.ready)
    if state is RuntimeState.READY:
        ready = cond("Ready", True, "WorkersReady", f"{obs.ready}/{obs.desired} workers ready")
    elif state is RuntimeState.STARTING:
        if obs.failing:
            reason, message = (
                obs.failing[0].reason,
                f"0/{obs.desired} workers ready: {obs.failing[0].message}",
            )
        elif obs.unschedulable:
            reason, message = "NoCapacity", f"0/{obs.desired} workers ready: {obs.unschedulable[0].message}"
        else:
            reason, message = "WorkersStarting", f"0/{obs.desired} workers ready"
        ready = cond("Ready", False, reason, message)
    else:
        ready = cond("Ready", False, "Sleeping", "scaled to zero; the first job wakes the model")

    if obs.unschedulable:
        first = obs.unschedulable[0]
        message = f"{len(obs.unschedulable)} worker pod(s) cannot be scheduled: {first.message}"
        if obs.holders:
            message += f"; the GPUs are held by models {', '.join(obs.holders)}"
        capacity = cond("CapacityAvailable", False, first.reason, message)
    else:
        capacity = cond("CapacityAvailable", True, "Scheduled", "every wanted worker pod is scheduled")

    if obs.failing:
        f = obs.failing[0]
        healthy = cond(
            "WorkersHealthy", False, f.reason, f"{len(obs.failing)} worker pod(s) failing: {f.message}"
        )
    else:
        healthy = cond(
            "WorkersHealthy", True, "NoFailures", "no worker pod is crash-looping or failing to pull"
        )

    if obs.queue is None:
        queue_cond = cond("QueueObserved", False, obs.queue_unknown[0], obs.queue_unknown[1])
    else:
        queue_cond = cond("QueueObserved", True, "QueueRead", "queue depth is read from the gateway")

    scaling_ok, scaling_reason, scaling_message = obs.scaling
    scaling = cond("ScalingActive", scaling_ok, scaling_reason, scaling_message or scaling_reason)

    status: dict[str, Any] = {
        "state": state.value,
        "replicas": obs.replicas,
        "readyReplicas": obs.ready,
        "desiredReplicas": obs.desired,
        "selector": obs.selector,
        "deployment": obs.deployment,
        "conditions": [ready, capacity, healthy, queue_cond, scaling],
    }
    if obs.queue is not None:
        status["queueDepth"] = obs.queue.depth
        status["queue"] = {
            "queued": obs.queue.queued,
            "warming": obs.queue.warming,
            "running": obs.queue.running,
            "lowPriority": obs.queue.low_priority,
        }
        # A time, not an age: it stays put while the job waits, so it needs no status write per tick.
        if obs.queue.oldest_wait_seconds > 0:
            since = now - timedelta(seconds=obs.queue.oldest_wait_seconds)
            status["queue"]["oldestQueuedTime"] = rfc3339(since.replace(second=since.second // 10 * 10))
    else:
        # Unknown, not stale: null removes the last reading (a merge patch).
        status["queueDepth"] = None
        status["queue"] = None
    if obs.deployment_current:
        status["observedGeneration"] = obs.generation
    for key, value in (
        ("lastActiveTime", obs.last_active),
        ("lastSaturatedTime", obs.last_saturated),
        ("lastScaleTime", obs.last_scale),
    ):
        if value is not None:
            status[key] = rfc3339(value)
    return status


def changed(current: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that turns `current` into `new` (only keys `new` sets); {} when equal."""
    current = current or {}
    return {k: v for k, v in new.items() if current.get(k) != v}
