"""Bearer authentication: user API keys (scopes) and the worker token."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
from fastapi import Request, Response
from fastapi.routing import APIRoute

from remotegpu_gateway.core import Gateway
from remotegpu_gateway.errors import ApiError
from remotegpu_gateway.store import KeyRecord


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def missing_key() -> ApiError:
    return ApiError(401, "missing API key; send Authorization: Bearer <api-key>", "Authorization")


def check_key(gw: Gateway, token: str, scope: str) -> KeyRecord:
    """Blocking: the key behind `token` if it is valid and has `scope`, else 401/403."""
    key = gw.store.authenticate(token)
    if key is None:
        raise ApiError(401, "invalid, revoked or expired API key", "Authorization")
    if scope not in key.scopes:
        raise ApiError(
            403,
            f"this API key does not allow {scope} APIs (scopes: {', '.join(key.scopes)})",
            "Authorization",
        )
    return key


async def authorize(request: Request, scope: str) -> KeyRecord:
    """The request's key if it is valid and has `scope`, else 401/403."""
    token = bearer(request)
    if token is None:
        raise missing_key()
    return await anyio.to_thread.run_sync(check_key, gateway(request), token, scope)


def require_scope(scope: str) -> Callable[[Request], Awaitable[KeyRecord]]:
    async def dependency(request: Request) -> KeyRecord:
        return await authorize(request, scope)

    return dependency


async def require_worker(request: Request) -> None:
    token = bearer(request)
    expected = gateway(request).settings.worker_token
    if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
        raise ApiError(401, "invalid worker token", "Authorization")


def auth_first(check: Callable[[Request], Awaitable[object]]) -> type[APIRoute]:
    """A route class that runs `check` before the body is read. FastAPI reads a route's body
    before it resolves the dependencies, so an auth dependency alone would buffer a whole
    upload from a client without a valid key."""

    class AuthFirstRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                await check(request)
                return await handler(request)

            return route

    return AuthFirstRoute
