"""OpenAI-compatible Images API: what the official `openai` client (and open-webui,
LiteLLM, ...) sends, mapped onto the catalog's models and the job queue.

    POST /v1/images/generations   JSON: model, prompt, n, size "WxH", response_format, output_format, ...
    POST /v1/images/edits         multipart: image / image[] (the FLUX.1-Kontext / FLUX.2 references), ...
    GET  /v1/models               the catalog as OpenAI's model list

Each of the `n` images is one job of the Image API (same validation, limits and usage);
the request waits for all of them and answers in OpenAI's shape. Mapping:
- `model`: a catalog model ID (required: no default model is chosen for you);
- `size`: "WxH", one of the model's size presets; "auto" or absent: the model's default
  (for edits, the first image's size when the model allows it);
- `response_format`: `url` (default; the signed result_url) or `b64_json`;
- `output_format` png | jpeg | webp; `output_compression` 0-100 becomes the jpeg/webp
  quality 100 - compression (ignored for png);
- `quality`, `style`, `user`, `background`, `moderation`, `input_fidelity` and
  `safety_identifier` are accepted and ignored (FLUX has no equivalent; send `steps`,
  `guidance`, `seed` or `negative_prompt` as extra fields instead); `mask` and `stream`
  are refused (400).
Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; request
validation is 400 (where the Image API says 422), an unknown model 404.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel
from remotegpu_base.catalog import ImageModel
from starlette.datastructures import FormData, UploadFile

from remotegpu_gateway import validation
from remotegpu_gateway.api import base_url, check_available, queue_jobs, store_input_images
from remotegpu_gateway.auth import authorize, gateway
from remotegpu_gateway.core import Gateway
from remotegpu_gateway.errors import ApiError
from remotegpu_gateway.limits import Admission
from remotegpu_gateway.notify import wait_event
from remotegpu_gateway.schemas import SizeIn
from remotegpu_gateway.storage import StorageError
from remotegpu_gateway.store import CANCELLED, SUCCEEDED, TERMINAL_STATES, JobRecord, NewJob

log = logging.getLogger("remotegpu_gateway")
router = APIRouter(tags=["openai"])

MAX_N = 10
# Fields the client may send that have no FLUX equivalent: accepted, ignored.
IGNORED = ("quality", "style", "user", "background", "moderation", "input_fidelity", "safety_identifier")
# FLUX fields passed through as they are (extra fields of the openai client: extra_body).
PASSED = ("steps", "guidance", "seed", "negative_prompt")
GENERATION_FIELDS = (
    "model",
    "prompt",
    "n",
    "size",
    "response_format",
    "output_format",
    "output_compression",
    "partial_images",
    "stream",
    "mask",
    *IGNORED,
    *PASSED,
)
EDIT_FIELDS = (*GENERATION_FIELDS, "image")
# Our field names -> the OpenAI parameter a client sent.
PARAMS = {"input_images_base64": "image", "output_quality": "output_compression"}
_TYPES = {
    401: "invalid_request_error",
    403: "permission_error",
    429: "rate_limit_error",
    404: "invalid_request_error",
}
_CODES = {
    401: "invalid_api_key",
    404: "model_not_found",
    429: "rate_limit_exceeded",
    503: "model_unavailable",
}


def openai_error(e: ApiError) -> JSONResponse:
    """An ApiError in OpenAI's error shape and status codes (its 422s are 400s there)."""
    status = 400 if e.status == 422 else e.status
    param = e.field.split("[")[0].split(".")[0] if e.field else None
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {
        "error": {
            "message": e.message,
            "type": kind,
            "param": PARAMS.get(param or "", param),
            "code": _CODES.get(status),
        }
    }
    return JSONResponse(body, status_code=status, headers=e.headers)


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIError, "description": text}
    for code, text in {
        400: "Invalid request (OpenAI's 400 covers the Image API's 422s), or a job's input was bad",
        401: "Missing, invalid, revoked or expired API key (code invalid_api_key)",
        403: "The API key does not allow inference APIs",
        404: "Unknown model (code model_not_found)",
        413: "Request body too large (this service's error shape)",
        429: "Over one of the API key's limits; Retry-After and the RateLimit headers say when",
        500: "A job failed, or storage failed",
        503: "The model exists but is unavailable here",
        504: "The images were not ready in time; the jobs go on (poll them by id)",
    }.items()
}


@dataclass
class Plan:
    """One OpenAI request as Image API jobs."""

    entry: ImageModel
    requests: list[dict[str, Any]]  # the resolved request of each job
    images: list[str]  # input images (base64), shared by the jobs
    response_format: str
    output_format: str
    size: str


async def run(request: Request, parse: Any, known: tuple[str, ...]) -> JSONResponse:
    """Auth, limits, the body (`parse`), the jobs, the wait, the answer: errors in OpenAI's shape."""
    gw = gateway(request)
    try:
        key = await authorize(request, "inference")
        admission = await anyio.to_thread.run_sync(gw.limits.count_request, key.id, limiter=gw.db_limiter)
        fields = await parse(request)
        plan, job_ids = await anyio.to_thread.run_sync(
            _queue, gw, admission, fields, known, limiter=gw.db_limiter
        )
        gw.metrics.jobs_submitted.labels(plan.entry.spec.model).inc(len(job_ids))
        gw.notifier.bump(plan.entry.spec.model)
        jobs = await _wait(gw, request, key.id, plan.entry.spec.model, job_ids)
        data = await anyio.to_thread.run_sync(_images, gw, plan, jobs, base_url(gw, request))
    except ApiError as e:
        return openai_error(e)
    body = {"created": int(time.time()), "data": data, "output_format": plan.output_format, "size": plan.size}
    return JSONResponse(body, headers=admission.headers())  # the limits as they were at admission


@router.post(
    "/v1/images/generations",
    summary="OpenAI-compatible image generation (waits for the images)",
    description=__doc__,
    responses={
        200: {
            "description": "OpenAI's ImagesResponse: created, data[] (url or b64_json), output_format, size"
        },
        **ERRORS,
    },
)
async def generations(request: Request) -> JSONResponse:
    async def parse(req: Request) -> dict[str, Any]:
        return validation.parse_body(await req.body())

    return await run(request, parse, GENERATION_FIELDS)


@router.post(
    "/v1/images/edits",
    summary="OpenAI-compatible image edit (multipart; image / image[] are the reference images)",
    description=__doc__,
    responses={200: {"description": "OpenAI's ImagesResponse"}, **ERRORS},
)
async def edits(request: Request) -> JSONResponse:
    return await run(request, _parse_form, EDIT_FIELDS)


@router.get("/v1/models", summary="The catalog as OpenAI's model list (public)")
async def models(request: Request) -> dict[str, Any]:
    gw = gateway(request)
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "remotegpu"} for m in gw.catalog.ids()
        ],
    }


async def _parse_form(request: Request) -> dict[str, Any]:
    """The multipart form as fields; every `image` / `image[]` file as base64."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "send the edit as multipart/form-data (as the openai client does)", "image")
    try:
        form: FormData = await request.form(max_files=16, max_fields=64)
    except Exception as e:  # noqa: BLE001 - the multipart parser's errors: a bad body
        raise ApiError(400, f"the multipart body could not be read: {e}", "image") from None
    fields: dict[str, Any] = {}
    images: list[str] = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name not in ("image", "image[]"):
                raise ApiError(
                    400, f"unexpected file field {name!r}; send the images as image or image[]", name
                )
            images.append(base64.b64encode(await value.read()).decode())
        else:
            fields[name] = value
    await form.close()
    if not images:
        raise ApiError(400, "an edit needs at least one image (image or image[])", "image")
    fields["image"] = images
    for name in ("n", "output_compression", "steps", "seed", "partial_images"):
        if name in fields:
            fields[name] = _int(fields[name], name)
    if "guidance" in fields:
        try:
            fields["guidance"] = float(fields["guidance"])
        except ValueError:
            raise ApiError(400, "guidance must be a number", "guidance") from None
    if "stream" in fields:
        fields["stream"] = fields["stream"].lower() == "true"
    return fields


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer", name) from None


def _queue(
    gw: Gateway, admission: Admission, fields: dict[str, Any], known: tuple[str, ...]
) -> tuple[Plan, list[str]]:
    plan = _plan(gw, fields, known)
    job_ids = [str(uuid.uuid4()) for _ in plan.requests]
    new: list[NewJob] = []
    try:
        for job_id, req in zip(job_ids, plan.requests, strict=True):
            # Each job owns its copy of the reference images (the retention sweep deletes a job's own).
            keys = store_input_images(gw, job_id, plan.images, plan.entry, "image")
            new.append(NewJob(admission.key_id, plan.entry.spec.model, req, keys, job_id=job_id))
    except ApiError:
        for job in new:
            for k in job.input_image_keys:
                with contextlib.suppress(StorageError):
                    gw.storage.delete(k)
        raise
    queue_jobs(gw, admission, new)
    return plan, job_ids


def _plan(gw: Gateway, fields: dict[str, Any], known: tuple[str, ...]) -> Plan:
    unknown = [k for k in fields if k not in known]
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    if fields.get("stream"):
        raise ApiError(400, "streaming is not supported; omit stream", "stream")
    if fields.get("partial_images"):
        raise ApiError(400, "partial images are not supported; omit partial_images", "partial_images")
    if fields.get("mask") is not None:
        raise ApiError(400, "masks are not supported: FLUX edits follow the prompt; omit mask", "mask")
    model = fields.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(
            400, "model is required: name one of GET /v1/models (no default model is chosen)", "model"
        )
    n = 1 if fields.get("n") is None else fields["n"]
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be an integer from 1 to {MAX_N}", "n")
    response_format = fields.get("response_format") or "url"
    if response_format not in ("url", "b64_json"):
        raise ApiError(400, "response_format must be url or b64_json", "response_format")
    output_format = fields.get("output_format") or "png"
    if output_format not in ("png", "jpeg", "webp"):
        raise ApiError(400, "output_format must be png, jpeg or webp", "output_format")
    body: dict[str, Any] = {"prompt": fields.get("prompt"), "model": model, "output_format": output_format}
    compression = fields.get("output_compression")
    if compression is not None and output_format != "png":
        if not isinstance(compression, int) or isinstance(compression, bool) or not 0 <= compression <= 100:
            raise ApiError(400, "output_compression must be an integer from 0 to 100", "output_compression")
        body["output_quality"] = max(1, 100 - compression)
    body.update({name: fields[name] for name in PASSED if fields.get(name) is not None})
    images: list[str] = fields.get("image") or []
    if images:
        body["input_images_base64"] = images
    req = validation.check_request(body)
    entry = gw.catalog.get(model)
    if entry is None:
        raise ApiError(
            404, f"The model `{model}` does not exist; GET /v1/models lists the models served here", "model"
        )
    size = _size(fields.get("size"), entry, images)
    if size is not None:
        req = req.model_copy(update={"size": size})
    resolved = validation.check_for_model(req, entry)
    check_available(gw, entry)
    # Image i gets seed + i: n different images, all reproducible from the first one's seed.
    requests = [{**resolved, "seed": (resolved["seed"] + i) % 2**32} for i in range(n)]
    return Plan(
        entry=entry,
        requests=requests,
        images=images,
        response_format=response_format,
        output_format=output_format,
        size=f"{resolved['width']}x{resolved['height']}",
    )


def _image_size(item: str) -> str | None:
    """An uploaded image's "WxH" from its header, or None if it is not an image."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(item)), formats=validation.IMAGE_FORMATS) as im:
            return f"{im.size[0]}x{im.size[1]}"
    except Exception:  # noqa: BLE001 - validation reports a bad image properly later
        return None


def _size(text: Any, entry: ImageModel, images: list[str]) -> SizeIn | None:
    """`size` "WxH" -> the Image API's size; "auto"/absent -> None (the model's default), or
    for an edit the first image's size when the model allows it."""
    allowed = entry.spec.parameters.size.allowed
    if text is None or text == "auto":
        first = _image_size(images[0]) if images else None
        if first is None or first not in allowed:
            return None
        text = first
    if not isinstance(text, str):
        raise ApiError(400, 'size must be a string "WIDTHxHEIGHT"', "size")
    w, sep, h = text.partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or text not in allowed:
        raise ApiError(
            400,
            f"size {text!r} is not supported by {entry.spec.model}; supported sizes: {', '.join(allowed)}",
            "size",
        )
    return SizeIn(width=int(w), height=int(h))


async def _wait(
    gw: Gateway, request: Request, key_id: str, model: str, job_ids: list[str]
) -> list[JobRecord]:
    """Waits until every job is finished; a client that goes away cancels the unfinished ones."""
    deadline = time.monotonic() + gw.settings.openai_wait_seconds
    while True:
        ev = gw.notifier.model_event(model)
        jobs = await anyio.to_thread.run_sync(_jobs, gw, job_ids, key_id)
        if all(j.status in TERMINAL_STATES for j in jobs):
            return jobs
        if await request.is_disconnected():
            await anyio.to_thread.run_sync(_cancel, gw, jobs, key_id)
            raise ApiError(499, "the client went away; its unfinished jobs were cancelled")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            ids = ", ".join(j.id for j in jobs if j.status not in TERMINAL_STATES)
            raise ApiError(
                504,
                f"the images were not ready within {gw.settings.openai_wait_seconds:g}s; the jobs go on: poll "
                f"GET /v1/inference/jobs/{{job_id}} for {ids}",
            )
        await wait_event(ev, min(remaining, gw.settings.poll_interval_seconds))


def _jobs(gw: Gateway, job_ids: list[str], key_id: str) -> list[JobRecord]:
    jobs = [gw.store.get_job(job_id, key_id) for job_id in job_ids]
    return [j for j in jobs if j is not None]


def _cancel(gw: Gateway, jobs: list[JobRecord], key_id: str) -> None:
    for job in jobs:
        if job.status not in TERMINAL_STATES:
            outcome = gw.store.cancel_job(job.id, key_id)
            if outcome is not None and outcome.outcome == "cancelled":
                gw.usage.record([outcome.job])


def _images(gw: Gateway, plan: Plan, jobs: list[JobRecord], base: str) -> list[dict[str, Any]]:
    failed = [j for j in jobs if j.status != SUCCEEDED or j.result_key is None]
    if failed:
        job = failed[0]
        message = job.error_message or (
            "the job was cancelled" if job.status == CANCELLED else "the job failed"
        )
        status = 400 if message.startswith("bad input") else 500
        raise ApiError(status, f"image {jobs.index(job) + 1} of {len(jobs)} ({job.id}): {message}")
    if plan.response_format == "url":
        return [{"url": gw.result_url(j.id, base, j.completed_at), "revised_prompt": None} for j in jobs]
    out = []
    for job in jobs:
        assert job.result_key is not None
        try:
            data = gw.storage.get(job.result_key)
        except StorageError as e:
            log.error("job %s: reading its result failed: %s", job.id, e)
            raise ApiError(500, "a result image could not be read from storage") from None
        out.append({"b64_json": base64.b64encode(data).decode(), "revised_prompt": None})
    return out
