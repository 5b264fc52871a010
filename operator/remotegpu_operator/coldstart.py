"""The pod's part of a worker's cold start, for the jobs' timelines (pure).

From what the operator sees: its own scale-up decision, then the pod's status (the
scheduler's PodScheduled condition and the start of the pod's first container, the
weights fetcher's with a model cache; both to the second, as Kubernetes records them).
The worker reports the rest itself.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from remotegpu_base.protocol import ColdStartPhase

from remotegpu_operator.deployment import CONTAINER_NAME
from remotegpu_operator.status import parse_time

# Kubernetes times have whole seconds: a decision up to this much after a pod's creation
# time may still be the one that created it.
_TIMESTAMP_RESOLUTION = timedelta(seconds=1)


def pod_phases(pod: dict[str, Any], scale_up_at: datetime | None) -> dict[ColdStartPhase, float]:
    """The phases this pod has reached: scale decision (when the pod came from it), pod
    scheduled, container started (its first container, once the worker's has started)."""
    out: dict[ColdStartPhase, float] = {}
    created = parse_time(pod.get("metadata", {}).get("creationTimestamp"))
    if scale_up_at is not None and created is not None and scale_up_at <= created + _TIMESTAMP_RESOLUTION:
        out[ColdStartPhase.SCALE_DECISION] = scale_up_at.timestamp()
    st = pod.get("status") or {}
    for c in st.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "True":
            at = parse_time(c.get("lastTransitionTime"))
            if at is not None:
                out[ColdStartPhase.POD_SCHEDULED] = at.timestamp()
    worker_started = False
    starts = []
    for cs in [*(st.get("initContainerStatuses") or []), *(st.get("containerStatuses") or [])]:
        state = cs.get("state") or {}
        started = parse_time((state.get("running") or state.get("terminated") or {}).get("startedAt"))
        if started is not None:
            starts.append(started)
            worker_started = worker_started or cs.get("name") == CONTAINER_NAME
    if worker_started:  # reported once the worker runs: its fetcher's start is final by then
        out[ColdStartPhase.CONTAINER_STARTED] = min(starts).timestamp()
    return out


def to_report(
    pods: list[dict[str, Any]], scale_up_at: datetime | None, reported: set[str]
) -> list[tuple[str, dict[ColdStartPhase, float]]]:
    """(pod name, phases) of the pods whose container has started and that were not reported yet."""
    out = []
    for pod in pods:
        name = pod["metadata"]["name"]
        if name in reported:
            continue
        phases = pod_phases(pod, scale_up_at)
        if ColdStartPhase.CONTAINER_STARTED in phases:
            out.append((name, phases))
    return out
