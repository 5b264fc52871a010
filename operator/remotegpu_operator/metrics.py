"""Prometheus metrics of the operator, served on /metrics beside /healthz (main.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge
from remotegpu_base.protocol import RuntimeState

_MODEL = ["namespace", "imagemodel", "model"]

DESIRED = Gauge("remotegpu_operator_desired_replicas", "Worker replicas the autoscaler wants", _MODEL)
CURRENT = Gauge("remotegpu_operator_replicas", "Worker pods that exist", _MODEL)
READY = Gauge("remotegpu_operator_ready_replicas", "Worker pods that are ready", _MODEL)
QUEUE_DEPTH = Gauge("remotegpu_operator_queue_depth", "Queued + warming + running jobs of the model", _MODEL)
STATE = Gauge(
    "remotegpu_operator_model_state", "1 for the model's runtime state, 0 for the others", [*_MODEL, "state"]
)
WORKER_GPUS = Gauge(
    "remotegpu_operator_worker_gpus", "GPUs each worker pod of the model requests (cost: x replicas)", _MODEL
)
UNSCHEDULABLE = Gauge(
    "remotegpu_operator_unschedulable_replicas",
    "Worker pods Pending because they cannot be scheduled (no free GPU, quota)",
    _MODEL,
)
CAPACITY = Gauge(
    "remotegpu_operator_capacity_available",
    "0 while worker pods cannot be scheduled (e.g. no free GPU)",
    _MODEL,
)
SCALE_DECISIONS = Counter(
    "remotegpu_operator_scale_decisions_total",
    "Replica changes made by the autoscaler",
    [*_MODEL, "direction", "reason"],
)
RECONCILE_ERRORS = Counter(
    "remotegpu_operator_reconcile_errors_total", "Failed reconciliations", ["namespace", "imagemodel"]
)
QUEUE_ERRORS = Counter("remotegpu_operator_queue_read_errors_total", "Failed reads of the gateway's queue")
LEADER = Gauge("remotegpu_operator_leader", "1 while this replica holds the leader Lease and reconciles")
WAKE_LATENCY = Gauge(
    "remotegpu_operator_last_wake_to_scale_seconds",
    "Seconds from a queue change to the replica patch, last scale-up from an event",
    _MODEL,
)


def set_model(
    ns: str,
    name: str,
    model: str,
    *,
    desired: int,
    replicas: int,
    ready: int,
    depth: int | None,
    state: RuntimeState,
    gpus_per_worker: int,
    unschedulable: int,
) -> None:
    labels = (ns, name, model)
    DESIRED.labels(*labels).set(desired)
    CURRENT.labels(*labels).set(replicas)
    READY.labels(*labels).set(ready)
    WORKER_GPUS.labels(*labels).set(gpus_per_worker)
    UNSCHEDULABLE.labels(*labels).set(unschedulable)
    if depth is not None:
        QUEUE_DEPTH.labels(*labels).set(depth)
    for s in RuntimeState:
        STATE.labels(*labels, s.value).set(1 if s is state else 0)
    CAPACITY.labels(*labels).set(0 if unschedulable else 1)
    # The error counter reads 0 from the first reconcile on (an alert's rate() needs the series).
    RECONCILE_ERRORS.labels(ns, name)


def forget_model(ns: str, name: str, model: str) -> None:
    labels = (ns, name, model)
    for g in (DESIRED, CURRENT, READY, QUEUE_DEPTH, WORKER_GPUS, UNSCHEDULABLE, CAPACITY, WAKE_LATENCY):
        try:
            g.remove(*labels)
        except KeyError:
            pass
    for s in RuntimeState:
        try:
            STATE.remove(*labels, s.value)
        except KeyError:
            pass
