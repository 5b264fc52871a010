"""The worker loop: lease a job (long-poll), run it with heartbeats, complete/fail/release.

One job at a time per engine. While a job runs, a heartbeat thread renews the lease
and reports progress; when the gateway answers `cancel` (the job was cancelled by its
owner) or refuses the lease token (it was re-leased or finished), the engine stops at
the next denoising step. A cancelled job is handed back with `release`, which the
gateway turns into `cancelled` because the cancel was requested; a lost lease is
simply dropped (someone else owns the job now).

Draining (SIGTERM, or the embedded supervisor unloading): stop leasing, give the
current job `grace_seconds` to finish, then stop it at the next step and `release` it
so another worker picks it up. Nothing is lost: if even the release cannot be sent,
the lease expires and the gateway re-queues the job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from remotegpu_base.protocol import (
    HeartbeatAction,
    Lease,
    LeaseLost,
    Progress,
    RuntimeState,
    WorkerAPIClient,
    WorkerStatus,
)

from remotegpu_worker.engine import BadInput, CancelFlag, ImageEngine, JobCancelled, OutOfMemory
from remotegpu_worker.engine.pipelines import Rendered
from remotegpu_worker.metrics import WorkerMetrics

log = logging.getLogger("remotegpu_worker.loop")

ClientFactory = Callable[[], WorkerAPIClient]


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class LoopSettings:
    lease_wait_seconds: float = 20.0  # long-poll length of one lease call
    heartbeat_seconds: float = 2.0  # upper bound; also at most a third of the lease TTL
    # Steps are reported as they end, at most this often (each report is one request).
    progress_seconds: float = 0.2
    drain_grace_seconds: float = 285.0  # how long a draining worker lets its current job run
    idle_seconds: float | None = None  # stop after this long without a job (embedded supervisor)
    status_report_seconds: float = 30.0  # keeps the gateway's view of this worker fresh
    # Keep sending a result this long on network errors and 5xx answers (the lease stays renewed).
    complete_retry_seconds: float = 60.0

    @classmethod
    def from_env(cls, **overrides: float | None) -> LoopSettings:
        s = cls(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
        env = os.environ
        if env.get("REMOTEGPU_LEASE_WAIT_SECONDS"):
            s.lease_wait_seconds = float(env["REMOTEGPU_LEASE_WAIT_SECONDS"])
        if env.get("REMOTEGPU_HEARTBEAT_SECONDS"):
            s.heartbeat_seconds = float(env["REMOTEGPU_HEARTBEAT_SECONDS"])
        if env.get("REMOTEGPU_DRAIN_GRACE_SECONDS"):
            s.drain_grace_seconds = float(env["REMOTEGPU_DRAIN_GRACE_SECONDS"])
        if env.get("REMOTEGPU_UPLOAD_RETRY_SECONDS"):
            s.complete_retry_seconds = float(env["REMOTEGPU_UPLOAD_RETRY_SECONDS"])
        return s


class WorkerLoop:
    def __init__(
        self,
        engine: ImageEngine,
        client_factory: ClientFactory,
        *,
        worker_id: str | None = None,
        metrics: WorkerMetrics | None = None,
        settings: LoopSettings | None = None,
    ):
        self.engine = engine
        self.model = engine.model_id
        self.worker_id = worker_id or default_worker_id()
        self.metrics = metrics or WorkerMetrics()
        self.settings = settings or LoopSettings()
        self._client_factory = client_factory
        self.client = client_factory()
        # Results go out on their own connection: the loop's thread may be in a lease poll
        # on self.client meanwhile. One job finishes at a time, so one client serves them.
        self._delivery = client_factory()
        self._stop = threading.Event()  # stop leasing (drain or stop)
        # Re-entrant: drain() may run in a signal handler on the thread that holds it.
        self._lock = threading.RLock()
        self._current: tuple[Lease, CancelFlag] | None = None
        self._drain_timer: threading.Timer | None = None
        self.last_activity = time.monotonic()
        self.jobs_done = 0
        self.state = RuntimeState.STARTING
        self._reporter: threading.Thread | None = None
        self.metrics.init_model(self.model)

    # ---- control (any thread, signal handlers included) -----------------------------------

    @property
    def draining(self) -> bool:
        return self._stop.is_set()

    @property
    def busy(self) -> bool:
        return self._current is not None

    def drain(self, grace_seconds: float | None = None) -> None:
        """Stop leasing; the current job gets `grace_seconds` to finish, then is released."""
        grace = self.settings.drain_grace_seconds if grace_seconds is None else grace_seconds
        if self._stop.is_set() and grace > 0:
            return
        self._stop.set()
        self.metrics.draining.labels(self.model).set(1)
        with self._lock:
            current = self._current
            if current is None:
                # Idle in a lease long-poll: saying so ends the poll at once, so the process
                # exits now (not after the poll) and no job is leased only to be handed back.
                threading.Thread(target=self._say_leaving, name="leaving", daemon=True).start()
                return
            lease, flag = current
            log.info("draining: job %s gets %.0fs to finish before it is handed back", lease.job_id, grace)
            if grace <= 0:
                flag.trigger("draining")
            elif self._drain_timer is None:
                self._drain_timer = threading.Timer(grace, flag.trigger, args=("draining",))
                self._drain_timer.daemon = True
                self._drain_timer.start()

    def _say_leaving(self) -> None:
        client = self._client_factory()  # not self.client: the loop's thread is polling with it
        try:
            client.report_status(
                WorkerStatus(worker_id=self.worker_id, model=self.model, state=RuntimeState.SLEEPING)
            )
        except Exception as e:  # noqa: BLE001 - the poll then ends by itself
            log.debug("status report failed: %s", e)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop now: the current job stops at its next step and is released."""
        self.drain(0)

    # ---- status reports -------------------------------------------------------------------

    def report(self, state: RuntimeState) -> None:
        self.state = state
        try:
            self.client.report_status(WorkerStatus(worker_id=self.worker_id, model=self.model, state=state))
        except Exception as e:  # noqa: BLE001 - reports are advisory
            log.debug("status report failed: %s", e)

    def _report_periodically(self) -> None:
        client = self._client_factory()
        try:
            while not self._stop.wait(self.settings.status_report_seconds):
                try:
                    client.report_status(
                        WorkerStatus(worker_id=self.worker_id, model=self.model, state=self.state)
                    )
                except Exception as e:  # noqa: BLE001
                    log.debug("status report failed: %s", e)
        finally:
            client.close()

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> str:
        """Leases and runs jobs until drained/stopped or idle; returns why it ended."""
        if not self.engine.ready:
            raise RuntimeError("the engine must be loaded and warmed up before the loop starts")
        self.report(RuntimeState.READY)
        # Job series from 0: increase() (the dashboards' busy GPU-seconds) then counts the first job too.
        self.metrics.busy.labels(self.model).set(0)
        for outcome in ("succeeded", "failed", "cancelled", "released", "lost"):
            self.metrics.jobs.labels(self.model, outcome)
            self.metrics.job_seconds.labels(self.model, outcome)
        self._reporter = threading.Thread(target=self._report_periodically, name="status-report", daemon=True)
        self._reporter.start()
        self.last_activity = time.monotonic()
        backoff = 0.5
        why = "drained"
        finishing: threading.Thread | None = None
        try:
            while not self._stop.is_set():
                wait = self.settings.lease_wait_seconds
                if self.settings.idle_seconds is not None:
                    idle_left = self.settings.idle_seconds - (time.monotonic() - self.last_activity)
                    if idle_left <= 0:
                        why = "idle"
                        break
                    wait = max(0.0, min(wait, idle_left))
                try:
                    lease = self.client.lease(self.model, self.worker_id, wait_seconds=wait)
                    backoff = 0.5
                except httpx.HTTPStatusError as e:
                    log.warning("lease failed: HTTP %s %s", e.response.status_code, e.response.text[:200])
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                except httpx.HTTPError as e:
                    log.warning("lease failed (%s); retrying in %.1fs", e, backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                if lease is None:
                    continue
                if self._stop.is_set():
                    self._release(lease, "worker draining")
                    self.metrics.jobs.labels(self.model, "released").inc()
                    break
                finish = self._begin(lease)
                if finishing is not None:
                    finishing.join()  # at most one job encoding and delivering at a time
                finishing = threading.Thread(target=finish, name=f"finish-{lease.job_id[:8]}", daemon=True)
                finishing.start()
                self.last_activity = time.monotonic()
        finally:
            if finishing is not None:
                finishing.join()  # never exit with a rendered job undelivered
            self.state = RuntimeState.SLEEPING
            self._stop.set()
            self.report(RuntimeState.SLEEPING)
            self.client.close()
            self._delivery.close()
        return why if why == "idle" else "drained"

    def run_job(self, lease: Lease) -> str:
        """Runs one leased job to an outcome: succeeded, failed, cancelled, released, lost."""
        return self._begin(lease)()

    def _begin(self, lease: Lease) -> Callable[[], str]:
        """Renders a leased job (the engine's lock, the GPU) and returns what finishes it:
        PNG encoding and delivery, which need no GPU, so run() lets them overlap the
        next job's denoising. The lease's heartbeat runs until the job is finished."""
        flag = CancelFlag()
        progress: list[Progress | None] = [None]
        done = threading.Event()
        stepped = threading.Event()  # a denoising step ended: report it (job event streams)
        with self._lock:
            self._current = (lease, flag)
            if self._stop.is_set() and self._drain_timer is None:  # drain() came between lease and here
                self._drain_timer = threading.Timer(
                    self.settings.drain_grace_seconds, flag.trigger, ("draining",)
                )
                self._drain_timer.daemon = True
                self._drain_timer.start()
        hb = threading.Thread(
            target=self._heartbeat,
            args=(lease, flag, progress, done, stepped),
            name=f"heartbeat-{lease.job_id[:8]}",
            daemon=True,
        )
        hb.start()
        m = self.metrics
        m.busy.labels(self.model).set(1)
        started = time.monotonic()
        req = lease.request
        log.info(
            "job %s (attempt %d): %dx%d, %d steps, %d input image(s)",
            lease.job_id,
            lease.attempt,
            req.width,
            req.height,
            req.steps,
            len(req.input_images_base64),
        )

        def on_step(step: int, total: int) -> None:
            progress[0] = Progress(step=step, total_steps=total)
            stepped.set()

        rendered: Rendered | None = None
        outcome = "failed"
        try:
            rendered = self.engine.render(req, flag, on_step)
        except JobCancelled as e:
            outcome = self._stopped(lease, flag, e)
        except BadInput as e:
            outcome = self._fail(lease, f"bad input: {e}")
        except OutOfMemory as e:
            outcome = self._fail(lease, f"{e}; try a smaller size or fewer input images")
        except Exception as e:  # noqa: BLE001 - report, never crash the loop
            # The message is public: the exception (paths, reprs) stays in this log.
            log.exception("job %s failed: %s", lease.job_id, e)
            outcome = self._fail(
                lease, "inference failed on the worker; its log has the details for this job"
            )
        finally:
            with self._lock:
                self._current = None
                if self._drain_timer is not None:
                    self._drain_timer.cancel()
                    self._drain_timer = None
            m.busy.labels(self.model).set(0)

        if rendered is None:
            done.set()  # already released or failed: no more heartbeats for it
            stepped.set()  # wakes the heartbeat thread to see it

        def finish() -> str:
            nonlocal outcome
            try:
                if rendered is not None:
                    outcome = self._deliver(lease, flag, rendered)
            except Exception as e:  # noqa: BLE001 - tell the gateway now, not at lease expiry
                log.exception("job %s: the result could not be encoded or delivered: %s", lease.job_id, e)
                message = "the result could not be delivered by the worker; its log has the details"
                outcome = self._fail(lease, message, self._delivery)
            finally:
                done.set()
                stepped.set()
                hb.join(timeout=10)
                m.jobs.labels(self.model, outcome).inc()
                m.job_seconds.labels(self.model, outcome).observe(time.monotonic() - started)
                self.jobs_done += 1
            return outcome

        return finish

    def _deliver(self, lease: Lease, flag: CancelFlag, rendered: Rendered) -> str:
        m = self.metrics
        result = rendered.encode()
        m.inference_seconds.labels(self.model).observe(result.seconds)
        m.steps_per_second.labels(self.model).set(result.steps_per_second)
        m.denoise_steps.labels(self.model).inc(result.steps)
        m.denoise_seconds.labels(self.model).inc(result.denoise_seconds)
        m.encode_seconds.labels(self.model).observe(result.encode_seconds)
        if flag.is_set() and flag.reason == "lease lost":
            outcome = "lost"
        else:
            outcome = self._complete(lease, result.data, result.media_type)
        log.info(
            "job %s: %s in %.2fs (%.1f steps/s; %s %.0f ms, %d KiB)",
            lease.job_id,
            outcome,
            result.seconds,
            result.steps_per_second,
            lease.request.output_format.upper(),
            result.encode_seconds * 1000,
            len(result.data) // 1024,
        )
        return outcome

    # ---- per-job helpers ------------------------------------------------------------------

    def _heartbeat(
        self,
        lease: Lease,
        flag: CancelFlag,
        progress: list[Progress | None],
        done: threading.Event,
        stepped: threading.Event,
    ) -> None:
        """Renews the lease every interval, and reports each step's progress as it comes
        (at most every progress_seconds): the job's event stream shows it live."""
        interval = max(0.1, min(self.settings.heartbeat_seconds, lease.lease_ttl_seconds / 3))
        client = self._client_factory()
        try:
            while True:
                stepped.wait(interval)
                if done.is_set():
                    return
                stepped.clear()
                try:
                    reply = client.heartbeat(lease.job_id, lease.lease_token, progress[0])
                except LeaseLost:
                    log.warning(
                        "job %s: lease lost (re-leased or finished elsewhere); stopping", lease.job_id
                    )
                    flag.trigger("lease lost")
                    return
                except Exception as e:  # noqa: BLE001 - keep trying until the lease expires
                    self.metrics.heartbeat_errors.labels(self.model).inc()
                    log.warning("job %s: heartbeat failed: %s", lease.job_id, e)
                    continue
                if reply.action == HeartbeatAction.CANCEL:
                    log.info("job %s: cancel requested; stopping at the next step", lease.job_id)
                    flag.trigger("cancelled")
                if done.wait(self.settings.progress_seconds):
                    return
        finally:
            client.close()

    def _stopped(self, lease: Lease, flag: CancelFlag, e: JobCancelled) -> str:
        reason = flag.reason
        log.info("job %s stopped at step %d (%s)", lease.job_id, e.step, reason)
        if reason == "lease lost":
            return "lost"
        # Cancelled: release acknowledges it (the gateway ends the job as cancelled).
        # Draining: release hands the job back to the queue for another worker.
        self._release(lease, "cancelled by its owner" if reason == "cancelled" else "worker draining")
        return "cancelled" if reason == "cancelled" else "released"

    def _release(self, lease: Lease, reason: str) -> None:
        try:
            self.client.release(lease.job_id, lease.lease_token, reason=reason)
        except LeaseLost:
            pass
        except Exception as e:  # noqa: BLE001 - the lease will expire and re-queue the job
            log.warning(
                "job %s: release failed (%s); it returns to the queue when its lease expires", lease.job_id, e
            )

    def _fail(self, lease: Lease, message: str, client: WorkerAPIClient | None = None) -> str:
        log.warning("job %s failed: %s", lease.job_id, message)
        try:
            (client or self.client).fail(lease.job_id, lease.lease_token, message[:4000], retryable=False)
        except LeaseLost:
            return "lost"
        except Exception as e:  # noqa: BLE001
            log.warning("job %s: could not report the failure (%s); the lease will expire", lease.job_id, e)
        return "failed"

    def _complete(self, lease: Lease, image: bytes, media_type: str) -> str:
        deadline = time.monotonic() + self.settings.complete_retry_seconds
        delay = 0.5
        while True:
            try:
                self._delivery.complete(lease.job_id, lease.lease_token, image, media_type)
                return "succeeded"
            except LeaseLost:
                log.warning("job %s: finished, but the lease was lost; result dropped", lease.job_id)
                return "lost"
            except httpx.HTTPStatusError as e:
                if e.response.status_code < 500 or time.monotonic() > deadline:
                    log.error(
                        "job %s: complete refused: HTTP %s %s",
                        lease.job_id,
                        e.response.status_code,
                        e.response.text[:300],
                    )
                    return "lost"
                # The gateway could not store it (its object store is down, say): the lease
                # is still renewed, so the same upload is sent again until the deadline.
                log.warning(
                    "job %s: the result upload failed (HTTP %s: %s); sending it again in %.1fs",
                    lease.job_id,
                    e.response.status_code,
                    e.response.text[:200],
                    delay,
                )
            except httpx.HTTPError as e:
                if time.monotonic() > deadline:
                    log.error("job %s: could not deliver the result (%s); lease will expire", lease.job_id, e)
                    return "lost"
                log.warning(
                    "job %s: the result upload failed (%s); sending it again in %.1fs", lease.job_id, e, delay
                )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
