"""Admin HTTP API for API keys, guarded by a key with the `admin` scope."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request

from remotegpu_gateway.auth import auth_first, gateway, require_scope
from remotegpu_gateway.errors import ApiError
from remotegpu_gateway.schemas import (
    ErrorResponse,
    KeyCreate,
    KeyInfo,
    KeyRotate,
    KeyWithSecret,
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
