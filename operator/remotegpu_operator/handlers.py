"""kopf handlers for ImageModel: the worker Deployment, the autoscaler loop, status.

- create / update / resume: reconcile the worker Deployment (deployment.py), then
  wake the model so a changed pin or scaling setting applies at once.
- every event keeps the registry of ImageModels the autoscaler serves; deletion
  needs nothing by hand: the Deployment carries a controller owner reference, so
  the garbage collector removes it (and its pods) with the ImageModel. No handler
  needs a finalizer, so an ImageModel never hangs in Terminating without the operator.
- one autoscaler loop for all models (GPUs are shared across them): every
  `interval` seconds, or at once for a model whose queue changed (queuewatch.py),
  each model's tick runs four steps, each testable on its own:
  observe (the Deployment, its pods, the queue) -> decide (scaling.py, pure, with
  the GPU arbitration across models) -> act (replicas, named victims) -> report
  (status.py, metrics, rate-limited Events).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError
from remotegpu_base import kube
from remotegpu_base.catalog import API_GROUP, API_VERSION, KIND, PLURAL, ImageModelSpec, ScalingMode
from remotegpu_base.kube import Deployment, ImageModelObject, Pod
from remotegpu_base.protocol import ModelQueue, WorkerPhases

from remotegpu_operator import cachectl, coldstart, deployment, metrics, scaling, status
from remotegpu_operator.queuewatch import QueueWatcher

log = logging.getLogger(__name__)

BUSY_COST = "1000"  # busy workers are the last a scale-down takes
IDLE_COST = "0"
VICTIM_COST = "-1000"  # the pods a scale-down decision named go first


@dataclass
class Context:
    api: kube.Api
    worker: deployment.WorkerSettings
    queue: QueueWatcher
    interval: float = 2.0
    namespaces: list[str] = field(default_factory=list)  # served; [] for all
    sweep_interval: float = 60.0  # how often caches no ImageModel owns are looked for
    models: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # live ImageModels
    memory: dict[tuple[str, str], Memory] = field(default_factory=dict)
    claims: dict[tuple[str, str], scaling.Claim] = field(default_factory=dict)  # the GPU board


_ctx: Context | None = None
_woken: set[tuple[str, str]] = set()
_loop_task: asyncio.Task[None] | None = None
_wake_all: asyncio.Event | None = None


def configure(ctx: Context) -> None:
    global _ctx
    _ctx = ctx


def ctx() -> Context:
    if _ctx is None:
        raise RuntimeError("remotegpu_operator.handlers.configure() was not called")
    return _ctx


def wake(ns: str, name: str) -> None:
    """Runs the model's tick now rather than at the next interval."""
    _woken.add((ns, name))
    if _wake_all is not None:
        _wake_all.set()


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
async def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf acts as the same identity as the operator's own client: kr8s reads the credentials
    (again: kopf asks after a 401, when a rotated token needs reading)."""
    auth = ctx().api.auth
    await auth.reauthenticate()

    def path(p: Any) -> str | None:
        return str(p) if p else None

    return kopf.ConnectionInfo(
        server=auth.server,
        token=auth.token,
        ca_path=path(auth.server_ca_file),
        certificate_path=path(auth.client_cert_file),
        private_key_path=path(auth.client_key_file),
        insecure=auth._insecure_skip_tls_verify,  # kr8s keeps it private
    )


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
                created = await kube.create(c.api, Deployment, desired)
            except kube.ServerError as e:
                if kube.status_of(e) != 409:
                    raise
                existing = await kube.get(c.api, Deployment, ns, dname)
                continue
            _event(body, "DeploymentCreated", f"created Deployment {dname} with {replicas} replicas")
            return created
        _check_ownership(existing, body)
        problems = deployment.differs(existing, desired)
        if not problems:
            return existing
        try:
            updated = await kube.replace(c.api, Deployment, deployment.merged(existing, desired))
        except kube.ServerError as e:
            if kube.status_of(e) != 409:
                raise
            existing = await kube.get(c.api, Deployment, ns, dname)
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
        existing = await kube.get(c.api, Deployment, ns, deployment.deployment_name(name))
        await ensure_deployment(body, existing, _initial_replicas(spec))
    except kube.ERRORS as e:
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


# -- the registry of ImageModels ------------------------------------------------------


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
async def registry(type: str, body: Any, **_: Any) -> None:
    """Keeps the autoscaler's view of the live ImageModels (no finalizer needed)."""
    global _loop_task
    if _loop_task is None:
        # Started from a handler, so the loop inherits kopf's context and kopf.event() works in it.
        _loop_task = asyncio.create_task(autoscale_forever())
    c = ctx()
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    if type == "DELETED" or meta.get("deletionTimestamp"):
        _forget(key)
        if type == "DELETED":
            others = [m for (ns, _), m in c.models.items() if ns == key[0]]
            task = asyncio.create_task(cachectl.collect_garbage(c.api, copy.deepcopy(dict(body)), others))
            _background.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(_done)
        return
    old = c.models.get(key)
    c.models[key] = copy.deepcopy(dict(body))
    model = (body.get("spec") or {}).get("model")
    if old is None or (old.get("spec") or {}).get("model") != model:
        if old is not None:
            _unregister(key, old)
        if model:
            loop = asyncio.get_running_loop()

            def waker() -> None:  # called from the queue watcher's thread
                loop.call_soon_threadsafe(wake, *key)

            c.queue.register(model, _key_id(key), waker)
    wake(*key)


_background: set[asyncio.Task[None]] = set()


def _done(task: asyncio.Task[None]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("model cache clean-up failed", exc_info=task.exception())


def _key_id(key: tuple[str, str]) -> int:
    return hash(key)


def _unregister(key: tuple[str, str], body: dict[str, Any]) -> None:
    c = ctx()
    model = (body.get("spec") or {}).get("model")
    if model:
        c.queue.unregister(model, _key_id(key))
        metrics.forget_model(key[0], key[1], model)


def _forget(key: tuple[str, str]) -> None:
    c = ctx()
    old = c.models.pop(key, None)
    if old is not None:
        _unregister(key, old)
    c.memory.pop(key, None)
    c.claims.pop(key, None)


def duplicate_of(key: tuple[str, str], models: dict[tuple[str, str], dict[str, Any]]) -> str | None:
    """The older ImageModel in the namespace serving the same spec.model, if any (it wins)."""
    me = models[key]
    mine = ((me["metadata"].get("creationTimestamp") or ""), key[1])
    for (ns, name), other in models.items():
        if ns != key[0] or name == key[1] or other["spec"].get("model") != me["spec"].get("model"):
            continue
        if ((other["metadata"].get("creationTimestamp") or ""), name) < mine:
            return name
    return None


# -- the autoscaler: observe -> decide -> act -> report, per model ---------------------


@dataclass
class Memory:
    """What the autoscaler remembers of one model between ticks (seeded from its status)."""

    last_active: datetime | None = None
    last_saturated: datetime | None = None
    last_scale: datetime | None = None
    last_status: dict[str, Any] = field(default_factory=dict)
    capacity_blocked: bool = False
    queue_known: bool = True
    was_active: bool = False
    was_saturated: bool = False
    scale_downs: scaling.ScaleDowns = ()
    cold_start_seconds: float | None = None  # measured: pod created -> ready
    last_scale_up: datetime | None = None  # the decision behind the pods it created (timelines)
    phases_reported: set[str] = field(default_factory=set)  # pods whose phases the gateway has
    # A pre-warm DaemonSet may exist (true after a start: checked once, then while wanted).
    may_prewarm: bool = True
    cache_indexed: str | None = None  # the model's entry in the cache index, as last written
    events: dict[str, tuple[str, float]] = field(default_factory=dict)  # reason -> (message, when)

    def should_report(self, reason: str, message: str, every: float = 60.0) -> bool:
        """One Event per distinct (reason, message), repeated at most every `every` seconds."""
        now = time.monotonic()
        last = self.events.get(reason)
        if last is None or last[0] != message or now - last[1] > every:
            self.events[reason] = (message, now)
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


@dataclass
class Seen:
    """Everything one tick observed about one model."""

    body: dict[str, Any]
    spec: ImageModelSpec
    dep: dict[str, Any]
    queue: ModelQueue | None
    pods: list[dict[str, Any]]
    unschedulable: list[status.Unschedulable]
    failing: list[status.Failing]
    workers: list[scaling.Worker]
    now: datetime
    duplicate_of: str | None = None

    @property
    def ns(self) -> str:
        return str(self.body["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def current(self) -> int:
        return int(self.dep["spec"].get("replicas", 0))


@dataclass
class Plan:
    decision: scaling.Decision
    victims: list[str] = field(default_factory=list)
    holders: list[str] = field(default_factory=list)
    beneficiary: str = ""


def _time(value: str | None) -> datetime | None:
    return status.parse_time(value)


def worker_views(pod_list: list[dict[str, Any]], queue: ModelQueue | None) -> list[scaling.Worker]:
    busy = set(queue.busy_workers) if queue else set()
    out = []
    for pod in pod_list:
        meta, st = pod["metadata"], pod.get("status") or {}
        if meta.get("deletionTimestamp"):
            continue
        conds = {c.get("type"): c.get("status") for c in st.get("conditions") or []}
        out.append(
            scaling.Worker(
                name=meta["name"],
                scheduled=conds.get("PodScheduled") == "True",
                ready=conds.get("Ready") == "True",
                busy=meta["name"] in busy,
                started=_time(meta.get("creationTimestamp")),
            )
        )
    return out


def measured_cold_start(pod_list: list[dict[str, Any]]) -> float | None:
    """The longest pod-created-to-ready time among the ready workers (None: none ready yet)."""
    times = []
    for pod in pod_list:
        created = _time(pod["metadata"].get("creationTimestamp"))
        for c in (pod.get("status") or {}).get("conditions") or []:
            ready_at = _time(c.get("lastTransitionTime"))
            if c.get("type") == "Ready" and c.get("status") == "True" and created and ready_at:
                times.append((ready_at - created).total_seconds())
    return max(times) if times else None


async def observe(body: dict[str, Any]) -> Seen:
    """Reads the model's Deployment (creating or fixing it), its pods, and its queue."""
    c = ctx()
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    spec = _spec(body)
    dep = await kube.get(c.api, Deployment, ns, deployment.deployment_name(name))
    queue = c.queue.get(spec.model) if c.queue.available else None
    pod_list: list[dict[str, Any]] = []
    if dep is not None and (dep["spec"].get("replicas") or dep.get("status", {}).get("replicas")):
        selector = deployment.selector_string(name)
        pod_list = (await kube.list_of(c.api, Pod, ns, labelSelector=selector)).get("items") or []
    dep = await ensure_deployment(body, dep, _initial_replicas(spec))
    return Seen(
        body=body,
        spec=spec,
        dep=dep,
        queue=queue,
        pods=pod_list,
        unschedulable=status.unschedulable_pods(pod_list, spec.worker.gpu.resource_name, dep),
        failing=status.failing_pods(pod_list),
        workers=worker_views(pod_list, queue),
        now=datetime.now(UTC),
        duplicate_of=duplicate_of((ns, name), c.models) if (ns, name) in c.models else None,
    )


def claim(seen: Seen, decision: scaling.Decision) -> scaling.Claim:
    s = seen.spec.scaling
    q = seen.queue
    work = (q.queued + q.warming) * scaling.job_seconds(seen.spec) if q else 0.0
    return scaling.Claim(
        model=f"{seen.ns}/{seen.name}",
        priority=s.priority,
        work_seconds=work,
        waiting_pods=len(seen.unschedulable) if decision.capacity_blocked or seen.unschedulable else 0,
        gpus_per_worker=max(1, seen.spec.worker.gpu.count),
        idle=tuple(w for w in seen.workers if w.ready and not w.busy),
        workers=sum(1 for w in seen.workers if w.scheduled),
        min_residency_seconds=s.min_residency_seconds,
    )


def decide(seen: Seen, mem: Memory, claims: dict[tuple[str, str], scaling.Claim]) -> Plan:
    """The replica count, the pods to remove, and what the GPU arbitration says (pure)."""
    s = seen.spec.scaling
    obs = scaling.Observation(
        scaling=s,
        pinned=seen.spec.replicas,
        queue=seen.queue,
        current=seen.current,
        unschedulable=len(seen.unschedulable),
        last_active=mem.last_active,
        last_saturated=mem.last_saturated,
        was_active=mem.was_active,
        was_saturated=mem.was_saturated,
        scale_downs=mem.scale_downs,
        job_seconds=scaling.job_seconds(seen.spec),
        cold_start_seconds=mem.cold_start_seconds,
    )
    decision = scaling.decide(obs, seen.now)
    if seen.duplicate_of is not None:
        return Plan(
            replace(
                decision,
                desired=0 if decision.write else seen.current,
                reason="DuplicateModel",
                message=f"ImageModel {seen.duplicate_of} already serves {seen.spec.model}; "
                "delete one of them (this one is held at 0 replicas)",
            )
        )
    me = (seen.ns, seen.name)
    board = {**claims, me: claim(seen, decision)}
    arbitration = scaling.reclaim([c for (ns, _), c in board.items() if ns == seen.ns], seen.now)
    plan = Plan(decision, holders=[m.split("/", 1)[1] for m in arbitration.holders.get(board[me].model, [])])
    released = arbitration.released_by(board[me].model)
    if released and decision.write and s.mode is not ScalingMode.FIXED and seen.spec.replicas is None:
        desired = max(s.min_replicas, min(decision.desired, seen.current - len(released)))
        if desired < seen.current:
            beneficiary = next(r.beneficiary for r in arbitration.reclaims if r.donor == board[me].model)
            plan.decision = replace(
                decision,
                desired=desired,
                reason="Reclaimed",
                message=f"{seen.current - desired} idle worker(s) released for "
                f"{beneficiary.split('/', 1)[1]}, whose jobs wait for a GPU",
                scale_downs=(*decision.scale_downs, (seen.now, seen.current - desired)),
            )
            plan.beneficiary = beneficiary
            plan.victims = released[: seen.current - desired]
            return plan
    if plan.decision.direction_from(seen.current) is scaling.Direction.DOWN:
        plan.victims = scaling.victims(seen.workers, seen.current - plan.decision.desired)
    return plan


def remember(seen: Seen, plan: Plan, mem: Memory) -> None:
    d = plan.decision
    mem.last_active, mem.last_saturated = d.last_active, d.last_saturated
    mem.scale_downs = d.scale_downs
    if seen.queue is not None:
        mem.was_active = seen.queue.depth > 0
        mem.was_saturated = seen.queue.depth > 0 and d.last_saturated == seen.now
    measured = measured_cold_start(seen.pods)
    if measured is not None:
        mem.cold_start_seconds = measured


async def act(seen: Seen, plan: Plan, mem: Memory) -> None:
    """Marks the named victims and busy workers, then writes the replica count (never in External mode)."""
    c = ctx()
    d = plan.decision
    direction = d.direction_from(seen.current)
    if not d.write or direction is scaling.Direction.NONE:
        if seen.queue is not None and seen.pods:
            await _set_deletion_costs(seen.ns, seen.pods, seen.queue, [])
        return
    if direction is scaling.Direction.DOWN:
        await _set_deletion_costs(seen.ns, seen.pods, seen.queue, plan.victims)
    dname = seen.dep["metadata"]["name"]
    await kube.patch(c.api, Deployment, seen.ns, dname, {"spec": {"replicas": d.desired}})
    mem.last_scale = seen.now
    if direction is scaling.Direction.UP:
        mem.last_scale_up = seen.now
    labels = (seen.ns, seen.name, seen.spec.model)
    changed_at = c.queue.changed_at.get(seen.spec.model)
    if direction is scaling.Direction.UP and changed_at is not None:
        metrics.WAKE_LATENCY.labels(*labels).set(time.monotonic() - changed_at)
    metrics.SCALE_DECISIONS.labels(*labels, direction.value, d.reason).inc()
    victims = f" (removing {', '.join(plan.victims)})" if plan.victims else ""
    _event(seen.body, d.reason, f"{dname}: {seen.current} -> {d.desired} replicas{victims}: {d.message}")
    log.info("%s/%s: %s -> %s (%s)", seen.ns, seen.name, seen.current, d.desired, d.message)


async def _set_deletion_costs(
    ns: str, pod_list: list[dict[str, Any]], queue: ModelQueue | None, victims: list[str]
) -> None:
    """Named victims get the lowest pod-deletion-cost, busy workers the highest, so the
    ReplicaSet controller removes exactly the pods the decision named."""
    c = ctx()
    busy = set(queue.busy_workers) if queue else set()
    for pod in pod_list:
        pmeta = pod["metadata"]
        if pmeta.get("deletionTimestamp"):
            continue
        name = pmeta["name"]
        want = VICTIM_COST if name in victims else BUSY_COST if name in busy else IDLE_COST
        have = (pmeta.get("annotations") or {}).get(deployment.DELETION_COST, IDLE_COST)
        if have != want:
            try:
                await kube.patch(
                    c.api, Pod, ns, name, {"metadata": {"annotations": {deployment.DELETION_COST: want}}}
                )
            except kube.NotFoundError:  # a pod that just went away
                pass


def report_events(seen: Seen, plan: Plan, mem: Memory) -> None:
    """Warning Events for failures, one per distinct failure and at most one a minute."""
    c = ctx()
    if seen.unschedulable:
        first = seen.unschedulable[0]
        held = f"; the GPUs are held by {', '.join(plan.holders)}" if plan.holders else ""
        if mem.should_report(first.reason, first.message):
            _event(
                seen.body, first.reason, f"worker pods cannot be placed: {first.message}{held}", warning=True
            )
        mem.capacity_blocked = True
    elif mem.capacity_blocked:
        mem.capacity_blocked = False
        _event(seen.body, "CapacityAvailable", "every wanted worker pod is scheduled again")
    for f in seen.failing[:1]:
        if mem.should_report(f.reason, f.reason):
            _event(seen.body, f.reason, f"worker pod failing: {f.message}", warning=True)
    if plan.decision.reason == "DuplicateModel" and mem.should_report(
        "DuplicateModel", plan.decision.message
    ):
        _event(seen.body, "DuplicateModel", plan.decision.message, warning=True)
    unknown = c.queue.why_unknown() if seen.queue is None else None
    if (unknown is not None and unknown[0] == "GatewayUnreachable") == mem.queue_known:
        mem.queue_known = not mem.queue_known
        if not mem.queue_known:
            _event(
                seen.body,
                "GatewayUnreachable",
                "cannot read the gateway's queue depth; holding replicas",
                True,
            )


def _kept(key: str, value: datetime | None, mem: Memory, seen: Seen) -> datetime | None:
    written = status.parse_time(mem.last_status.get(key))
    busy = seen.queue is not None and seen.queue.depth > 0
    return written if busy and written is not None and value is not None and value >= written else value


async def report(seen: Seen, plan: Plan, mem: Memory) -> None:
    """Sets the metrics, then writes the status (only what changed): whoever reads a status
    finds the metrics at least as new."""
    c = ctx()
    report_events(seen, plan, mem)
    d = plan.decision
    desired = d.desired if d.write else seen.current
    dstatus = seen.dep.get("status") or {}
    unknown = c.queue.why_unknown() if seen.queue is None else ("", "")
    observed = status.Observed(
        generation=int(seen.body["metadata"].get("generation") or 0),
        deployment=seen.dep["metadata"]["name"],
        selector=deployment.selector_string(seen.name),
        desired=desired,
        replicas=int(dstatus.get("replicas") or 0),
        ready=int(dstatus.get("readyReplicas") or 0) if desired > 0 else 0,
        queue=seen.queue,
        unschedulable=seen.unschedulable,
        gpu_resource=seen.spec.worker.gpu.resource_name,
        # While jobs wait these move every tick; the status keeps the last written ones (the
        # idle window only needs them once the work ends), so a busy model is not re-patched.
        last_active=_kept("lastActiveTime", mem.last_active, mem, seen),
        last_saturated=_kept("lastSaturatedTime", mem.last_saturated, mem, seen),
        last_scale=mem.last_scale,
        queue_unknown=unknown,
        failing=seen.failing,
        holders=plan.holders,
        scaling=(d.reason not in ("QueueUnknown", "DuplicateModel"), d.reason, d.message),
    )
    metrics.set_model(
        seen.ns,
        seen.name,
        seen.spec.model,
        desired=desired,
        replicas=observed.replicas,
        ready=observed.ready,
        depth=seen.queue.depth if seen.queue else None,
        state=status.runtime_state(observed.desired, observed.ready),
        gpus_per_worker=seen.spec.worker.gpu.count,
        unschedulable=len(seen.unschedulable),
    )
    new_status = status.compute(observed, mem.last_status.get("conditions"), seen.now)
    cache = await cachectl.cache_status(c.api, seen.body, seen.spec, seen.pods, seen.now)
    if cache is not None:
        new_status["cache"] = cache
    patch = status.changed(mem.last_status, new_status)
    if patch:
        await kube.patch(c.api, ImageModelObject, seen.ns, seen.name, {"status": patch}, subresource="status")
        mem.last_status = {**mem.last_status, **new_status}


async def tick(body: dict[str, Any], mem: Memory) -> None:
    """One autoscaling round for one ImageModel."""
    c = ctx()
    seen = await observe(body)
    plan = decide(seen, mem, {k: v for k, v in c.claims.items() if k != (seen.ns, seen.name)})
    remember(seen, plan, mem)
    c.claims[(seen.ns, seen.name)] = claim(seen, plan.decision)
    await act(seen, plan, mem)
    if seen.spec.cache is not None or mem.may_prewarm:
        await cachectl.ensure_prewarm(c.api, seen.body, seen.spec, seen.dep)
        mem.may_prewarm = seen.spec.cache is not None and seen.spec.cache.prewarm
    await report(seen, plan, mem)
    if seen.spec.cache is not None:
        nodes = (mem.last_status.get("cache") or {}).get("nodes") or []
        mem.cache_indexed = await cachectl.remember(c.api, seen.body, nodes, mem.cache_indexed)
    await report_phases(seen, mem)


async def report_phases(seen: Seen, mem: Memory) -> None:
    """Tells the gateway each new worker pod's cold-start phases (for its jobs' timelines)."""
    mem.phases_reported &= {p["metadata"]["name"] for p in seen.pods}
    for pod, phases in coldstart.to_report(seen.pods, mem.last_scale_up, mem.phases_reported):
        report = WorkerPhases(worker_id=pod, model=seen.spec.model, phases=phases)
        if await asyncio.to_thread(ctx().queue.report_phases, report):
            mem.phases_reported.add(pod)


async def _tick_safely(key: tuple[str, str]) -> None:
    c = ctx()
    body = c.models.get(key)
    if body is None:
        return
    mem = c.memory.get(key)
    if mem is None:
        mem = c.memory[key] = Memory.from_status(body.get("status"))
    ns, name = key
    try:
        await tick(body, mem)
    except Exception as e:  # never let one model's failure stop the others; report it
        metrics.RECONCILE_ERRORS.labels(ns, name).inc()
        known = isinstance(e, (*kube.ERRORS, kopf.PermanentError, kopf.TemporaryError))
        message = str(e) if known else f"{type(e).__name__}: {e}"
        if known:
            log.error("%s/%s: reconcile failed: %s", ns, name, e)
        else:
            log.exception("%s/%s: reconcile failed", ns, name)
        if mem.should_report("ReconcileFailed", message):
            _event(body, "ReconcileFailed", message, warning=True)


def due_now(
    models: Collection[tuple[str, str]], woken: set[tuple[str, str]], due_all: bool
) -> list[tuple[str, str]]:
    """The models to tick now: every one when the interval is up, else the woken ones that
    still exist. Empties `woken`: a wake for a model forgotten since (a queue change that
    raced its deletion) means nothing, and left in it would keep the loop from ever waiting
    (a busy loop that never yields: the whole operator stops)."""
    keys = list(models) if due_all else [k for k in woken if k in models]
    woken.clear()
    return keys


async def autoscale_forever() -> None:
    """Ticks every model each `interval`, and a woken model at once."""
    global _wake_all
    c = ctx()
    _wake_all = asyncio.Event()
    last_all = 0.0
    while True:
        due_all = time.monotonic() - last_all >= c.interval
        keys = due_now(c.models, _woken, due_all)
        if due_all:
            last_all = time.monotonic()
        _wake_all.clear()
        await asyncio.gather(*(_tick_safely(k) for k in keys))
        wait = max(0.0, c.interval - (time.monotonic() - last_all))
        if not _woken:
            try:
                await asyncio.wait_for(_wake_all.wait(), timeout=wait)
            except TimeoutError:
                pass


async def sweep_forever() -> None:
    """The caches of models deleted while the operator was down: at start, then every
    `sweep_interval` (whether or not any ImageModel is left to start the autoscaler)."""
    c = ctx()
    while True:
        try:
            await cachectl.sweep(c.api, c.namespaces)
        except Exception as e:  # noqa: BLE001 - the next sweep tries again
            log.warning(
                "model cache sweep failed (retried in %.0f s): %s: %s", c.sweep_interval, type(e).__name__, e
            )
        await asyncio.sleep(c.sweep_interval)


_sweep_task: asyncio.Task[None] | None = None


@kopf.on.startup()
async def start_sweeper(**_: Any) -> None:
    global _sweep_task
    _sweep_task = asyncio.create_task(sweep_forever())


@kopf.on.cleanup()
async def stop_autoscaler(**_: Any) -> None:
    for task in (_loop_task, _sweep_task):
        if task is not None:
            task.cancel()
