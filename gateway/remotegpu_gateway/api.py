"""The public Image API: submit, job status, cancel, result, model catalog, and the
extensions (gateway/README.md): job listing, live events (SSE), webhook deliveries,
Idempotency-Key and `Prefer: wait` on submit."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from remotegpu_base.catalog import ImageModel

from remotegpu_gateway import validation
from remotegpu_gateway.auth import authorize, bearer, gateway, require_scope
from remotegpu_gateway.core import Gateway
from remotegpu_gateway.errors import ApiError
from remotegpu_gateway.limits import Admission
from remotegpu_gateway.notify import wait_event
from remotegpu_gateway.schemas import (
    CancelResponse,
    EnqueueResponse,
    ErrorResponse,
    ImageRequest,
    JobListResponse,
    JobStatusResponse,
    JobTimelineResponse,
    ModelsResponse,
    WebhookDeliveries,
    inline_schema,
)
from remotegpu_gateway.storage import StorageError, result_media_type
from remotegpu_gateway.store import (
    PENDING,
    PRIORITIES,
    SUCCEEDED,
    TERMINAL_STATES,
    Idempotency,
    IdempotencyConflict,
    JobOptions,
    JobRecord,
    KeyRecord,
    NewJob,
)
from remotegpu_gateway.webhooks import destination_problem, parse_networks

T = TypeVar("T")
log = logging.getLogger("remotegpu_gateway")
router = APIRouter(prefix="/v1/inference", tags=["inference"])
inference_key = require_scope("inference")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Valid JSON, but invalid for the selected model or endpoint",
        401: "Missing, invalid, revoked or expired API key",
        403: "The API key does not allow inference APIs",
        429: "Over one of the API key's limits (extension): Retry-After and the RateLimit headers say when",
        404: "No such job for this API key",
        409: "Conflict with the job's state",
        413: "Request body too large",
        422: "Request validation failed",
        500: "Storage or server failure; nothing was accepted",
        503: "The selected model exists but is unavailable for serving",
    }
    return {c: {"model": ErrorResponse, "description": text[c]} for c in codes}


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


# The extensions' response headers of a submit (each only when its extension applies).
_SUBMIT_HEADERS = {
    "Idempotent-Replayed": _header("`true` when an `Idempotency-Key` returned its original job"),
    "Preference-Applied": _header("`wait=N` when the request sent `Prefer: wait=N` (N capped at 60)"),
    "RateLimit-Policy": _header("the key's limits (IETF draft), for a key with limits"),
    "RateLimit": _header("what is left of them (IETF draft), for a key with limits"),
}


def base_url(gw: Gateway, request: Request) -> str:
    return gw.settings.public_url or str(request.base_url)


async def owned_job(gw: Gateway, job_id: str, owner: str | None) -> JobRecord:
    """The job if this owner (an API key's id) may see it; 404 otherwise."""
    job = await anyio.to_thread.run_sync(gw.store.get_job, job_id, owner)
    if job is None:
        raise ApiError(404, f"no job {job_id} for this API key", "job_id")
    return job


@router.post(
    "/image",
    status_code=202,
    response_model=EnqueueResponse,
    responses={
        200: {
            "model": JobStatusResponse,
            "description": "Extension, only with `Prefer: wait=N`: the job finished within N s; its final status",
            "headers": _SUBMIT_HEADERS,
        },
        202: {"headers": _SUBMIT_HEADERS},
        **_errors(400, 401, 403, 413, 422, 429, 500, 503),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(ImageRequest)}},
        }
    },
    summary="Submit an image generation job",
    description=(
        "Accepts the job and returns 202 with `job_id`, `job_type` and `result_url`; poll "
        "`GET /v1/inference/jobs/{job_id}` until it is terminal. Validation order: 422 for request "
        "validation (malformed JSON, missing or empty `prompt`/`model`, wrong types, unknown fields, legacy "
        "top-level `width`/`height`, a `size` outside the presets or the model's allowed sizes); 400 for the "
        "retired `remove_bg` field, an unknown `model`, and values invalid for the model (prompt or "
        "negative prompt too long, negative prompt unsupported, steps or guidance out of range, a changed "
        "fixed guidance, input image count outside the model's limits); 503 if the model exists but is "
        "unavailable here; then the input images are decoded: 400 if one is not base64, not a PNG/JPEG/WebP "
        "image or exceeds 8192 px per axis, 422 if its dimensions are not an allowed size preset (strict "
        "mode: images are never resized). 500 if storing the images fails; nothing is queued then. 429 when the "
        "API key is over one of its limits (requests per minute, concurrent unfinished jobs, GPU-seconds per "
        "day), with `Retry-After`; a key with limits gets the IETF `RateLimit-Policy` and `RateLimit` headers "
        "on every answer of this endpoint.\n\n"
        "Extensions (optional): the body fields `priority`, `deadline_seconds`, `webhook_url`, `webhook_events`, "
        "`output_format` (`png` default, `jpeg`, `webp`; the result URL serves that content type) and "
        "`output_quality` (jpeg/webp 1-100, default 90; 400 with png); "
        "the header `Idempotency-Key` (1-255 printable ASCII characters): the same key with the same body within "
        "24 h answers 202 with the original `job_id` (and `Idempotent-Replayed: true`), the same key with another "
        "body 422 (`idempotency_key_reused`); keys are per API key. The header `Prefer: wait=N` (N up to 60 s): if "
        "the job finishes within N s the answer is 200 with its final status (the job status object), otherwise "
        "the usual 202."
    ),
)
async def submit(
    request: Request,
    idempotency_key: str | None = Header(default=None, include_in_schema=True),
    prefer: str | None = Header(default=None),
) -> JSONResponse:
    gw = gateway(request)
    key = await authorize(request, "inference")  # before a byte of the body is read
    idem = _idempotency(idempotency_key)
    admission = await anyio.to_thread.run_sync(gw.limits.count_request, key.id, limiter=gw.db_limiter)
    raw = await request.body()
    # Everything blocking (parsing, image decoding, storage, the insert) in one thread hop.
    submitted = await anyio.to_thread.run_sync(
        _submit, gw, key, raw, base_url(gw, request), idem, admission, limiter=gw.db_limiter
    )
    headers = admission.headers()
    if submitted.replayed:
        headers["Idempotent-Replayed"] = "true"
    else:
        if not gw.registry.has_ready_worker(submitted.model):
            gw.cold_starts.job_waits(submitted.model)
        gw.metrics.jobs_submitted.labels(submitted.model).inc()
        gw.notifier.bump(submitted.model)
    wait = _prefer_wait(prefer)
    if wait is not None:
        job = await _wait_finished(request, gw, submitted.job_id, key.id, submitted.model, wait)
        headers["Preference-Applied"] = f"wait={wait:g}"
        if job is not None:
            return JSONResponse(gw.job_view(job, base_url(gw, request)), status_code=200, headers=headers)
    return JSONResponse(
        {
            "job_id": submitted.job_id,
            "job_type": "image",
            "result_url": gw.result_url(submitted.job_id, base_url(gw, request)),
        },
        status_code=202,
        headers=headers,
    )


MAX_PREFER_WAIT = 60.0
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def _idempotency(header: str | None) -> str | None:
    if header is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(header):
        raise ApiError(400, "Idempotency-Key must be 1 to 255 printable ASCII characters", "Idempotency-Key")
    return header


def _prefer_wait(header: str | None) -> float | None:
    """`Prefer: wait=N` (RFC 7240) -> N capped at 60; None when absent or not a number."""
    for pref in (header or "").split(","):
        name, _, value = pref.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                return max(0.0, min(MAX_PREFER_WAIT, float(value.strip().strip('"'))))
            except ValueError:
                return None
    return None


async def _wait_finished(
    request: Request, gw: Gateway, job_id: str, owner: str, model: str, seconds: float
) -> JobRecord | None:
    """The job once finished, or None if it has not within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        ev = gw.notifier.job_event(job_id, model)
        job = await anyio.to_thread.run_sync(gw.store.get_job, job_id, owner)
        if job is None or job.status in TERMINAL_STATES:
            return job
        remaining = deadline - time.monotonic()
        if remaining <= 0 or gw.notifier.closing or await request.is_disconnected():
            return None
        await wait_event(ev, min(remaining, gw.settings.poll_interval_seconds))


@dataclass
class Submitted:
    job_id: str
    model: str
    replayed: bool = False


def _submit(
    gw: Gateway, key: KeyRecord, raw: bytes, base: str, idempotency_key: str | None, admission: Admission
) -> Submitted:
    idem = None
    if idempotency_key is not None:
        idem = Idempotency(idempotency_key, hashlib.sha256(raw).hexdigest())
        original = _original(gw, key, idem)
        if original is not None:
            return original
    req = validation.check_request(validation.parse_body(raw))
    entry = model_entry(gw, req.model)
    resolved = validation.check_for_model(req, entry)
    check_available(gw, entry)
    options = _options(gw, key, req, base)
    job_id = str(uuid.uuid4())
    image_keys = store_input_images(gw, job_id, req.input_images_base64 or [], entry, "input_images_base64")
    new = NewJob(
        owner_key_id=key.id,
        model=entry.spec.model,
        request=resolved,
        input_image_keys=image_keys,
        job_id=job_id,
        options=options,
        idempotency=idem,
    )
    try:
        queue_jobs(gw, admission, [new])
    except sa.exc.IntegrityError:
        if idem is None:
            raise
        # The same key raced in from another request: that one's job is the job.
        original = _original(gw, key, idem)
        if original is None:
            raise
        return original
    return Submitted(job_id, entry.spec.model)


def _original(gw: Gateway, key: KeyRecord, idem: Idempotency) -> Submitted | None:
    try:
        job = gw.store.idempotent_job(key.id, idem)
    except IdempotencyConflict:
        raise ApiError(
            422,
            "this Idempotency-Key was used with a different request body; use a new key for a new request",
            "Idempotency-Key",
            type="idempotency_key_reused",
        ) from None
    return Submitted(job.id, job.model, replayed=True) if job is not None else None


def _options(gw: Gateway, key: KeyRecord, req: ImageRequest, base: str) -> JobOptions:
    """The submit's extensions, checked: 400 for a webhook the gateway will not call."""
    options = JobOptions(
        priority=PRIORITIES[req.priority or "normal"],
        deadline_seconds=req.deadline_seconds,
        base_url=base,
    )
    if req.webhook_url is not None:
        allowed = parse_networks(gw.settings.webhook_allowed_networks)
        problem = destination_problem(req.webhook_url, allowed, resolve=False)
        if problem:
            raise ApiError(400, problem, "webhook_url")
        if gw.store.webhook_secret(key.id) is None:
            raise ApiError(
                400,
                "this API key has no webhook secret to sign webhooks with; create one with "
                "`remotegpu keys webhook-secret NAME` or POST /v1/admin/keys/{key_id}/webhook-secret",
                "webhook_url",
            )
        options.webhook_url = req.webhook_url
        options.webhook_events = sorted(set(req.webhook_events)) if req.webhook_events else None
    elif req.webhook_events is not None:
        raise ApiError(400, "webhook_events needs a webhook_url", "webhook_events")
    return options


PUBLIC_STATUSES = ("queued", "warming", "running", "succeeded", "failed", "cancelled")


@router.get(
    "/jobs",
    response_model=JobListResponse,
    response_model_exclude_unset=True,
    responses=_errors(401, 403, 422),
    summary="List the caller's jobs (extension)",
    description="Extension. The API key's jobs, newest first, optionally filtered by `status` (one of the job "
    "statuses; repeatable or comma-separated) and `model`; `limit` per page (1-200, default 50). Pass "
    "`next_cursor` back as `cursor` for the next page; it is null on the last page. A page may hold fewer than "
    "`limit` jobs when filtering by `queued` or `warming`.",
)
async def list_jobs(
    request: Request,
    key: KeyRecord = Depends(inference_key),
    status: list[str] | None = Query(default=None),
    model: str | None = Query(default=None),
    limit: int = Query(default=50, ge=1, le=200),
    cursor: str | None = Query(default=None),
) -> dict[str, Any]:
    gw = gateway(request)
    wanted = {s.strip() for v in status or [] for s in v.split(",") if s.strip()}
    bad = sorted(wanted - set(PUBLIC_STATUSES))
    if bad:
        raise ApiError(422, f"unknown status {bad[0]!r}; one of: {', '.join(PUBLIC_STATUSES)}", "status")
    internal = sorted({PENDING if s in ("queued", "warming") else s for s in wanted})
    after = _parse_cursor(cursor) if cursor else None
    rows = await anyio.to_thread.run_sync(
        lambda: gw.store.list_jobs(key.id, statuses=internal or None, model=model, after=after, limit=limit)
    )
    base = base_url(gw, request)
    views = [gw.job_view(j, base) for j in rows]
    if wanted:
        views = [v for v in views if v["status"] in wanted]
    next_cursor = _cursor(rows[-1]) if len(rows) == limit else None
    return {"jobs": views, "next_cursor": next_cursor}


def _cursor(job: JobRecord) -> str:
    return base64.urlsafe_b64encode(json.dumps([job.created_at, job.id]).encode()).decode().rstrip("=")


def _parse_cursor(cursor: str) -> tuple[float, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return float(created), str(job_id)
    except (ValueError, TypeError, binascii.Error):
        raise ApiError(
            422, "cursor is not one this API returned; pass next_cursor unchanged", "cursor"
        ) from None


def model_entry(gw: Gateway, model: str) -> ImageModel:
    """The model's catalog entry; 400 if there is none."""
    entry = gw.catalog.get(model)
    if entry is None:
        raise ApiError(
            400,
            f"unknown model {model!r}; GET /v1/inference/models lists the supported models",
            "model",
        )
    return entry


def check_available(gw: Gateway, entry: ImageModel) -> None:
    """503 if the model cannot be served here."""
    available, reason = gw.registry.availability(entry.spec.model)
    if not available:
        raise ApiError(
            503,
            f"model {entry.spec.model} is unavailable for serving: {reason or 'no reason given'}",
            "model",
        )


def store_input_images(
    gw: Gateway, job_id: str, items: list[str], entry: ImageModel, field: str
) -> list[str]:
    """Decodes (400/422) and stores a job's input images (500 if storing fails); their keys."""
    if not items:
        return []
    images = validation.decode_images(items, entry.spec.parameters.size.allowed)
    image_keys = [f"inputs/{job_id}/{i}" for i in range(len(images))]
    try:
        for k, data in zip(image_keys, images, strict=True):
            gw.storage.put(k, data)
    except StorageError as e:
        log.error("job %s: storing its input images failed, nothing queued: %s", job_id, e)
        raise ApiError(500, "could not store the input images; nothing was queued", field) from None
    return image_keys


def queue_jobs(gw: Gateway, admission: Admission, new: list[NewJob]) -> None:
    """Queues the jobs all or none, within the key's limits (429); if they are refused (or
    the insert fails), their stored input images are deleted."""
    try:
        gw.store.create_jobs(new, admit=admission.admit if admission.limits_jobs else None)
    except Exception:
        for job in new:
            for k in job.input_image_keys:
                with contextlib.suppress(StorageError):
                    gw.storage.delete(k)
        raise


@router.get(
    "/jobs/{job_id}",
    response_model=JobStatusResponse,
    response_model_exclude_unset=True,
    responses=_errors(401, 403, 404),
    summary="Job status (lightweight; result_url only once succeeded)",
    description="`queued`: its model has a ready worker; `warming`: capacity is being acquired. "
    "`wait_ms` is the time before running, `run_ms` the time in running (0 before). Jobs of other keys are 404, "
    "and so are finished jobs past the retention period (default 7 days). Extension: while the job has not "
    "finished, `queue_position` (waiting jobs of the model taken first; null once running), "
    "`estimated_start_at` and `estimated_completion_at` (null until estimable: from the queue, the model's "
    "ready workers, running jobs' progress and recent run times).",
)
async def job_status(
    job_id: str, request: Request, key: KeyRecord = Depends(inference_key)
) -> dict[str, Any]:
    gw = gateway(request)
    job = await owned_job(gw, job_id, key.id)
    return await anyio.to_thread.run_sync(gw.job_view_with_eta, job, base_url(gw, request))


@router.get(
    "/jobs/{job_id}/timeline",
    response_model=JobTimelineResponse,
    responses=_errors(401, 403, 404),
    summary="A job's cold-start timeline (extension)",
    description="Extension. For a job that waited for capacity (submitted before the worker that ran it was "
    "ready): when that worker reached each phase of its cold start, in order: `scale_decision` (the operator "
    "raised the replicas), `pod_scheduled`, `container_started` (the pod's first container: the weights "
    "fetcher's with a model cache), `weights_fetched` (only when the fetcher downloaded weights, not when the "
    "node had them), `process_started`, `weights_loaded`, `warmed` (compiled and warmed up) and "
    "`first_lease`. `seconds` is each phase's time since the phase before it. A phase nobody reported is "
    "missing (a worker outside Kubernetes has no pod phases). `waited_for_capacity` is false (and `phases` "
    "empty) for a job a ready worker took, null before the job is running. Same rules as the job status: "
    "jobs of other keys are 404.",
)
async def job_timeline(
    job_id: str, request: Request, key: KeyRecord = Depends(inference_key)
) -> dict[str, Any]:
    gw = gateway(request)
    job = await owned_job(gw, job_id, key.id)
    return await anyio.to_thread.run_sync(gw.timelines.timeline, job)


SSE_KEEPALIVE_SECONDS = 15.0
ETA_FIELDS = ("queue_position", "estimated_start_at", "estimated_completion_at")


@router.get(
    "/jobs/{job_id}/events",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The job's events (Server-Sent Events)"},
        **_errors(401, 403, 404),
    },
    response_class=StreamingResponse,
    summary="Live job events (extension; Server-Sent Events)",
    description="Extension. `event: status` (data: the job status object with the ETA fields) when the status "
    "changes, first on connect; `event: queue` (`queue_position`, `estimated_start_at`, "
    "`estimated_completion_at`) when the job's place in the queue moves; `event: progress` (`step`, "
    "`total_steps`) per denoising step while it runs. After the final `status` event the stream ends. Every "
    "event's `id` is the job's revision: reconnecting with `Last-Event-ID` skips what did not change since.",
)
async def job_events(
    job_id: str,
    request: Request,
    key: KeyRecord = Depends(inference_key),
    last_event_id: str | None = Header(default=None),
) -> StreamingResponse:
    gw = gateway(request)
    job = await owned_job(gw, job_id, key.id)
    try:
        seen = int(last_event_id) if last_event_id else -1
    except ValueError:
        seen = -1
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(
        _events(request, gw, job, seen, base_url(gw, request)),
        media_type="text/event-stream",
        headers=headers,
    )


def _sse(event: str, revision: int, data: dict[str, Any]) -> bytes:
    return f"event: {event}\nid: {revision}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _Seen:
    """What a stream's client has seen; `news` gives the events a fresh read of the job adds.
    Progress always moves the job's revision; queued <-> warming (the model's state) and
    the queue position do not, so they are compared as they are."""

    def __init__(self, last_event_id: int):
        self.revision = last_event_id
        self.status: str | None = None
        self.progress: tuple[int | None, int | None] = (None, None)
        self.place: int | None = None

    def news(self, job: JobRecord, view: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        progress = (job.progress_step, job.progress_total)
        if self.status is None and 0 <= job.revision <= self.revision:
            self.status, self.progress = view["status"], progress  # resumed: seen already
        out: list[tuple[str, dict[str, Any]]] = []
        if view["status"] != self.status:
            self.status = view["status"]
            out.append(("status", view))
        if job.progress_step is not None and progress != self.progress:
            out.append(("progress", {"step": job.progress_step, "total_steps": job.progress_total}))
        self.progress = progress
        place = view.get("queue_position") if job.status == PENDING else None
        if place != self.place:
            self.place = place
            if not out and place is not None:
                out.append(("queue", {k: view.get(k) for k in ETA_FIELDS}))
        self.revision = max(self.revision, job.revision)
        return out


async def _events(
    request: Request, gw: Gateway, job: JobRecord, last_event_id: int, base: str
) -> AsyncIterator[bytes]:
    """The job's changes as SSE until it ends; the store is re-read on every wake-up (a
    change on this replica, or LISTEN/NOTIFY from another) and at the poll interval."""
    seen = _Seen(last_event_id)
    last_sent = time.monotonic()
    yield b"retry: 1000\n\n"
    while True:
        ev = gw.notifier.job_event(job.id, job.model)
        current = await anyio.to_thread.run_sync(gw.store.get_job, job.id, None)
        if current is None:  # purged meanwhile
            return
        job = current
        view = await anyio.to_thread.run_sync(gw.job_view_with_eta, job, base)
        for event, data in seen.news(job, view):
            yield _sse(event, job.revision, data)
            last_sent = time.monotonic()
        if job.status in TERMINAL_STATES:
            return
        if time.monotonic() - last_sent >= SSE_KEEPALIVE_SECONDS:
            yield b": keep-alive\n\n"
            last_sent = time.monotonic()
        if gw.notifier.closing or await request.is_disconnected():
            return
        await wait_event(ev, gw.settings.poll_interval_seconds)


@router.get(
    "/jobs/{job_id}/webhooks",
    response_model=WebhookDeliveries,
    responses=_errors(401, 403, 404),
    summary="The job's webhook deliveries (extension)",
    description="Extension. Each webhook the job caused: its id (the `webhook-id` header), event, status "
    "(`pending`, `delivered`, `failed` once out of retries), attempts, the last answer's HTTP code or error, "
    "and when it is tried next.",
)
async def job_webhooks(
    job_id: str, request: Request, key: KeyRecord = Depends(inference_key)
) -> dict[str, Any]:
    gw = gateway(request)
    await owned_job(gw, job_id, key.id)  # 404 for jobs of other keys
    deliveries = await anyio.to_thread.run_sync(gw.store.deliveries, job_id)
    return {"deliveries": [d.public() for d in deliveries]}


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=CancelResponse,
    response_model_exclude_unset=True,
    responses=_errors(401, 403, 404, 409),
    summary="Cancel a job",
    description="A queued or warming job becomes `cancelled` at once (`cancel: cancelled`). A running job is "
    "cancelled by its worker at its next step (`cancel: requested`; the status stays `running` until then). "
    "Cancelling a cancelled job changes nothing (200, `cancel: already_cancelled`); cancelling a succeeded or "
    "failed job changes nothing and answers 409 saying so.",
)
async def cancel(job_id: str, request: Request, key: KeyRecord = Depends(inference_key)) -> dict[str, Any]:
    gw = gateway(request)
    outcome = await anyio.to_thread.run_sync(gw.store.cancel_job, job_id, key.id)
    if outcome is None:
        raise ApiError(404, f"no job {job_id} for this API key", "job_id")
    job = outcome.job
    if outcome.outcome == "finished":
        raise ApiError(409, f"job {job_id} already {job.status}; cancelling changes nothing", "job_id")
    if outcome.outcome == "cancelled":
        gw.metrics.finished(job.model, "cancelled", None, None)
        await anyio.to_thread.run_sync(gw.usage.record, [job])
        gw.notifier.bump(job.model)
        message = "job cancelled"
    elif outcome.outcome == "requested":
        message = "cancellation requested; the worker stops at its next step"
    else:
        message = "job was already cancelled; nothing changed"
    return {**gw.job_view(job, base_url(gw, request)), "cancel": outcome.outcome, "message": message}


RESULT_HEADERS = {"Cache-Control": "private, max-age=3600"}


@router.get(
    "/jobs/{job_id}/result",
    responses={
        200: {
            "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
            "description": "The image, in the request's output_format (default PNG)",
        },
        **_errors(401, 403, 404, 409),
    },
    response_class=Response,
    summary="The result image (the job's result_url)",
    description="Authorised by the signed, expiring query of `result_url`, or by the owner's API key. 409 while "
    "the job has not succeeded. HEAD answers the same status and headers without the image.",
)
async def result(
    job_id: str,
    request: Request,
    expires: int | None = Query(default=None),
    signature: str | None = Query(default=None),
) -> Response:
    gw = gateway(request)
    result_key = await _result_key(request, job_id, expires, signature)
    data = await _read_result(job_id, gw.storage.get, result_key)
    return Response(data, media_type=result_media_type(result_key), headers=RESULT_HEADERS)


@router.head("/jobs/{job_id}/result", include_in_schema=False)
async def result_head(
    job_id: str,
    request: Request,
    expires: int | None = Query(default=None),
    signature: str | None = Query(default=None),
) -> Response:
    """GET's status and headers; the image's size from storage, not the image."""
    gw = gateway(request)
    result_key = await _result_key(request, job_id, expires, signature)
    size = await _read_result(job_id, gw.storage.size, result_key)
    return Response(
        media_type=result_media_type(result_key), headers={**RESULT_HEADERS, "Content-Length": str(size)}
    )


async def _result_key(request: Request, job_id: str, expires: int | None, signature: str | None) -> str:
    """The storage key of a succeeded job's image, for a signed URL or the owner's key."""
    gw = gateway(request)
    owner: str | None = None
    if gw.signer.verify(job_id, expires, signature):
        owner = None  # the signature is the authorisation
    elif bearer(request) is not None:
        owner = (await authorize(request, "inference")).id
    elif signature is not None or expires is not None:
        raise ApiError(
            401,
            "result URL signature is invalid or expired; get a fresh result_url from the job status",
            "signature",
        )
    else:
        raise ApiError(401, "send the signed result_url or Authorization: Bearer <api-key>", "Authorization")
    job = await owned_job(gw, job_id, owner)
    if job.status != SUCCEEDED or job.result_key is None:
        raise ApiError(
            409, f"job {job_id} is {gw.public_status(job)}; the result exists once it succeeded", "job_id"
        )
    return job.result_key


async def _read_result(job_id: str, read: Callable[[str], T], result_key: str) -> T:
    try:
        return await anyio.to_thread.run_sync(read, result_key)
    except StorageError as e:
        log.error("job %s: reading its result failed: %s", job_id, e)
        raise ApiError(500, "the result image could not be read from storage") from None


@router.get(
    "/models",
    response_model=ModelsResponse,
    summary="The model catalog (public)",
    description="Every model with its public parameters (defaults, limits, allowed sizes, input image count), "
    "runtime state (`ready`, `starting`, `sleeping`; `available` is false with a reason when the model cannot be "
    "served here) and recent wait/run/total time summaries (count, p50, p95 in ms over `window_seconds`, "
    "succeeded jobs).",
)
async def models(request: Request) -> dict[str, Any]:
    gw = gateway(request)
    return await anyio.to_thread.run_sync(gw.models_view)
