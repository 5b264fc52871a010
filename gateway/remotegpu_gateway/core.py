"""The gateway's parts wired together: store, catalog, runtime registry, storage, metrics.

`Gateway` is what the routers use (as `request.app.state.gateway`) and what embedding
code gets hold of: `create_app(settings).state.gateway`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import logging
import secrets
import threading
import time
from datetime import UTC, datetime
from typing import Any

import anyio
from remotegpu_base.catalog import ImageModel, load_models_file
from remotegpu_base.protocol import GenerationRequest, Lease, ModelQueue, QueueSnapshot

from remotegpu_gateway.catalog_source import Catalog, KubernetesCatalogWatcher
from remotegpu_gateway.limits import KeyLimits, Limits
from remotegpu_gateway.metrics import Metrics
from remotegpu_gateway.notify import Notifier
from remotegpu_gateway.registry import RuntimeRegistry
from remotegpu_gateway.settings import Settings
from remotegpu_gateway.storage import BlobStorage, LocalDirStorage, S3Storage, StorageError, UrlSigner
from remotegpu_gateway.store import PENDING, RUNNING, TERMINAL_STATES, Delivery, JobRecord, Store
from remotegpu_gateway.timeline import ColdStarts
from remotegpu_gateway.usage import Usage
from remotegpu_gateway.webhooks import WebhookSender, parse_networks, webhook_body

log = logging.getLogger("remotegpu_gateway")
# Start timeouts are minutes (default 15): sweeping for them every few seconds is enough.
START_SWEEP_SECONDS = 10.0

PURGE_BATCH = 500  # jobs deleted per transaction by the retention sweep


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_ms(ts: float | None) -> str | None:
    """The ETA extension's times, to the millisecond: whole seconds (the seed's fields)
    would be off by half a second on average, a large error for a job of a few seconds."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _summary(values: list[float]) -> dict[str, int | None]:
    if not values:
        return {"count": 0, "p50": None, "p95": None}
    v = sorted(values)

    def pct(p: float) -> int:
        # nearest-rank percentile
        k = max(0, min(len(v) - 1, int(-(-p * len(v) // 100)) - 1))
        return int(round(v[k]))

    return {"count": len(v), "p50": pct(50), "p95": pct(95)}


def _storage(settings: Settings) -> BlobStorage:
    """The settings' bucket when one is named, else the local results folder."""
    if settings.s3_bucket:
        return S3Storage(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            prefix=settings.s3_prefix,
        )
    return LocalDirStorage(settings.resolved_results_dir())


class Gateway:
    def __init__(
        self,
        settings: Settings,
        *,
        catalog: Catalog | None = None,
        registry: RuntimeRegistry | None = None,
        storage: BlobStorage | None = None,
    ):
        self.settings = settings
        self.clock = settings.clock
        self.store = Store(settings.database_url, max_attempts=settings.max_attempts, clock=self.clock)
        self.store.migrate()
        self.registry = registry or RuntimeRegistry(stale_seconds=settings.worker_stale_seconds)
        self.watcher: KubernetesCatalogWatcher | None = None
        if catalog is not None:
            self.catalog = catalog
        elif settings.models is not None:
            self.catalog = Catalog(settings.models)
        elif settings.models_file is not None:
            self.catalog = Catalog(load_models_file(settings.models_file))
        elif settings.namespace is not None:
            self.catalog = Catalog()
            self.watcher = KubernetesCatalogWatcher(
                self.catalog, self.registry, settings.namespace, kubeconfig=settings.kubeconfig
            )
        else:
            self.catalog = Catalog(load_models_file())
        self.storage: BlobStorage = storage or _storage(settings)
        secret = settings.signing_secret or self.store.setting(
            "url_signing_secret", lambda: secrets.token_urlsafe(32)
        )
        self.signer = UrlSigner(secret)
        self.notifier = Notifier()
        self.metrics = Metrics()
        self.usage = Usage(self.store, self.metrics)
        self.timelines = ColdStarts(self.store, self.metrics)
        self.limits = Limits(
            self.store,
            self.usage,
            KeyLimits(
                requests_per_minute=settings.key_requests_per_minute,
                max_concurrent_jobs=settings.key_max_concurrent_jobs,
                gpu_seconds_per_day=settings.key_gpu_seconds_per_day,
            ),
        )
        self.metrics.add_queue_collector(self.queue_snapshot, self._states)
        self.registry.on_change(self._bump_all)
        self.cold_starts = self.metrics.track_cold_starts(self._states)
        self.registry.on_change(self.cold_starts.update)
        self.catalog.on_change(self._bump_all)
        self.catalog.on_change(self._wake_reaper)
        self._tasks: list[asyncio.Task[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaper_wake: asyncio.Event | None = None
        # Submits run in a few threads: more only contend for the GIL and the SQLite write lock.
        self.db_limiter = anyio.CapacityLimiter(settings.submit_threads)
        self._stats_cache: tuple[float, dict[str, Any]] = (0.0, {})
        self._listener_stop = threading.Event()
        self._listener: threading.Thread | None = None
        self.webhooks = WebhookSender(
            self.store,
            self._webhook_body,
            allowed=parse_networks(settings.webhook_allowed_networks),
            timeout_seconds=settings.webhook_timeout_seconds,
            retry_seconds=settings.webhook_retry_seconds,
            clock=self.clock,
        )

    def _webhook_body(self, d: Delivery) -> dict[str, Any]:
        return webhook_body(
            d, lambda job: self.job_view(job, job.base_url or self.settings.public_url or ""), iso
        )

    def _bump_all(self) -> None:
        self.notifier.bump()

    def _wake_reaper(self) -> None:
        """A catalog change: jobs of a model that left it fail now, not at the next round."""
        loop, wake = self._loop, self._reaper_wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts background work: catalog watch, lease reaper, PostgreSQL wake-ups."""
        self._loop = asyncio.get_running_loop()
        self._reaper_wake = asyncio.Event()
        self.notifier.bind(self._loop)
        if self.watcher is not None:
            await self.watcher.start()
        self._tasks.append(asyncio.create_task(self._reaper(), name="lease-reaper"))
        if self.settings.retention_seconds > 0:
            self._tasks.append(asyncio.create_task(self._purger(), name="retention"))
        self._tasks.append(asyncio.create_task(self._deliver_webhooks(), name="webhooks"))
        if not self.store.is_sqlite:
            self._listener = threading.Thread(target=self._listen, name="pg-listen", daemon=True)
            self._listener.start()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._tasks.clear()
        await self.webhooks.close()
        self._listener_stop.set()
        if self.watcher is not None:
            await self.watcher.stop()
        if self._listener is not None:
            await anyio.to_thread.run_sync(self._listener.join, 5)
        self.store.close()
        log.info("gateway stopped")

    async def _reaper(self) -> None:
        """Expired leases every round; the start-timeout sweep (timeouts are minutes, and its
        query scans the queue) every START_SWEEP_SECONDS, or at once on a catalog change."""
        assert self._reaper_wake is not None
        next_sweep = 0.0
        while True:
            woken = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reaper_wake.wait(), self.settings.reaper_interval_seconds)
                woken = True
            self._reaper_wake.clear()
            sweep = woken or self.clock() >= next_sweep
            try:
                await anyio.to_thread.run_sync(self.reap, sweep)
            except Exception:  # noqa: BLE001 - keep reaping
                log.exception("lease reaper failed")
            if sweep:
                next_sweep = self.clock() + START_SWEEP_SECONDS

    def reap(self, sweep: bool = True) -> int:
        """Blocking: expired leases back to the queue (or failed), jobs past their deadline
        cancelled, then (with `sweep`) the jobs that cannot start failed."""
        late = self.store.expire_deadlines()  # first: a job past its deadline is not retried
        for job in late:
            log.info("job %s (%s): %s", job.id, job.model, job.error_message)
            self.metrics.finished(job.model, job.status, job.started_at, job.completed_at)
        changed = self.store.expire_leases()
        for job, status in changed:
            if status in TERMINAL_STATES:
                self.metrics.finished(job.model, status, job.started_at, self.clock())
        failed = self.fail_unstartable() if sweep else []
        if sweep or late or any(status in TERMINAL_STATES for _, status in changed):
            self.usage.backfill()  # the jobs that ended here, and any a stopped replica left unmetered
        models = {job.model for job, _ in changed} | {job.model for job in failed} | {j.model for j in late}
        if models:
            self.notifier.bump(*models)
        return len(changed) + len(failed)

    def start_timeout(self, model: ImageModel) -> float:
        own = model.spec.scaling.start_timeout_seconds
        return float(own) if own is not None else self.settings.start_timeout_seconds

    def fail_unstartable(self) -> list[JobRecord]:
        """Fails the waiting jobs that will not start: their model left the catalog, or they
        waited past the model's start timeout. Their error_message says which."""
        now = self.clock()
        failed: list[JobRecord] = []
        for model_id, count in self.store.queue_counts().items():
            if count.pending == 0:
                continue
            entry = self.catalog.get(model_id)
            if entry is None:
                message = f"the model {model_id} left the catalog (it is no longer served here); the job never started"
                failed += self.fail_waiting(model_id, message)
                continue
            timeout = self.start_timeout(entry)
            queued_at = count.oldest_pending_queued_at
            if queued_at is not None and queued_at < now - timeout:
                message = f"the job did not start within {timeout:g}s: {self.no_start_reason(model_id)}"
                failed += self.fail_waiting(model_id, message, queued_before=now - timeout)
        return failed

    def fail_waiting(
        self, model_id: str, message: str, queued_before: float | None = None
    ) -> list[JobRecord]:
        """Blocking: fails `model_id`'s jobs that have not started (queued before
        `queued_before`, if given) with `message`; the caller wakes the model's pollers."""
        failed = self.store.fail_pending(model_id, message, queued_before=queued_before)
        for job in failed:
            log.warning("job %s (%s) failed before it started: %s", job.id, job.model, job.error_message)
            self.metrics.finished(job.model, job.status, None, job.completed_at)
        self.usage.record(failed)
        return failed

    def no_start_reason(self, model_id: str) -> str:
        available, why = self.registry.availability(model_id)
        if not available:
            return f"the model is unavailable here ({why or 'no reason given'})"
        failures = self.registry.load_failures(model_id)
        if failures:
            return f"the model failed to load {failures} time{'s' if failures != 1 else ''}"
        return "no capacity came up for this model"

    async def _deliver_webhooks(self) -> None:
        """Sends due webhook deliveries; woken by any queue change (a job change queues
        them), else every second for retries that fell due."""
        while True:
            ev = self.notifier.any_event()
            try:
                await self.webhooks.run_once()
            except Exception:  # noqa: BLE001 - keep delivering
                log.exception("webhook delivery round failed")
            await asyncio.sleep(0.05)  # at most 20 rounds a second, however busy the queue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), 1.0)

    async def _purger(self) -> None:
        while True:
            try:
                await self.purge()
            except Exception:  # noqa: BLE001 - try again next round
                log.exception("deleting jobs past the retention period failed")
            await asyncio.sleep(self.settings.purge_interval_seconds)

    async def purge(self) -> int:
        """Deletes finished jobs older than the retention period, with their images."""
        before = self.clock() - self.settings.retention_seconds
        total = 0
        while True:
            purged = await anyio.to_thread.run_sync(self._purge_batch, before)
            total += len(purged)
            self.metrics.jobs_purged.inc(len(purged))
            if len(purged) < PURGE_BATCH:
                break
        if total:
            log.info("deleted %d finished job(s) past the retention period, with their images", total)
        return total

    def _purge_batch(self, before: float) -> list[JobRecord]:
        """One batch, off the event loop: the rows first, then their files (a failed file
        delete leaves an orphan file, never a job whose image is gone)."""
        purged = self.store.purge_finished(before, PURGE_BATCH)
        self.store.purge_idempotency_keys()
        self.usage.record(purged)  # metered already, unless its replica stopped before it could
        for job in purged:
            for key in [*job.input_image_keys, *([job.result_key] if job.result_key else [])]:
                try:
                    self.storage.delete(key)
                except StorageError as e:
                    log.warning("job %s: %s (left in storage)", job.id, e)
        return purged

    def _listen(self) -> None:
        """PostgreSQL LISTEN: wakes long-polls for jobs submitted through other replicas."""
        import psycopg

        dsn = self.store.url.replace("postgresql+psycopg://", "postgresql://")
        while not self._listener_stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {self.store.CHANNEL}")
                    conn.execute(f"LISTEN {self.store.JOB_CHANNEL}")
                    while not self._listener_stop.is_set():
                        for n in conn.notifies(timeout=0.5):
                            if n.pid in self.store.own_backend_pids:
                                continue
                            if n.channel == self.store.JOB_CHANNEL:
                                self.notifier.bump_job(n.payload)
                            else:
                                self.notifier.bump(*([n.payload] if n.payload else []))
            except Exception as e:  # noqa: BLE001
                log.warning("PostgreSQL LISTEN failed (%s); retrying", e)
                self._listener_stop.wait(1.0)

    # ---- views ----------------------------------------------------------------------------

    def public_status(self, job: JobRecord) -> str:
        if job.status == PENDING:
            # A low-priority job never wakes its model: it waits in the queue, not for warm-up.
            if job.priority or self.registry.has_ready_worker(job.model):
                return "queued"
            return "warming"
        return job.status

    def result_url(self, job_id: str, base_url: str, completed_at: float | None = None) -> str:
        expires = int(time.time()) + self.settings.result_url_ttl_seconds
        if completed_at is not None and self.settings.retention_seconds > 0:
            # Never promise longer than the result is kept.
            expires = min(expires, int(completed_at + self.settings.retention_seconds))
        sig = self.signer.signature(job_id, expires)
        return f"{base_url.rstrip('/')}/v1/inference/jobs/{job_id}/result?expires={expires}&signature={sig}"

    def job_view(self, job: JobRecord, base_url: str) -> dict[str, Any]:
        now = self.clock()
        status = self.public_status(job)
        return {
            "job_id": job.id,
            "job_type": "image",
            "model": job.model,
            "status": status,
            "created_at": iso(job.created_at),
            "updated_at": iso(job.updated_at),
            "started_at": iso(job.started_at),
            "completed_at": iso(job.completed_at),
            "wait_ms": job.wait_ms(now),
            "run_ms": job.run_ms(now),
            "result_url": self.result_url(job.id, base_url, job.completed_at)
            if status == "succeeded"
            else None,
            "error_message": job.error_message,
        }

    def job_view_with_eta(self, job: JobRecord, base_url: str) -> dict[str, Any]:
        """Blocking: the status plus, while the job is not finished, the extension fields
        queue_position, estimated_start_at and estimated_completion_at."""
        view = self.job_view(job, base_url)
        if job.status not in TERMINAL_STATES:
            view.update(self.estimate(job))
        return view

    def typical_run_seconds(self, model: str) -> float | None:
        """The model's recent median run time (None before its first success)."""
        p50 = self.recent_stats().get(model, {}).get("run_ms", {}).get("p50")
        return p50 / 1000 if p50 is not None else None

    def estimate(self, job: JobRecord) -> dict[str, Any]:
        """Blocking: queue position (0: next) and the expected start and end of a job, from
        the jobs ahead of it, the model's ready workers, their running jobs' progress and
        the model's recent run times. Unknown parts are null (no run measured yet, or a
        sleeping model whose cold start was never measured)."""
        now = self.clock()
        run = self.typical_run_seconds(job.model)
        if job.status == RUNNING:
            end = self._expected_end(job, run, now)
            return {
                "queue_position": None,
                "estimated_start_at": iso_ms(job.started_at),
                "estimated_completion_at": iso_ms(end),
            }
        position = self.store.queue_position(job)
        out: dict[str, Any] = {
            "queue_position": position,
            "estimated_start_at": None,
            "estimated_completion_at": None,
        }
        if run is None:
            return out
        workers = self.registry.runtime(job.model).ready_workers
        first_free = now
        if workers == 0:
            if job.priority:
                return out  # waits for capacity that something else brings up
            ready_in = self.cold_starts.ready_in(job.model)
            if ready_in is None:
                return out
            workers, first_free = 1, now + ready_in  # a cold start brings one worker first
        ends = sorted(self._expected_end(r, run, now) or now for r in self.store.running_jobs(job.model))
        free = ends[-workers:] if len(ends) >= workers else ends + [first_free] * (workers - len(ends))
        free = [max(t, first_free) for t in free]
        heapq.heapify(free)
        for _ in range(position):
            heapq.heappush(free, heapq.heappop(free) + run)
        start = heapq.heappop(free)
        out["estimated_start_at"], out["estimated_completion_at"] = iso_ms(start), iso_ms(start + run)
        return out

    @staticmethod
    def _expected_end(job: JobRecord, run: float | None, now: float) -> float | None:
        """A running job's expected end: from its own progress when it reported some,
        else its start plus the model's typical run time."""
        started = job.started_at if job.started_at is not None else now
        if job.progress_step and job.progress_total:
            per_step = (now - started) / job.progress_step
            return now + per_step * (job.progress_total - job.progress_step)
        if run is None:
            return None
        return max(now, started + run)

    def _states(self) -> dict[str, str]:
        return {m: self.registry.state(m).value for m in self.catalog.ids()}

    def queue_snapshot(self) -> QueueSnapshot:
        version = self.notifier.version
        counts = self.store.queue_counts()
        now = self.clock()
        models: dict[str, ModelQueue] = {}
        for model_id in set(self.catalog.ids()) | set(counts):
            c = counts.get(model_id)
            q = ModelQueue()
            if c is not None:
                # Low-priority jobs are not demand: they never wake a model nor add replicas.
                normal = c.pending - c.pending_low
                if self.registry.has_ready_worker(model_id):
                    q.queued = normal
                else:
                    q.warming = normal
                q.low_priority = c.pending_low
                entry = self.catalog.get(model_id)
                unpriced = entry.spec.parameters.default_step_megapixels() if entry else 0.0
                q.queued_step_megapixels = c.pending_step_megapixels + c.pending_unpriced * unpriced
                q.running = c.running
                q.busy_workers = sorted(c.busy_workers)
                if c.oldest_pending_created_at is not None:
                    q.oldest_wait_seconds = max(0.0, now - c.oldest_pending_created_at)
            models[model_id] = q
        return QueueSnapshot(version=version, models=models)

    def recent_stats(self) -> dict[str, Any]:
        """Per model: count/p50/p95 of wait, run and total ms over the recent window (cached 2 s)."""
        at, cached = self._stats_cache
        if time.monotonic() - at < 2.0:
            return cached
        since = self.clock() - self.settings.stats_window_seconds
        out = {model: self._model_stats(model, since) for model in self.catalog.ids()}
        self._stats_cache = (time.monotonic(), out)
        return out

    def _model_stats(self, model: str, since: float) -> dict[str, Any]:
        w: list[float] = []
        r: list[float] = []
        t: list[float] = []
        for created, started, completed in self.store.recent_finished(model, since):
            start = started if started is not None else completed
            w.append((start - created) * 1000)
            r.append((completed - start) * 1000)
            t.append((completed - created) * 1000)
        return {
            "window_seconds": int(self.settings.stats_window_seconds),
            "wait_ms": _summary(w),
            "run_ms": _summary(r),
            "total_ms": _summary(t),
        }

    def models_view(self) -> dict[str, Any]:
        stats = self.recent_stats()
        return {
            "image": [
                {
                    "model": m.spec.model,
                    "description": m.spec.description,
                    "parameters": m.spec.public_parameters(),
                    "runtime": self.registry.runtime(m.spec.model).public(),
                    "recent_summary_stats": stats.get(m.spec.model)
                    or self._model_stats(m.spec.model, self.clock() - self.settings.stats_window_seconds),
                }
                for m in self.catalog.models()
            ]
        }

    def build_lease(self, job: JobRecord) -> Lease:
        images = [base64.b64encode(self.storage.get(k)).decode() for k in job.input_image_keys]
        assert job.lease_token is not None and job.lease_expires_at is not None
        return Lease(
            job_id=job.id,
            model=job.model,
            lease_token=job.lease_token,
            lease_expires_at=datetime.fromtimestamp(job.lease_expires_at, UTC),
            lease_ttl_seconds=self.settings.lease_ttl_seconds,
            attempt=job.attempt,
            request=GenerationRequest(**job.request, input_images_base64=images),
        )
