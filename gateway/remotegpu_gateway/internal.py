"""The internal worker API (remotegpu_base.protocol), authenticated by the worker token."""

from __future__ import annotations

import hashlib
import logging
import time

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from remotegpu_base.protocol import (
    LEASE_TOKEN_HEADER,
    PREFIX,
    Failure,
    Heartbeat,
    HeartbeatAction,
    HeartbeatReply,
    Lease,
    LeaseRequest,
    QueueSnapshot,
    Release,
    RuntimeState,
    WorkerPhases,
    WorkerStatus,
    image_format,
)

from remotegpu_gateway.auth import auth_first, gateway, require_worker
from remotegpu_gateway.core import Gateway
from remotegpu_gateway.errors import ApiError, public_text
from remotegpu_gateway.notify import wait_event
from remotegpu_gateway.storage import StorageError, result_key
from remotegpu_gateway.store import TERMINAL_STATES, JobRecord, LeaseLostError

router = APIRouter(
    prefix=PREFIX, tags=["internal"], route_class=auth_first(require_worker), include_in_schema=False
)

log = logging.getLogger("remotegpu_gateway")


def _lost(e: LeaseLostError) -> ApiError:
    return ApiError(409, str(e), "lease_token", type="lease_lost")


async def _finished(gw: Gateway, job: JobRecord) -> None:
    if job.status in TERMINAL_STATES:
        gw.metrics.finished(job.model, job.status, job.started_at, job.completed_at)
        await anyio.to_thread.run_sync(gw.usage.record, [job])
    gw.notifier.bump(job.model)


@router.post(
    "/lease", response_model=Lease, responses={204: {"description": "nothing to do within wait_seconds"}}
)
async def lease(body: LeaseRequest, request: Request) -> Response:
    gw = gateway(request)
    s = gw.settings
    deadline = time.monotonic() + body.wait_seconds
    while True:
        if not gw.registry.worker_seen(body.model, body.worker_id):
            return Response(status_code=204)  # a draining worker: its poll ends now, without a job
        ev = gw.notifier.model_event(body.model)
        job = await anyio.to_thread.run_sync(gw.store.lease, body.model, body.worker_id, s.lease_ttl_seconds)
        if job is not None:
            gw.metrics.job_wait.labels(job.model).observe(
                max(0.0, (job.started_at or time.time()) - job.created_at)
            )
            gw.notifier.bump(job.model)
            await anyio.to_thread.run_sync(
                gw.timelines.leased, body.worker_id, job.model, job.started_at or gw.clock()
            )
            try:
                out = await anyio.to_thread.run_sync(gw.build_lease, job)
            except StorageError as e:
                # Hand the job back rather than let it wait for lease expiry.
                await anyio.to_thread.run_sync(gw.store.release, job.id, job.lease_token or "")
                raise ApiError(500, f"input images of job {job.id} unreadable: {e}") from None
            return Response(out.model_dump_json(), media_type="application/json")
        remaining = deadline - time.monotonic()
        if remaining <= 0 or gw.notifier.closing or await request.is_disconnected():
            return Response(status_code=204)
        await wait_event(ev, min(remaining, s.poll_interval_seconds))


@router.post("/jobs/{job_id}/heartbeat", response_model=HeartbeatReply)
async def heartbeat(job_id: str, body: Heartbeat, request: Request) -> HeartbeatReply:
    gw = gateway(request)
    progress = (body.progress.step, body.progress.total_steps) if body.progress else None
    try:
        cancel, expires = await anyio.to_thread.run_sync(
            gw.store.heartbeat, job_id, body.lease_token, gw.settings.lease_ttl_seconds, progress
        )
    except LeaseLostError as e:
        raise _lost(e) from None
    if progress is not None:
        gw.notifier.bump_job(job_id)  # its event streams on this replica (others hear NOTIFY)
    from datetime import UTC, datetime

    return HeartbeatReply(
        action=HeartbeatAction.CANCEL if cancel else HeartbeatAction.CONTINUE,
        lease_expires_at=datetime.fromtimestamp(expires, UTC),
    )


@router.post("/jobs/{job_id}/complete")
async def complete(job_id: str, request: Request) -> dict[str, str]:
    gw = gateway(request)
    token = request.headers.get(LEASE_TOKEN_HEADER)
    if not token:
        raise ApiError(422, f"missing {LEASE_TOKEN_HEADER} header", LEASE_TOKEN_HEADER)
    current = await anyio.to_thread.run_sync(gw.store.get_job, job_id, None)
    if current is None or current.lease_token != token or current.status != "running":
        raise ApiError(409, f"job {job_id}: stale or unknown lease token", "lease_token", type="lease_lost")
    image = await request.body()
    wanted = current.request.get("output_format", "png")
    if image_format(image) != wanted:
        raise ApiError(400, f"the result must be a {wanted} image (the job's output_format)", "body")
    key = result_key(job_id, hashlib.sha256(token.encode()).hexdigest()[:16], wanted)
    try:
        await anyio.to_thread.run_sync(gw.storage.put, key, image)
    except StorageError as e:
        raise ApiError(500, f"could not store the result: {e}") from None
    try:
        job = await anyio.to_thread.run_sync(gw.store.complete, job_id, token, key)
    except LeaseLostError as e:
        await anyio.to_thread.run_sync(gw.storage.delete, key)
        raise _lost(e) from None
    if job.status != "succeeded":
        await anyio.to_thread.run_sync(gw.storage.delete, key)
    await _finished(gw, job)
    return {"status": job.status}


@router.post("/jobs/{job_id}/fail")
async def fail(job_id: str, body: Failure, request: Request) -> dict[str, str]:
    gw = gateway(request)
    # The job's error_message is public: what the worker said, without internals; all of
    # it goes to the log with the job id.
    log.warning("job %s failed on its worker: %s", job_id, body.error_message)
    message = public_text(body.error_message)
    try:
        job = await anyio.to_thread.run_sync(gw.store.fail, job_id, body.lease_token, message, body.retryable)
    except LeaseLostError as e:
        raise _lost(e) from None
    await _finished(gw, job)
    return {"status": gw.public_status(job)}


@router.post("/jobs/{job_id}/release")
async def release(job_id: str, body: Release, request: Request) -> dict[str, str]:
    gw = gateway(request)
    try:
        job = await anyio.to_thread.run_sync(gw.store.release, job_id, body.lease_token)
    except LeaseLostError as e:
        raise _lost(e) from None
    await _finished(gw, job)
    return {"status": gw.public_status(job)}


@router.get("/queue", response_model=QueueSnapshot)
async def queue(
    request: Request,
    since: int | None = Query(default=None),
    wait_seconds: float = Query(default=0.0, ge=0, le=60),
) -> QueueSnapshot:
    """Queue depth per model; with `since`, waits until the version moves past it (or wait_seconds)."""
    gw = gateway(request)
    deadline = time.monotonic() + wait_seconds
    while since is not None and not gw.notifier.closing:
        ev = gw.notifier.any_event()
        if gw.notifier.version > since:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0 or await request.is_disconnected():
            break
        await wait_event(ev, remaining)
    return await anyio.to_thread.run_sync(gw.queue_snapshot)


@router.post("/workers/status")
async def worker_status(body: WorkerStatus, request: Request) -> dict[str, str]:
    gw = gateway(request)
    gw.registry.report_worker(body.model, body.worker_id, body.state)
    if body.load_failures:
        gw.registry.set_load_failures(body.model, body.load_failures)
    if body.state == RuntimeState.SLEEPING:
        if body.load_failures:  # the worker gave up: its jobs fail now, not at the start timeout
            message = f"{gw.no_start_reason(body.model)}; the job never started"
            await anyio.to_thread.run_sync(gw.fail_waiting, body.model, message)
        gw.notifier.bump(body.model)  # wakes that worker's lease poll, which then ends
    return {"state": gw.registry.state(body.model).value}


@router.post("/workers/phases")
async def worker_phases(body: WorkerPhases, request: Request) -> dict[str, str]:
    """A worker's cold-start phases, from the operator (pod) or the worker itself."""
    gw = gateway(request)
    await anyio.to_thread.run_sync(gw.timelines.record, body.worker_id, body.model, body.phases)
    return {"worker_id": body.worker_id}
