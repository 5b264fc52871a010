"""Per-model runtime state: which models have ready workers, and which may serve at all.

Three inputs meet here:
- worker reports (POST /internal/v1/workers/status and lease polls, which prove a
  worker is loaded and asking for work); a worker not heard from for `stale_seconds`
  no longer counts;
- the cluster's view (`ImageModel.status.state`, written by the operator);
- availability, set by whoever knows a model cannot be served here (the embedded
  default marks FLUX models whose weights are not present as unavailable, with a
  reason that tells the user what to do). Unavailable models get 503 on submit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from remotegpu_base.protocol import RuntimeState

from remotegpu_gateway.errors import public_text

log = logging.getLogger("remotegpu_gateway")


@dataclass
class _Worker:
    state: RuntimeState
    seen: float


@dataclass
class ModelRuntime:
    state: RuntimeState
    available: bool
    reason: str | None
    ready_workers: int

    def public(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "available": self.available,
            "unavailable_reason": self.reason,
            "ready_workers": self.ready_workers,
        }


class RuntimeRegistry:
    def __init__(self, stale_seconds: float = 90.0):
        self.stale_seconds = stale_seconds
        self._lock = threading.Lock()
        self._workers: dict[str, dict[str, _Worker]] = {}
        self._cluster_state: dict[str, RuntimeState] = {}
        self._availability: dict[str, tuple[bool, str | None]] = {}
        self._load_failures: dict[str, int] = {}  # consecutive failed loads since the last ready
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, fn: Callable[[], None]) -> None:
        """Called (from any thread) whenever a model's state may have changed."""
        self._listeners.append(fn)

    def _changed(self) -> None:
        for fn in list(self._listeners):
            fn()

    # ---- inputs -------------------------------------------------------------------------

    def report_worker(self, model: str, worker_id: str, state: RuntimeState) -> None:
        with self._lock:
            if state == RuntimeState.READY:
                self._load_failures.pop(model, None)
            before = self._state_locked(model)
            self._workers.setdefault(model, {})[worker_id] = _Worker(
                state=RuntimeState(state), seen=time.monotonic()
            )
            after = self._state_locked(model)
        if before != after:
            self._changed()

    def worker_seen(self, model: str, worker_id: str) -> bool:
        """A lease poll: the worker is loaded and serving. False for a worker that has said
        it is going away (it reported `sleeping`): it must not be given a job."""
        with self._lock:
            w = self._workers.get(model, {}).get(worker_id)
            if w is not None and w.state == RuntimeState.SLEEPING:
                return False
        self.report_worker(model, worker_id, RuntimeState.READY)
        return True

    def forget_worker(self, model: str, worker_id: str) -> None:
        with self._lock:
            self._workers.get(model, {}).pop(worker_id, None)
        self._changed()

    def set_cluster_state(self, model: str, state: RuntimeState | str | None) -> None:
        with self._lock:
            before = self._state_locked(model)
            if state is None:
                self._cluster_state.pop(model, None)
            else:
                self._cluster_state[model] = RuntimeState(state)
            after = self._state_locked(model)
        if before != after:
            self._changed()

    def set_load_failures(self, model: str, failures: int) -> None:
        """A worker's consecutive failed loads of `model`: the reason its jobs did not start."""
        with self._lock:
            self._load_failures[model] = failures

    def set_availability(self, model: str, available: bool, reason: str | None = None) -> None:
        """Marks a model (un)available for serving. Clients see `reason` (in the catalog and
        on 503) without internals such as paths or exception reprs; the log gets all of it."""
        if not available:
            log.warning("model %s is unavailable for serving: %s", model, reason)
        public = public_text(reason) if reason and not available else None
        with self._lock:
            self._availability[model] = (available, public)
        self._changed()

    # ---- reads --------------------------------------------------------------------------

    def _fresh_workers(self, model: str) -> dict[str, _Worker]:
        cutoff = time.monotonic() - self.stale_seconds
        workers = self._workers.get(model, {})
        for wid in [w for w, info in workers.items() if info.seen < cutoff]:
            del workers[wid]
        return workers

    def _state_locked(self, model: str) -> RuntimeState:
        workers = self._fresh_workers(model)
        if any(w.state == RuntimeState.READY for w in workers.values()):
            return RuntimeState.READY
        cluster = self._cluster_state.get(model)
        if cluster == RuntimeState.READY:
            return RuntimeState.READY
        if cluster == RuntimeState.STARTING or any(
            w.state == RuntimeState.STARTING for w in workers.values()
        ):
            return RuntimeState.STARTING
        return RuntimeState.SLEEPING

    def state(self, model: str) -> RuntimeState:
        with self._lock:
            return self._state_locked(model)

    def has_ready_worker(self, model: str) -> bool:
        return self.state(model) == RuntimeState.READY

    def availability(self, model: str) -> tuple[bool, str | None]:
        with self._lock:
            return self._availability.get(model, (True, None))

    def load_failures(self, model: str) -> int:
        with self._lock:
            return self._load_failures.get(model, 0)

    def runtime(self, model: str) -> ModelRuntime:
        with self._lock:
            state = self._state_locked(model)
            ready = sum(1 for w in self._fresh_workers(model).values() if w.state == RuntimeState.READY)
            available, reason = self._availability.get(model, (True, None))
        return ModelRuntime(state=state, available=available, reason=reason, ready_workers=ready)
