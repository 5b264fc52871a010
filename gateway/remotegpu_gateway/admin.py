"""Admin HTTP API for API keys, guarded by a key with the `admin` scope."""

from __future__ import annotations

from datetime import date
from typing import Any

import anyio
from fastapi import APIRouter, Query, Request

from remotegpu_gateway.auth import auth_first, gateway, require_scope
from remotegpu_gateway.errors import ApiError
from remotegpu_gateway.schemas import (
    ErrorResponse,
    KeyCreate,
    KeyInfo,
    KeyLimitsUpdate,
    KeyLimitsView,
    KeyRotate,
    KeyWithSecret,
    UsageReport,
    WebhookSecret,
)
from remotegpu_gateway.store import NotFoundError

admin_key = require_scope("admin")
router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    route_class=auth_first(admin_key),
    responses={
        401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
        403: {"model": ErrorResponse, "description": "The key lacks the admin scope"},
        404: {"model": ErrorResponse, "description": "No such key"},
        422: {"model": ErrorResponse, "description": "Request validation failed"},
    },
)


@router.post(
    "/keys", response_model=KeyWithSecret, status_code=201, summary="Create a key (the secret is shown once)"
)
async def create_key(body: KeyCreate, request: Request) -> dict[str, Any]:
    store = gateway(request).store
    scopes: list[str] = list(body.scopes)
    key, secret = await anyio.to_thread.run_sync(store.create_key, body.name, scopes, body.expires_in_seconds)
    limits = body.model_dump(include={"requests_per_minute", "max_concurrent_jobs", "gpu_seconds_per_day"})
    if any(v is not None for v in limits.values()):
        await anyio.to_thread.run_sync(gateway(request).limits.set, key.id, limits)
    return {**key.public(), "key": secret}


@router.get("/keys", response_model=list[KeyInfo], summary="List keys (never their secrets)")
async def list_keys(request: Request) -> list[dict[str, Any]]:
    keys = await anyio.to_thread.run_sync(gateway(request).store.list_keys)
    return [k.public() for k in keys]


@router.post("/keys/{key_id}/rotate", response_model=KeyWithSecret, summary="New secret, same key identity")
async def rotate_key(key_id: str, request: Request, body: KeyRotate | None = None) -> dict[str, Any]:
    store = gateway(request).store
    grace = body.grace_seconds if body else 0
    try:
        secret = await anyio.to_thread.run_sync(store.rotate_key, key_id, grace)
    except NotFoundError:
        raise ApiError(404, f"no key {key_id}", "key_id") from None
    except ValueError as e:
        raise ApiError(409, str(e), "key_id") from None
    key = await anyio.to_thread.run_sync(store.get_key, key_id)
    return {**key.public(), "key": secret}


@router.post("/keys/{key_id}/revoke", response_model=KeyInfo, summary="Revoke a key and all its secrets")
async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
    store = gateway(request).store
    try:
        key = await anyio.to_thread.run_sync(store.revoke_key, key_id)
    except NotFoundError:
        raise ApiError(404, f"no key {key_id}", "key_id") from None
    return key.public()


@router.post(
    "/keys/{key_id}/webhook-secret",
    response_model=WebhookSecret,
    summary="Create or rotate the key's webhook signing secret (extension; shown once)",
    description="The `whsec_` secret signs the webhooks of this key's jobs (Standard Webhooks); a new one "
    "replaces the old at once, also for deliveries still being retried.",
)
async def webhook_secret(key_id: str, request: Request) -> dict[str, Any]:
    store = gateway(request).store
    try:
        secret = await anyio.to_thread.run_sync(store.set_webhook_secret, key_id)
    except NotFoundError:
        raise ApiError(404, f"no key {key_id}", "key_id") from None
    return {"key_id": key_id, "webhook_secret": secret}


@router.get(
    "/keys/{key_id}/limits",
    response_model=KeyLimitsView,
    summary="A key's limits: in force, and its own overrides (0: unlimited)",
)
async def key_limits(key_id: str, request: Request) -> dict[str, Any]:
    gw = gateway(request)
    try:
        await anyio.to_thread.run_sync(gw.store.get_key, key_id)
    except NotFoundError:
        raise ApiError(404, f"no key {key_id}", "key_id") from None
    return await anyio.to_thread.run_sync(gw.limits.view, key_id)


@router.patch(
    "/keys/{key_id}/limits",
    response_model=KeyLimitsView,
    summary="Set a key's limits (every gateway replica enforces them at once)",
    description="Requests per minute, concurrent unfinished jobs and GPU-seconds per UTC day. A field set to a "
    "number becomes the key's own limit (0: unlimited); null returns it to the gateway's default; absent fields "
    "stay as they are.",
)
async def update_key_limits(key_id: str, body: KeyLimitsUpdate, request: Request) -> dict[str, Any]:
    gw = gateway(request)
    try:
        await anyio.to_thread.run_sync(gw.limits.set, key_id, body.model_dump(include=body.model_fields_set))
    except NotFoundError:
        raise ApiError(404, f"no key {key_id}", "key_id") from None
    return await anyio.to_thread.run_sync(gw.limits.view, key_id)


USAGE_DESCRIPTION = (
    "Finished jobs (succeeded, failed, cancelled) and GPU-seconds, in total, by model and by UTC day and model, "
    "between `since` and `until` (UTC dates, both included; default: all). GPU-seconds are the jobs' run time "
    "(`run_ms` / 1000): from the start of the last attempt to the end. Kept after the jobs are deleted."
)


@router.get(
    "/keys/{key_id}/usage", response_model=UsageReport, summary="A key's usage", description=USAGE_DESCRIPTION
)
async def key_usage(
    key_id: str,
    request: Request,
    since: date | None = Query(default=None, description="first UTC day, YYYY-MM-DD"),
    until: date | None = Query(default=None, description="last UTC day, YYYY-MM-DD"),
) -> dict[str, Any]:
    gw = gateway(request)
    try:
        await anyio.to_thread.run_sync(gw.store.get_key, key_id)
    except NotFoundError:
        raise ApiError(404, f"no key {key_id}", "key_id") from None
    report = await anyio.to_thread.run_sync(gw.usage.report, key_id, since, until)
    if not report["keys"]:
        report["keys"] = [gw.usage.empty(key_id)]
    return report


@router.get("/usage", response_model=UsageReport, summary="Every key's usage", description=USAGE_DESCRIPTION)
async def usage(
    request: Request,
    since: date | None = Query(default=None, description="first UTC day, YYYY-MM-DD"),
    until: date | None = Query(default=None, description="last UTC day, YYYY-MM-DD"),
) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(gateway(request).usage.report, None, since, until)
