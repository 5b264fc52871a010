"""The autoscaler's decisions, as pure functions: queued work -> worker replicas.

`decide()` takes what the operator observed about one model (its scaling spec,
its queue, the Deployment's replicas, pods that cannot be placed) plus what it
remembers between decisions (`Observation`'s time fields and recent scale-downs),
and returns the replica count and the memory to keep. `reclaim()` arbitrates
scarce GPUs across models, and `victims()` names the pods a scale-down removes.
Nothing here talks to Kubernetes: the operator (handlers.py) and the simulator
(bench/autoscale_sim.py) run this same code, and every rule is unit-tested
(tests/operator/test_scaling.py).

Rules of `decide()`, in order:

1. ``scaling.mode``: Fixed runs minReplicas (== maxReplicas); External leaves the
   count to an HPA or KEDA (the decision is the current count, never written).
2. ``spec.replicas`` (the scale subresource) pins the count, clamped to maxReplicas.
3. An unknown queue (gateway unreachable) never scales down: only minReplicas.
4. Target from work, not counts: the queued GPU-seconds (steps x megapixels x the
   model's cost per step-megapixel) over ``targetDrainSeconds``, at least one worker
   while jobs wait, at most one per ``jobsPerReplica`` jobs, within min/max.
5. Scale up at once, at most ``scaleUpLimit`` per decision, unless
   - pods are already waiting for capacity (no GPU, quota, gate): more pods would only
     wait too, so the count holds (``capacity_blocked``), or
   - the cold start does not pay back: the current workers drain the queue before a
     new one could load (``coldStartSeconds``, measured when known).
6. Pods that wait for capacity are dropped as soon as the demand for them is gone,
   without the idle window: they never ran, and would take the next free GPU.
7. Scale down only after the idle window (``idleSeconds``, unset: the cold start
   / (e - 1), see Scaling.idle_window) since the queue last needed every replica,
   and for zero since the last job; at most ``scaleDownLimit``
   replicas per ``scaleDownPeriodSeconds`` (like the HPA's behavior policies), never
   below the busy workers, never below minReplicas.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum

from remotegpu_base.catalog import ImageModelSpec, Scaling, ScalingMode
from remotegpu_base.protocol import ModelQueue

ScaleDowns = tuple[tuple[datetime, int], ...]  # (when, how many replicas were removed)


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
    unschedulable: int = 0  # pods waiting for capacity (no GPU, quota, scheduling gate)
    last_active: datetime | None = None  # last time the queue had any job
    last_saturated: datetime | None = None  # last time the queue needed every current replica
    # The previous observation still had work (and needed every replica): the work ended
    # between then and now, so the idle window starts now, not at that earlier look.
    was_active: bool = False
    was_saturated: bool = False
    scale_downs: ScaleDowns = ()  # recent scale-downs, for the rate limit
    # GPU-seconds of the queued and warming jobs; None: estimated from the job count.
    work_seconds: float | None = None
    job_seconds: float = 7.0  # GPU-seconds of one job of the model's default size
    cold_start_seconds: float | None = None  # measured worker load time; None: the spec's estimate
    ready: int | None = None  # workers ready to run jobs; None: all current ones


@dataclass(frozen=True)
class Decision:
    desired: int
    target: int  # what the work asks for, before limits and the idle window
    reason: str  # a CamelCase reason for Events and metrics
    message: str
    last_active: datetime | None
    last_saturated: datetime | None
    capacity_blocked: bool = False
    scale_downs: ScaleDowns = ()
    write: bool = True  # False in External mode: the replica count is someone else's

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


def job_seconds(spec: ImageModelSpec) -> float:
    """GPU-seconds of one job at the model's default steps and size (the catalog's estimate)."""
    return spec.parameters.default_step_megapixels() * spec.scaling.seconds_per_step_megapixel


def busy_workers(queue: ModelQueue) -> int:
    """Workers running a job: one per running job (a worker runs one job at a time)."""
    return max(queue.running, len(queue.busy_workers))


def queued_work(obs: Observation, q: ModelQueue) -> float:
    """GPU-seconds of the queued and warming jobs: measured, else priced from their steps and
    sizes, else the default job's cost times their number."""
    if obs.work_seconds is not None:
        return obs.work_seconds
    if q.queued_step_megapixels is not None:
        return q.queued_step_megapixels * obs.scaling.seconds_per_step_megapixel
    return (q.queued + q.warming) * obs.job_seconds


def work_target(obs: Observation) -> int:
    """Workers the queued work asks for, before min/max."""
    q = obs.queue
    if q is None or q.depth == 0:
        return 0
    s = obs.scaling
    # Running jobs are about half done, on average.
    work = queued_work(obs, q) + busy_workers(q) * obs.job_seconds / 2
    drain = max(1, math.ceil(work / s.target_drain_seconds - 1e-9))
    return min(drain, replicas_for(q.depth, s.jobs_per_replica))


def _idle_for(now: datetime, since: datetime | None) -> float:
    """Seconds since `since`; a model never seen active counts as idle forever."""
    if since is None:
        return math.inf
    return (now - since).total_seconds()


def _describe(queue: ModelQueue) -> str:
    return (
        f"queue depth {queue.depth} (queued {queue.queued}, warming {queue.warming}, running {queue.running})"
    )


def removed_recently(scale_downs: ScaleDowns, now: datetime, period: float) -> int:
    return sum(n for t, n in scale_downs if (now - t).total_seconds() < period)


def _recent(scale_downs: ScaleDowns, now: datetime, period: float) -> ScaleDowns:
    return tuple((t, n) for t, n in scale_downs if (now - t).total_seconds() < period)


def decide(obs: Observation, now: datetime) -> Decision:
    s = obs.scaling
    current = obs.current
    recent = _recent(obs.scale_downs, now, s.scale_down_period_seconds)
    base = Decision(current, current, "", "", obs.last_active, obs.last_saturated, scale_downs=recent)

    if s.mode is ScalingMode.EXTERNAL:
        return replace(
            base,
            reason="External",
            message=f"scaling.mode External: an HPA or KEDA owns the worker count ({current})",
            write=False,
        )
    if s.mode is ScalingMode.FIXED:
        return replace(
            base,
            desired=s.min_replicas,
            target=s.min_replicas,
            reason="Fixed",
            message=f"scaling.mode Fixed: {s.min_replicas} replicas",
        )
    if obs.pinned is not None:
        pin = min(obs.pinned, s.max_replicas)
        message = f"spec.replicas pins {obs.pinned} replicas"
        if pin < obs.pinned:
            message += f", capped at maxReplicas {s.max_replicas}"
        return replace(base, desired=pin, target=pin, reason="Pinned", message=message)
    if obs.queue is None:
        # Without a queue reading nothing may be scaled down; the floor still holds.
        desired = max(current, s.min_replicas)
        return replace(
            base,
            desired=desired,
            target=desired,
            reason="QueueUnknown",
            message="queue depth unknown (gateway unreachable); holding replicas",
        )
    return _from_queue(obs, obs.queue, now, base)


def _from_queue(obs: Observation, q: ModelQueue, now: datetime, base: Decision) -> Decision:
    s = obs.scaling
    current = obs.current
    depth = q.depth
    target = clamp(work_target(obs), s.min_replicas, s.max_replicas)
    last_active, last_saturated = obs.last_active, obs.last_saturated
    if depth > 0:
        last_active = now
        if max(target, busy_workers(q)) >= current:
            last_saturated = now
    else:
        if obs.was_active:
            last_active = now
        if obs.was_saturated:
            last_saturated = now
    base = replace(base, target=target, last_active=last_active, last_saturated=last_saturated)
    what = _describe(q)

    if target > current:
        return _scale_up(obs, q, target, base, what)

    busy = min(busy_workers(q), current)
    floor = max(target, busy, s.min_replicas)
    if obs.unschedulable > 0 and floor < current:
        # Pods waiting for capacity that nothing needs any more: drop them now.
        desired = max(floor, current - obs.unschedulable)
        return replace(
            base,
            desired=desired,
            reason="PendingDropped",
            message=f"{what}: {current - desired} waiting pod(s) no longer needed; {current} -> {desired}",
        )
    if target < current:
        return _scale_down(obs, now, base, floor, busy, what)
    return replace(base, reason="Steady", message=f"{what}: {current} replicas")


def _scale_up(obs: Observation, q: ModelQueue, target: int, base: Decision, what: str) -> Decision:
    s = obs.scaling
    current = obs.current
    if obs.unschedulable > 0:
        # Hold, but never below the floor: minReplicas, and one worker when jobs wait.
        held = max(current, min(target, max(s.min_replicas, 1)))
        return replace(
            base,
            desired=held,
            reason="CapacityBlocked",
            message=f"{what} asks for {target} replicas but {obs.unschedulable} pod(s) cannot be "
            f"scheduled (no free GPU, quota or gate); holding at {held}",
            capacity_blocked=True,
        )
    cold = obs.cold_start_seconds if obs.cold_start_seconds is not None else s.cold_start_seconds
    ready = current if obs.ready is None else min(obs.ready, current)
    if ready >= 1:
        # Workers still loading are not counted: they drain nothing until they are ready.
        drain = queued_work(obs, q) / ready
        if drain <= cold:
            return replace(
                base,
                reason="ColdStartPayback",
                message=f"{what}: {ready} ready replicas drain the queue in {drain:.0f}s, before a new "
                f"worker could load ({cold:.0f}s); holding",
            )
    desired = min(target, current + s.scale_up_limit)
    return replace(
        base,
        desired=desired,
        reason="ScaledUp",
        message=f"{what}: scaling up {current} -> {desired} (target {target})",
    )


def _scale_down(
    obs: Observation, now: datetime, base: Decision, floor: int, busy: int, what: str
) -> Decision:
    s = obs.scaling
    current = obs.current
    if current > s.max_replicas:
        # maxReplicas was lowered: shed the excess now (still sparing busy workers).
        desired = max(s.max_replicas, busy, current - s.scale_down_limit)
        return replace(
            base,
            desired=desired,
            reason="ScaledDown",
            message=f"maxReplicas is {s.max_replicas}: scaling down {current} -> {desired}",
            scale_downs=(*base.scale_downs, (now, current - desired))
            if desired < current
            else base.scale_downs,
        )
    if floor >= current:
        return replace(
            base, reason="IdleWindow", message=f"{what}: every one of {current} replicas is busy; holding"
        )
    idle = _idle_for(now, base.last_saturated)
    if floor == 0:
        idle = min(idle, _idle_for(now, base.last_active))
    window = s.idle_window(obs.cold_start_seconds)
    if idle < window:
        # An absolute time, not a countdown: the message (a status condition) stays put.
        at = now + timedelta(seconds=max(0.0, window - idle))
        return replace(
            base,
            reason="IdleWindow",
            message=f"{what}: {current} replicas, target {base.target}; scaling down at "
            f"{at:%H:%M:%S} UTC if it stays low ({window:.0f}s idle window)",
        )
    allowance = s.scale_down_limit - removed_recently(base.scale_downs, now, s.scale_down_period_seconds)
    if allowance <= 0:
        at = min(t for t, _ in base.scale_downs) + timedelta(seconds=s.scale_down_period_seconds)
        return replace(
            base,
            reason="ScaleDownRateLimited",
            message=f"{what}: removed {s.scale_down_limit} replica(s) in the last "
            f"{s.scale_down_period_seconds}s; next scale-down at {at:%H:%M:%S} UTC",
        )
    desired = max(floor, current - allowance)
    return replace(
        base,
        desired=desired,
        reason="ScaledToZero" if desired == 0 else "ScaledDown",
        message=f"{what}, idle {idle:.0f}s: scaling down {current} -> {desired}",
        scale_downs=(*base.scale_downs, (now, current - desired)),
    )


# -- which pods a scale-down removes --------------------------------------------------


@dataclass(frozen=True)
class Worker:
    """One worker pod as the decisions see it."""

    name: str
    scheduled: bool = True
    ready: bool = True
    busy: bool = False
    started: datetime | None = None  # creation time


def victims(workers: Sequence[Worker], n: int) -> list[str]:
    """The `n` pods to remove: unscheduled first, then not ready, then idle ones (newest first).

    Busy workers are named only when nothing else is left (a lowered maxReplicas).
    """

    def order(w: Worker) -> tuple[int, int, int, float]:
        newest_first = -(w.started.timestamp() if w.started else math.inf)
        return (int(w.busy), int(w.scheduled), int(w.ready), newest_first)

    return [w.name for w in sorted(workers, key=order)[: max(0, n)]]


# -- scarce GPUs across models --------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One model's standing in the competition for GPUs."""

    model: str
    priority: int = 0
    work_seconds: float = 0.0  # queued GPU-seconds
    waiting_pods: int = 0  # pods waiting for a GPU
    gpus_per_worker: int = 1
    idle: tuple[Worker, ...] = ()  # ready workers with no job
    workers: int = 0  # all of its workers that hold a GPU
    min_residency_seconds: float = 120.0


@dataclass(frozen=True)
class Reclaim:
    donor: str
    beneficiary: str
    pods: tuple[str, ...]


@dataclass
class Arbitration:
    reclaims: list[Reclaim] = field(default_factory=list)
    # model -> the models holding the GPUs it waits for (for its condition message)
    holders: dict[str, list[str]] = field(default_factory=dict)

    def released_by(self, model: str) -> list[str]:
        return [p for r in self.reclaims if r.donor == model for p in r.pods]


def _outranks(claimant: Claim, donor: Claim) -> bool:
    """A donor gives up idle workers to a higher priority, or at equal priority when it has no work."""
    if claimant.priority != donor.priority:
        return claimant.priority > donor.priority
    return donor.work_seconds == 0 and claimant.work_seconds > 0


def reclaim(claims: Iterable[Claim], now: datetime) -> Arbitration:
    """Idle workers (never busy ones) of some models, released for models whose pods wait for a GPU.

    Claimants go by priority, then by queued work; donors give their idle workers
    that have run at least minResidencySeconds, lowest priority and least work first.
    """
    claims = list(claims)
    out = Arbitration()
    taken: set[str] = set()
    claimants = sorted(
        (c for c in claims if c.waiting_pods > 0 and c.work_seconds > 0),
        key=lambda c: (-c.priority, -c.work_seconds, c.model),
    )
    for c in claimants:
        out.holders[c.model] = sorted(d.model for d in claims if d.model != c.model and d.workers > 0)
        need = c.waiting_pods * c.gpus_per_worker
        donors = sorted(
            (d for d in claims if d.model != c.model and _outranks(c, d)),
            key=lambda d: (d.priority, d.work_seconds, d.model),
        )
        for d in donors:
            if need <= 0:
                break
            pods = []
            for w in victims([w for w in d.idle if w.name not in taken and not w.busy], len(d.idle)):
                worker = next(x for x in d.idle if x.name == w)
                age = math.inf if worker.started is None else (now - worker.started).total_seconds()
                if age < d.min_residency_seconds:
                    continue
                pods.append(w)
                taken.add(w)
                need -= d.gpus_per_worker
                if need <= 0:
                    break
            if pods:
                out.reclaims.append(Reclaim(d.model, c.model, tuple(pods)))
    return out
