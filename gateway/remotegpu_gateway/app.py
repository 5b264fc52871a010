"""`create_app(settings)`: the gateway as one FastAPI application."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from remotegpu import __version__
from remotegpu_gateway import admin, api, errors, internal
from remotegpu_gateway.catalog_source import Catalog
from remotegpu_gateway.core import Gateway
from remotegpu_gateway.errors import ApiError
from remotegpu_gateway.metrics import HttpMetricsMiddleware
from remotegpu_gateway.registry import RuntimeRegistry
from remotegpu_gateway.settings import Settings
from remotegpu_gateway.storage import BlobStorage

DESCRIPTION = """\
RemoteGPU Image: submit image jobs, poll them, fetch results.

Authentication: `Authorization: Bearer <api-key>`; keys with the `inference` scope for
`/v1/inference/*` (except the public model catalog), `admin` for `/v1/admin/*`.

Status codes: 401 missing/invalid/revoked/expired key; 403 key without the scope;
422 request validation failed; 400 valid JSON but invalid for the selected model or
endpoint; 503 the model exists but is unavailable for serving; 404 a job that does not
exist or belongs to another key; 413 a body over the size limit; 500 a storage or
server failure. Every error body is `{"error": {"type", "message", "field", "errors"}}`
and names the offending field.

Choices where the contract is silent: submit answers 202 Accepted; unknown request
fields are rejected (422); an unknown model is 400; timestamps are UTC ISO 8601
(`YYYY-MM-DDTHH:MM:SSZ`); `result_url` is signed and valid for 7 days (never past the
job's deletion, below), or the owner's key can fetch it; a random seed is chosen when
none is sent. Finished jobs are kept for the gateway's retention period (7 days unless
the operator of this service chose otherwise), then deleted with their images: their
status and result are 404 from then on.
"""


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit} bytes", "body")


class BodyLimitMiddleware:
    """Pure ASGI: refuses bodies over the limit by Content-Length or while streaming."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    resp = BodyTooLarge(self.max_bytes).response()
                    await resp(scope, receive, send)
                    return
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message  # type: ignore[no-any-return]

        await self.app(scope, limited, send)


def create_app(
    settings: Settings,
    *,
    catalog: Catalog | None = None,
    registry: RuntimeRegistry | None = None,
    storage: BlobStorage | None = None,
) -> FastAPI:
    """Builds the gateway. The database is migrated here; background work starts with the
    app's lifespan (or `await app.state.gateway.start()` when the app is mounted)."""
    gw = Gateway(settings, catalog=catalog, registry=registry, storage=storage)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(
        title="RemoteGPU Image API", version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.gateway = gw
    errors.install(app)
    app.include_router(api.router)
    app.include_router(admin.router)
    app.include_router(internal.router)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        data = await anyio.to_thread.run_sync(generate_latest, gw.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        try:
            version = await anyio.to_thread.run_sync(gw.store.schema_version)
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": "database unavailable", "error": str(e)}, status_code=503)
        return JSONResponse({"status": "ok", "schema_version": version, "models": len(gw.catalog.ids())})

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(HttpMetricsMiddleware, metrics=gw.metrics)
    return app
