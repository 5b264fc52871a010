"""Cold-start timelines: the phases a job waited through while capacity was acquired.

The operator (scale decision, pod scheduled, container started), the worker (process
started, weights fetched, loaded, warmed) and the gateway (first lease) report when a
worker reached each phase; `ColdStarts` records them per worker, feeds the per-phase
histogram once per phase, and renders a job's timeline from the worker that ran it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from remotegpu_base.protocol import ColdStartPhase

from remotegpu_gateway.metrics import Metrics
from remotegpu_gateway.store import JobRecord, Store, WorkerStart, phase_durations


def iso_ms(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ColdStarts:
    def __init__(self, store: Store, metrics: Metrics):
        self.store, self.metrics = store, metrics
        self._leased: set[str] = set()  # workers whose first lease this replica recorded

    def record(self, worker_id: str, model: str, phases: dict[ColdStartPhase, float]) -> None:
        """Blocking: adds reported phases; observes each phase's duration once it is known."""
        for phase, seconds in self.store.record_phases(worker_id, model, phases).items():
            self.metrics.cold_start_phase.labels(model, phase.value).observe(seconds)

    def leased(self, worker_id: str, model: str, at: float) -> None:
        """Blocking: a worker leased a job; its first lease ends its cold start."""
        if worker_id in self._leased:
            return
        self.record(worker_id, model, {ColdStartPhase.FIRST_LEASE: at})
        self._leased.add(worker_id)

    def timeline(self, job: JobRecord) -> dict[str, Any]:
        """Blocking: the job's cold-start timeline (phases empty when it did not wait for one)."""
        start = self.store.worker_start(job.worker_id) if job.worker_id else None
        waited = None if start is None else _waited(job, start)
        phases = start.phases if start is not None and waited else {}
        durations = phase_durations(phases)
        fetched = ColdStartPhase.WEIGHTS_FETCHED in phases
        return {
            "job_id": job.id,
            "model": job.model,
            "worker_id": job.worker_id,
            "waited_for_capacity": waited,
            # null unless the worker reported its loading: true when it fetched no weights
            "weights_cached": (not fetched) if ColdStartPhase.WEIGHTS_LOADED in phases else None,
            "created_at": iso_ms(job.created_at),
            "phases": [
                {
                    "phase": phase.value,
                    "at": iso_ms(at),
                    "seconds": round(durations[phase], 3) if phase in durations else None,
                    "since_submit_seconds": round(at - job.created_at, 3),
                }
                for phase, at in phases.items()
            ],
        }


def _waited(job: JobRecord, start: WorkerStart) -> bool:
    """The job was submitted before the worker that ran it could take a job."""
    ready = start.ready_at
    return ready is not None and ready >= job.created_at
