"""kopf handlers for ImageModel: the worker Deployment, the autoscaler daemon, status.

- create / update / resume: reconcile the worker Deployment (deployment.py), then
  wake the model's daemon so a changed pin or scaling setting applies at once.
- delete: nothing to do by hand. The Deployment carries a controller owner
  reference, so the garbage collector removes it (and its pods) with the
  ImageModel; kopf's finalizer only makes sure the daemon has stopped first.
- one daemon per ImageModel: every `interval` seconds, or at once when the queue
  watcher (queuewatch.py) reports a change of its model's queue, it reads the
  Deployment and its pods, asks scaling.decide(), writes the replica count,
  marks idle and busy pods with pod-deletion-cost, and writes the status
  (status.py) and metrics. Every replica change and every failure is a
  Kubernetes Event on the ImageModel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError
from remotegpu_base.catalog import API_GROUP, API_VERSION, KIND, PLURAL, ImageModelSpec
from remotegpu_base.protocol import ModelQueue

from remotegpu_operator import deployment, metrics, scaling, status
from remotegpu_operator.kubeapi import (
    ApiError,
    KubeAPI,
    connection_info,
    deployments,
    imagemodel_status,
    pods,
)
from remotegpu_operator.queuewatch import QueueWatcher

log = logging.getLogger(__name__)

BUSY_COST = "1000"  # busy workers are the last a scale-down takes
IDLE_COST = "0"


@dataclass
class Context:
    api: KubeAPI
    worker: deployment.WorkerSettings
    queue: QueueWatcher
    interval: float = 2.0


_ctx: Context | None = None
_wakers: dict[tuple[str, str], Any] = {}


def configure(ctx: Context) -> None:
    global _ctx
    _ctx = ctx


def ctx() -> Context:
    if _ctx is None:
        raise RuntimeError("remotegpu_operator.handlers.configure() was not called")
    return _ctx


def wake(ns: str, name: str) -> None:
    waker = _wakers.get((ns, name))
    if waker is not None:
        waker()


def _event(body: Any, reason: str, message: str, warning: bool = False) -> None:
    # kopf.event is not filtered by settings.posting.level (which keeps kopf's own chatter out).
    kopf.event(body, type="Warning" if warning else "Normal", reason=reason, message=message[:1024])


def _spec(body: Any) -> ImageModelSpec:
    try:
        return ImageModelSpec.model_validate(dict(body["spec"]))
    except ValidationError as e:
        raise kopf.PermanentError(f"invalid spec: {e}") from e


def _initial_replicas(spec: ImageModelSpec) -> int:
    return spec.replicas if spec.replicas is not None else spec.scaling.min_replicas


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    return connection_info()


# -- the Deployment -------------------------------------------------------------------


async def ensure_deployment(body: Any, existing: dict[str, Any] | None, replicas: int) -> dict[str, Any]:
    """Creates or updates the worker Deployment; writes nothing when it is already right.

    `existing` is the live Deployment (or None). A new Deployment starts with
    `replicas`; an existing one keeps its replica count (the daemon owns it).
    """
    c = ctx()
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    desired = deployment.build(body, c.worker, replicas)
    dname = desired["metadata"]["name"]
    for _attempt in range(5):
        if existing is None:
            try:
                created = await c.api.create(deployments(ns), desired)
            except ApiError as e:
                if e.status != 409:
                    raise
                existing = await c.api.get(deployments(ns, dname))
                continue
            _event(body, "DeploymentCreated", f"created Deployment {dname} with {replicas} replicas")
            return created
        _check_ownership(existing, body)
        problems = deployment.differs(existing, desired)
        if not problems:
            return existing
        try:
            updated = await c.api.replace(deployments(ns, dname), deployment.merged(existing, desired))
        except ApiError as e:
            if e.status != 409:
                raise
            existing = await c.api.get(deployments(ns, dname))
            continue
        _event(body, "DeploymentUpdated", f"updated Deployment {dname}: {', '.join(problems)}")
        log.info("%s/%s: updated Deployment %s (%s)", ns, name, dname, ", ".join(problems))
        return updated
    raise kopf.TemporaryError(f"Deployment {dname} kept changing under us", delay=2)


def _check_ownership(existing: dict[str, Any], body: Any) -> None:
    """Refuses to take over a Deployment of the same name that something else controls."""
    refs = existing["metadata"].get("ownerReferences") or []
    controller = next((r for r in refs if r.get("controller")), None)
    name = body["metadata"]["name"]
    if controller is None:
        managed = (existing["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by")
        if managed != deployment.MANAGED_BY:
            raise kopf.PermanentError(
                f"Deployment {existing['metadata']['name']} exists and is not managed by "
                "the RemoteGPU operator; delete or rename it"
            )
        return
    # Our own, or one left by an earlier ImageModel of the same name (adopted).
    if controller.get("kind") != KIND or controller.get("name") != name:
        raise kopf.PermanentError(
            f"Deployment {existing['metadata']['name']} is controlled by "
            f"{controller.get('kind')}/{controller.get('name')}"
        )


async def _reconcile(body: Any, logger: Any) -> None:
    spec = _spec(body)
    c = ctx()
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    try:
        existing = await c.api.get(deployments(ns, deployment.deployment_name(name)))
        await ensure_deployment(body, existing, _initial_replicas(spec))
    except ApiError as e:
        metrics.RECONCILE_ERRORS.labels(ns, name).inc()
        _event(body, "ReconcileFailed", f"reconciling the worker Deployment failed: {e}", warning=True)
        raise kopf.TemporaryError(str(e), delay=5) from e
    wake(ns, name)


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL, backoff=5)
async def resumed(body: Any, logger: Any, **_: Any) -> None:
    await _reconcile(body, logger)


@kopf.on.create(API_GROUP, API_VERSION, PLURAL, backoff=5)
async def created(body: Any, logger: Any, **_: Any) -> None:
    await _reconcile(body, logger)


@kopf.on.update(API_GROUP, API_VERSION, PLURAL, backoff=5)
async def updated(body: Any, logger: Any, **_: Any) -> None:
    await _reconcile(body, logger)


# -- the autoscaler daemon ------------------------------------------------------------


@dataclass
class Memory:
    """What one daemon remembers between ticks (seeded from status, so it survives restarts)."""

    last_active: datetime | None = None
    last_saturated: datetime | None = None
    last_scale: datetime | None = None
    last_status: dict[str, Any] = field(default_factory=dict)
    capacity_blocked: bool = False
    queue_known: bool = True
    was_active: bool = False
    was_saturated: bool = False
    last_error: str = ""
    last_error_at: float = 0.0

    def should_report(self, error: str, every: float = 60.0) -> bool:
        """One Event per distinct failure, repeated at most every `every` seconds."""
        now = time.monotonic()
        if error != self.last_error or now - self.last_error_at > every:
            self.last_error, self.last_error_at = error, now
            return True
        return False

    @classmethod
    def from_status(cls, st: dict[str, Any] | None) -> Memory:
        st = dict(st or {})
        conditions = {c.get("type"): c for c in st.get("conditions") or []}
        cap = conditions.get("CapacityAvailable")
        return cls(
            last_active=status.parse_time(st.get("lastActiveTime")),
            last_saturated=status.parse_time(st.get("lastSaturatedTime")),
            last_scale=status.parse_time(st.get("lastScaleTime")),
            last_status=st,
            capacity_blocked=bool(cap and cap.get("status") == "False"),
        )


async def _set_deletion_costs(ns: str, pod_list: list[dict[str, Any]], queue: ModelQueue) -> None:
    """Busy workers get a high pod-deletion-cost, idle ones the default, so scale-down takes idle pods."""
    c = ctx()
    busy = set(queue.busy_workers)
    for pod in pod_list:
        pmeta = pod["metadata"]
        if pmeta.get("deletionTimestamp"):
            continue
        want = BUSY_COST if pmeta["name"] in busy else IDLE_COST
        have = (pmeta.get("annotations") or {}).get(deployment.DELETION_COST, IDLE_COST)
        if have != want:
            try:
                await c.api.patch(
                    pods(ns, pmeta["name"]), {"metadata": {"annotations": {deployment.DELETION_COST: want}}}
                )
            except ApiError as e:
                if e.status != 404:  # a pod that just went away
                    raise


async def tick(body: Any, mem: Memory) -> None:
    """One autoscaling decision for one ImageModel."""
    c = ctx()
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    spec = _spec(body)
    dname = deployment.deployment_name(name)
    selector = deployment.selector_string(name)

    dep = await c.api.get(deployments(ns, dname))
    queue = c.queue.get(spec.model) if c.queue.available else None
    pod_list: list[dict[str, Any]] = []
    if dep is not None and (dep["spec"].get("replicas") or dep.get("status", {}).get("replicas")):
        pod_list = ((await c.api.get(pods(ns), labelSelector=selector)) or {}).get("items", [])
    unschedulable = status.unschedulable_pods(pod_list)
    now = datetime.now(UTC)

    dep = await ensure_deployment(body, dep, _initial_replicas(spec))
    current = int(dep["spec"].get("replicas", 0))
    decision = scaling.decide(
        scaling.Observation(
            scaling=spec.scaling,
            pinned=spec.replicas,
            queue=queue,
            current=current,
            unschedulable=len(unschedulable),
            last_active=mem.last_active,
            last_saturated=mem.last_saturated,
            was_active=mem.was_active,
            was_saturated=mem.was_saturated,
        ),
        now,
    )
    mem.last_active, mem.last_saturated = decision.last_active, decision.last_saturated
    if queue is not None:
        mem.was_active = queue.depth > 0
        mem.was_saturated = queue.depth > 0 and decision.last_saturated == now
    direction = decision.direction_from(current)
    labels = (ns, name, spec.model)

    if queue is not None and pod_list and direction is not scaling.Direction.UP:
        await _set_deletion_costs(ns, pod_list, queue)
    if direction is not scaling.Direction.NONE:
        await c.api.patch(deployments(ns, dname), {"spec": {"replicas": decision.desired}})
        mem.last_scale = now
        changed_at = c.queue.changed_at.get(spec.model)
        if direction is scaling.Direction.UP and changed_at is not None:
            metrics.WAKE_LATENCY.labels(*labels).set(time.monotonic() - changed_at)
        metrics.SCALE_DECISIONS.labels(*labels, direction.value, decision.reason).inc()
        _event(
            body, decision.reason, f"{dname}: {current} -> {decision.desired} replicas: {decision.message}"
        )
        log.info("%s/%s: %s -> %s (%s)", ns, name, current, decision.desired, decision.message)

    if decision.capacity_blocked or unschedulable:
        if not mem.capacity_blocked:
            first = unschedulable[0].message if unschedulable else decision.message
            _event(
                body,
                status.capacity_reason(first, spec.worker.gpu.resource_name),
                f"worker pods cannot be scheduled, not adding replicas: {first}",
                warning=True,
            )
        mem.capacity_blocked = True
    elif mem.capacity_blocked:
        mem.capacity_blocked = False
        _event(body, "CapacityAvailable", "every wanted worker pod is scheduled again")

    unknown = c.queue.why_unknown() if queue is None else None
    if (unknown is not None and unknown[0] == "GatewayUnreachable") == mem.queue_known:
        mem.queue_known = not mem.queue_known
        if not mem.queue_known:
            _event(
                body,
                "GatewayUnreachable",
                "cannot read the gateway's queue depth; holding replicas",
                warning=True,
            )

    dstatus = dep.get("status") or {}
    observed = status.Observed(
        generation=int(meta.get("generation") or 0),
        deployment=dname,
        selector=selector,
        desired=decision.desired,
        replicas=int(dstatus.get("replicas") or 0),
        ready=int(dstatus.get("readyReplicas") or 0) if decision.desired > 0 else 0,
        queue=queue,
        unschedulable=unschedulable,
        gpu_resource=spec.worker.gpu.resource_name,
        last_active=mem.last_active,
        last_saturated=mem.last_saturated,
        last_scale=mem.last_scale,
        queue_unknown=unknown or ("", ""),
    )
    new_status = status.compute(observed, mem.last_status.get("conditions"), now)
    patch = status.changed(mem.last_status, new_status)
    if patch:
        await c.api.patch(imagemodel_status(ns, name), {"status": patch})
        mem.last_status = {**mem.last_status, **new_status}
    state = status.runtime_state(observed.desired, observed.ready)
    metrics.set_model(
        ns,
        name,
        spec.model,
        desired=decision.desired,
        replicas=observed.replicas,
        ready=observed.ready,
        depth=queue.depth if queue else None,
        state=state,
        capacity_ok=not unschedulable,
    )


@kopf.daemon(API_GROUP, API_VERSION, PLURAL, id="autoscaler", cancellation_timeout=5.0)
async def autoscaler(body: Any, stopped: Any, logger: Any, **_: Any) -> None:
    c = ctx()
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()
    key = id(woken)

    def waker() -> None:
        loop.call_soon_threadsafe(woken.set)

    async def until_stopped() -> None:
        await stopped.wait()

    stop_task = asyncio.ensure_future(until_stopped())
    mem = Memory.from_status(body.get("status"))
    _wakers[(ns, name)] = waker
    model: str | None = None
    try:
        while not stopped:
            current_model = body["spec"].get("model")
            if current_model != model:
                if model is not None:
                    c.queue.unregister(model, key)
                    metrics.forget_model(ns, name, model)
                model = current_model
                if model:
                    c.queue.register(model, key, waker)
            woken.clear()
            try:
                await tick(body, mem)
                mem.last_error = ""
            except Exception as e:  # never let one bad tick kill the daemon; report it
                metrics.RECONCILE_ERRORS.labels(ns, name).inc()
                known = isinstance(e, ApiError | kopf.PermanentError | kopf.TemporaryError | OSError)
                message = str(e) if known else f"{type(e).__name__}: {e}"
                if known:
                    logger.error("reconcile failed: %s", e)
                else:
                    logger.exception("reconcile failed")
                if mem.should_report(message):
                    _event(body, "ReconcileFailed", message, warning=True)
            wake_task = asyncio.ensure_future(woken.wait())
            await asyncio.wait(
                {wake_task, stop_task}, timeout=c.interval, return_when=asyncio.FIRST_COMPLETED
            )
            wake_task.cancel()
    finally:
        stop_task.cancel()
        if model:
            c.queue.unregister(model, key)
            metrics.forget_model(ns, name, model)
        if _wakers.get((ns, name)) is waker:
            del _wakers[(ns, name)]
