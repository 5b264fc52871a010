"""The public Image API: submit, job status, cancel, result, model catalog."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from remotegpu_base.catalog import ImageModel

from remotegpu_gateway import validation
from remotegpu_gateway.auth import authorize, bearer, gateway, require_scope
from remotegpu_gateway.core import Gateway
from remotegpu_gateway.errors import ApiError
from remotegpu_gateway.limits import Admission
from remotegpu_gateway.schemas import (
    CancelResponse,
    EnqueueResponse,
    ErrorResponse,
    ImageRequest,
    JobStatusResponse,
    ModelsResponse,
    inline_schema,
)
from remotegpu_gateway.storage import StorageError, result_media_type
from remotegpu_gateway.store import SUCCEEDED, KeyRecord

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


def base_url(gw: Gateway, request: Request) -> str:
    return gw.settings.public_url or str(request.base_url)


@router.post(
    "/image",
    status_code=202,
    response_model=EnqueueResponse,
    responses=_errors(400, 401, 403, 413, 422, 429, 500, 503),
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
        "mode: images are never resized). 500 if storing the images fails; nothing is queued then. "
        "Extensions: `output_format` (`png` default, `jpeg`, `webp`; the result URL serves that content type) and "
        "`output_quality` (jpeg/webp 1-100, default 90; 400 with png). 429 when the API key is over one of its "
        "limits (requests per minute, concurrent unfinished jobs, GPU-seconds per day), with `Retry-After`; a key "
        "with limits gets the IETF `RateLimit-Policy` and `RateLimit` headers on every answer of this endpoint."
    ),
)
async def submit(request: Request) -> JSONResponse:
    gw = gateway(request)
    key = await authorize(request, "inference")  # before a byte of the body is read
    admission = await anyio.to_thread.run_sync(gw.limits.count_request, key.id, limiter=gw.db_limiter)
    raw = await request.body()
    # Everything blocking (parsing, image decoding, storage, the insert) in one thread hop.
    job_id, model = await anyio.to_thread.run_sync(_submit, gw, key, raw, admission, limiter=gw.db_limiter)
    gw.metrics.jobs_submitted.labels(model).inc()
    gw.notifier.bump(model)
    return JSONResponse(
        {"job_id": job_id, "job_type": "image", "result_url": gw.result_url(job_id, base_url(gw, request))},
        status_code=202,
        headers=admission.headers(),
    )


def _submit(gw: Gateway, key: KeyRecord, raw: bytes, admission: Admission) -> tuple[str, str]:
    req = validation.check_request(validation.parse_body(raw))
    entry = model_entry(gw, req.model)
    resolved = validation.check_for_model(req, entry)
    check_available(gw, entry)
    job_id = str(uuid.uuid4())
    image_keys = store_input_images(gw, job_id, req.input_images_base64 or [], entry, "input_images_base64")
    queue_jobs(gw, admission, [(job_id, entry.spec.model, resolved, image_keys)])
    return job_id, entry.spec.model


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


def queue_jobs(
    gw: Gateway, admission: Admission, new: list[tuple[str, str, dict[str, Any], list[str]]]
) -> None:
    """Queues (job_id, model, resolved request, input image keys) all or none, within the
    key's limits (429); a refused job's stored images are deleted."""
    try:
        gw.store.create_jobs(
            [
                dict(
                    owner_key_id=admission.key_id,
                    model=model,
                    request=req,
                    input_image_keys=keys,
                    job_id=job_id,
                )
                for job_id, model, req, keys in new
            ],
            admit=admission.admit if admission.limits_jobs else None,
        )
    except ApiError:
        for _, _, _, keys in new:
            for k in keys:
                with contextlib.suppress(StorageError):
                    gw.storage.delete(k)
        raise


@router.get(
    "/jobs/{job_id}",
    response_model=JobStatusResponse,
    responses=_errors(401, 403, 404),
    summary="Job status (lightweight; result_url only once succeeded)",
    description="`queued`: its model has a ready worker; `warming`: capacity is being acquired. "
    "`wait_ms` is the time before running, `run_ms` the time in running (0 before). Jobs of other keys are 404, "
    "and so are finished jobs past the retention period (default 7 days).",
)
async def job_status(
    job_id: str, request: Request, key: KeyRecord = Depends(inference_key)
) -> dict[str, Any]:
    gw = gateway(request)
    job = await anyio.to_thread.run_sync(gw.store.get_job, job_id, key.id)
    if job is None:
        raise ApiError(404, f"no job {job_id} for this API key", "job_id")
    return gw.job_view(job, base_url(gw, request))


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=CancelResponse,
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
    job = await anyio.to_thread.run_sync(gw.store.get_job, job_id, owner)
    if job is None:
        raise ApiError(404, f"no job {job_id} for this API key", "job_id")
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
