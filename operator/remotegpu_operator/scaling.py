"""The autoscaler: queue depth -> desired worker replicas, as a pure function.

One decision takes what the operator observed (the ImageModel's scaling spec, the
model's queue, the Deployment's replicas, pods that cannot be scheduled) and the
two timestamps it keeps in the ImageModel's status, and returns the replica count
plus the timestamps to store back. Nothing here talks to Kubernetes, so every rule
is unit-tested (tests/operator/test_scaling.py).

Rules, in order:

1. ``spec.replicas`` (the scale subresource) pins the count: no autoscaling.
2. target = clamp(ceil(depth / jobsPerReplica), minReplicas, maxReplicas), with
   depth = queued + warming + running. A model with work never targets zero
   unless maxReplicas is 0 (a disabled model).
3. Scale up at once, at most ``scaleUpLimit`` replicas per decision — except when
   pods are Pending because no node fits them (no free GPU): adding more pods
   would only add more Pending pods, so the count holds and the decision says
   why (``capacity_blocked``).
4. Scale down only after the idle window: ``idleSeconds`` since the queue last
   needed every current replica (``last_saturated``), and for scale to zero also
   ``idleSeconds`` since the model last had any job (``last_active``). At most
   ``scaleDownLimit`` replicas per decision, never below the replicas the running
   jobs occupy, never below minReplicas.
5. An unknown queue (gateway unreachable) never scales down: only minReplicas
   (or the pin) is enforced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from remotegpu_base.catalog import Scaling
from remotegpu_base.protocol import ModelQueue


class Direction(StrEnum):
    UP = "up"
    DOWN = "down"
    NONE = "none"


@dataclass(frozen=True)
class Observation:
    scaling: Scaling
    pinned: int | None  # spec.replicas
    queue: ModelQueue | None  # None: the queue depth is unknown
    current: int  # the Deployment's spec.replicas
    unschedulable: int = 0  # pods Pending with PodScheduled=False/Unschedulable
    last_active: datetime | None = None  # last time the queue had any job
    last_saturated: datetime | None = None  # last time the queue needed every current replica
    # The previous observation still had work (and needed every replica): the work ended
    # between then and now, so the idle window starts now, not at that earlier look.
    was_active: bool = False
    was_saturated: bool = False


@dataclass(frozen=True)
class Decision:
    desired: int
    target: int  # what the queue asks for, before limits and the idle window
    reason: str  # a CamelCase reason for Events and metrics
    message: str
    last_active: datetime | None
    last_saturated: datetime | None
    capacity_blocked: bool = False

    def direction_from(self, current: int) -> Direction:
        if self.desired > current:
            return Direction.UP
        if self.desired < current:
            return Direction.DOWN
        return Direction.NONE


def replicas_for(depth: int, jobs_per_replica: int) -> int:
    return math.ceil(depth / jobs_per_replica) if depth > 0 else 0


def clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _idle_for(now: datetime, since: datetime | None) -> float:
    """Seconds since `since`; a model never seen active counts as idle forever."""
    if since is None:
        return math.inf
    return (now - since).total_seconds()


def _describe(queue: ModelQueue) -> str:
    return (
        f"queue depth {queue.depth} (queued {queue.queued}, warming {queue.warming}, running {queue.running})"
    )


def decide(obs: Observation, now: datetime) -> Decision:
    s = obs.scaling
    current = obs.current
    last_active, last_saturated = obs.last_active, obs.last_saturated

    if obs.pinned is not None:
        return Decision(
            obs.pinned,
            obs.pinned,
            "Pinned",
            f"spec.replicas pins {obs.pinned} replicas",
            last_active,
            last_saturated,
        )

    if obs.queue is None:
        # Without a queue reading nothing may be scaled down; the floor still holds.
        desired = max(current, s.min_replicas)
        return Decision(
            desired,
            desired,
            "QueueUnknown",
            "queue depth unknown (gateway unreachable); holding replicas",
            last_active,
            last_saturated,
        )

    q = obs.queue
    depth = q.depth
    target = clamp(replicas_for(depth, s.jobs_per_replica), s.min_replicas, s.max_replicas)
    if depth > 0:
        last_active = now
        if target >= current:
            last_saturated = now
    else:
        if obs.was_active:
            last_active = now
        if obs.was_saturated:
            last_saturated = now
    what = _describe(q)

    if target > current:
        if obs.unschedulable > 0:
            # Hold, but never below the floor: minReplicas, and one worker when jobs wait.
            held = max(current, min(target, max(s.min_replicas, 1 if depth > 0 else 0)))
            return Decision(
                held,
                target,
                "CapacityBlocked",
                f"{what} asks for {target} replicas but {obs.unschedulable} pod(s) cannot be "
                f"scheduled (no node has a free GPU); holding at {held}",
                last_active,
                last_saturated,
                capacity_blocked=True,
            )
        desired = min(target, current + s.scale_up_limit)
        return Decision(
            desired,
            target,
            "ScaledUp",
            f"{what}: scaling up {current} -> {desired} (target {target})",
            last_active,
            last_saturated,
        )

    if target < current:
        # The floor below which no decision goes: the workers the running jobs occupy.
        busy_floor = min(replicas_for(q.running, s.jobs_per_replica), current)
        floor = max(target, busy_floor, s.min_replicas)
        if current > s.max_replicas:
            # maxReplicas was lowered: shed the excess now (still sparing busy workers).
            desired = max(s.max_replicas, busy_floor, current - s.scale_down_limit)
            return Decision(
                desired,
                target,
                "ScaledDown",
                f"maxReplicas is {s.max_replicas}: scaling down {current} -> {desired}",
                last_active,
                last_saturated,
            )
        idle = _idle_for(now, last_saturated)
        if floor == 0:
            idle = min(idle, _idle_for(now, last_active))
        if idle < s.idle_seconds or floor >= current:
            if floor >= current:
                message = f"{what}: every one of {current} replicas is busy; holding"
            else:
                wait = max(0.0, s.idle_seconds - idle)
                message = f"{what}: {current} replicas, target {target}; scaling down in {wait:.0f}s if it stays low"
            return Decision(current, target, "IdleWindow", message, last_active, last_saturated)
        desired = max(floor, current - s.scale_down_limit)
        reason = "ScaledToZero" if desired == 0 else "ScaledDown"
        return Decision(
            desired,
            target,
            reason,
            f"{what}, idle {idle:.0f}s: scaling down {current} -> {desired}",
            last_active,
            last_saturated,
        )

    return Decision(current, target, "Steady", f"{what}: {current} replicas", last_active, last_saturated)
