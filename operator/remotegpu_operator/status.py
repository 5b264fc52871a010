"""The ImageModel's status, computed from what the operator observed (pure functions).

`state` follows the design: `sleeping` = 0 replicas wanted; `starting` = replicas
wanted but none ready; `ready` = at least one ready worker. Conditions follow the
Kubernetes API conventions (type, status, reason, message, lastTransitionTime that
only moves when the status flips, observedGeneration):

- Ready: a worker is ready to take jobs (False with Sleeping / Starting / NoCapacity).
- CapacityAvailable: every wanted pod could be scheduled; False with InsufficientGPU
  (or Unschedulable) and the scheduler's own message when pods stay Pending.
- QueueObserved: the gateway's queue depth is being read (False: GatewayUnreachable, NoGateway,
  Waiting for the first read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
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
    pod: str
    message: str


def unschedulable_pods(pods: list[dict[str, Any]]) -> list[Unschedulable]:
    """Pending pods the scheduler could not place (PodScheduled=False, reason Unschedulable)."""
    out = []
    for pod in pods:
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        st = pod.get("status") or {}
        if st.get("phase", "Pending") != "Pending":
            continue
        for c in st.get("conditions") or []:
            if (
                c.get("type") == "PodScheduled"
                and c.get("status") == "False"
                and c.get("reason") == "Unschedulable"
            ):
                out.append(Unschedulable(pod["metadata"]["name"], c.get("message") or "unschedulable"))
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
    state = runtime_state(obs.desired, obs.ready)

    if state is RuntimeState.READY:
        ready = _condition(
            "Ready",
            True,
            "WorkersReady",
            f"{obs.ready}/{obs.desired} workers ready",
            obs.generation,
            prev,
            now,
        )
    elif state is RuntimeState.STARTING:
        reason = "NoCapacity" if obs.unschedulable else "WorkersStarting"
        ready = _condition(
            "Ready", False, reason, f"0/{obs.desired} workers ready", obs.generation, prev, now
        )
    else:
        ready = _condition(
            "Ready",
            False,
            "Sleeping",
            "scaled to zero; the first job wakes the model",
            obs.generation,
            prev,
            now,
        )

    if obs.unschedulable:
        first = obs.unschedulable[0]
        capacity = _condition(
            "CapacityAvailable",
            False,
            capacity_reason(first.message, obs.gpu_resource),
            f"{len(obs.unschedulable)} worker pod(s) cannot be scheduled: {first.message}",
            obs.generation,
            prev,
            now,
        )
    else:
        capacity = _condition(
            "CapacityAvailable",
            True,
            "Scheduled",
            "every wanted worker pod is scheduled",
            obs.generation,
            prev,
            now,
        )

    if obs.queue is None:
        queue_cond = _condition(
            "QueueObserved",
            False,
            obs.queue_unknown[0],
            obs.queue_unknown[1],
            obs.generation,
            prev,
            now,
        )
    else:
        queue_cond = _condition(
            "QueueObserved",
            True,
            "QueueRead",
            "queue depth is read from the gateway",
            obs.generation,
            prev,
            now,
        )

    status: dict[str, Any] = {
        "state": state.value,
        "replicas": obs.replicas,
        "readyReplicas": obs.ready,
        "desiredReplicas": obs.desired,
        "selector": obs.selector,
        "deployment": obs.deployment,
        "conditions": [ready, capacity, queue_cond],
    }
    if obs.queue is not None:
        status["queueDepth"] = obs.queue.depth
        status["queue"] = {
            "queued": obs.queue.queued,
            "warming": obs.queue.warming,
            "running": obs.queue.running,
            "oldestWaitSeconds": round(obs.queue.oldest_wait_seconds, 1),
        }
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
