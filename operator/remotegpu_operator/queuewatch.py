"""The event-driven half of the autoscaler: a thread long-polling the gateway's queue.

`GET /internal/v1/queue?since=V&wait_seconds=S` returns as soon as any model's
queue changes (the gateway bumps a version on every submit, lease and finish), so
the first job for a sleeping model reaches this thread within milliseconds. The
thread keeps the latest snapshot and wakes the per-ImageModel daemons whose model's
queue changed (`Waker`s registered by handlers.py); the daemons' 2 s tick is only a
fallback. When the gateway is unreachable the snapshot becomes unknown (None) after
`stale_after` seconds, and the autoscaler then holds replicas instead of guessing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from remotegpu_base.protocol import ModelQueue, QueueSnapshot, WorkerAPIClient, WorkerPhases

from remotegpu_operator import metrics

log = logging.getLogger(__name__)

Waker = Callable[[], None]


class QueueWatcher:
    def __init__(
        self,
        gateway_url: str | None,
        token: str,
        wait_seconds: float = 25.0,
        stale_after: float = 30.0,
        client: WorkerAPIClient | None = None,
    ):
        self.gateway_url = gateway_url
        self._client = client or (WorkerAPIClient(gateway_url, token, timeout=10.0) if gateway_url else None)
        # Phase reports go on their own connection: the watcher's thread long-polls on _client.
        self._reporter = WorkerAPIClient(gateway_url, token, timeout=5.0) if gateway_url else None
        self._wait = wait_seconds
        self._stale_after = stale_after
        self._lock = threading.Lock()
        self._snapshot: QueueSnapshot | None = None
        self._fresh_at = 0.0  # monotonic time of the last successful read
        self._started_at = time.monotonic()
        self._wakers: dict[str, dict[int, Waker]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.changed_at: dict[str, float] = {}  # model -> monotonic time its queue last changed

    # -- what the daemons use ---------------------------------------------------------

    def report_phases(self, phases: WorkerPhases) -> bool:
        """Blocking: tells the gateway a worker pod's cold-start phases; False if it could not."""
        if self._reporter is None:
            return False
        try:
            self._reporter.report_phases(phases)
        except Exception as e:  # noqa: BLE001 - advisory: retried on the next tick
            log.debug("cold-start phases of %s not reported: %s", phases.worker_id, e)
            return False
        return True

    def register(self, model: str, key: int, waker: Waker) -> None:
        with self._lock:
            self._wakers.setdefault(model, {})[key] = waker

    def unregister(self, model: str, key: int) -> None:
        with self._lock:
            self._wakers.get(model, {}).pop(key, None)

    def get(self, model: str) -> ModelQueue | None:
        """The model's queue; None when the gateway has not answered lately (unknown)."""
        with self._lock:
            if self._snapshot is None or time.monotonic() - self._fresh_at > self._stale_after:
                return None
            return self._snapshot.models.get(model, ModelQueue())

    @property
    def available(self) -> bool:
        return self._client is not None

    def why_unknown(self) -> tuple[str, str]:
        """(reason, message) for a queue that get() reports as unknown."""
        if self._client is None:
            return "NoGateway", "no gateway URL is configured; only minReplicas and spec.replicas apply"
        with self._lock:
            never = self._snapshot is None
        if never and time.monotonic() - self._started_at <= self._stale_after:
            return "Waiting", "the gateway's queue has not been read yet; replicas are held"
        return "GatewayUnreachable", "the gateway's queue depth cannot be read; replicas are held"

    # -- the thread -------------------------------------------------------------------
    def start(self) -> None:
        if self._client is None:
            log.warning("no gateway URL: queue depth is unknown, only minReplicas/spec.replicas apply")
            return
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="queue-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for client in (self._client, self._reporter):
            if client is not None:
                client.close()

    def _run(self) -> None:
        assert self._client is not None
        since: int | None = None
        backoff = 0.2
        while not self._stop.is_set():
            try:
                snap = self._client.queue(since=since, wait_seconds=self._wait if since is not None else 0.0)
            except Exception as e:  # the gateway restarts, is not up yet, ...
                if self._stop.is_set():
                    return
                metrics.QUEUE_ERRORS.inc()
                log.warning("reading the gateway queue failed: %s", e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                since = None
                continue
            backoff = 0.2
            self._apply(snap)
            # A version that went backwards means the gateway restarted: start over.
            since = snap.version

    def _apply(self, snap: QueueSnapshot) -> None:
        now = time.monotonic()
        with self._lock:
            old = self._snapshot
            first = old is None or snap.version < old.version
            self._snapshot = snap
            self._fresh_at = now
            models = set(snap.models) | (set(old.models) if old else set())
            changed = [
                m
                for m in models
                if first
                or (old is not None and _what_matters(old.models.get(m)) != _what_matters(snap.models.get(m)))
            ]
            wakers = [w for m in changed for w in self._wakers.get(m, {}).values()]
            for m in changed:
                self.changed_at[m] = now
        for wake in wakers:
            try:
                wake()
            except Exception:  # a daemon that just stopped
                log.debug("waking a daemon failed", exc_info=True)


def _what_matters(q: ModelQueue | None) -> tuple[int, int, int, tuple[str, ...]] | None:
    """The part of a model's queue a decision reads: the age of its oldest job ticks on
    with every snapshot, and must not wake every model with a backlog."""
    if q is None:
        return None
    return (q.queued, q.warming, q.running, tuple(sorted(q.busy_workers)))
