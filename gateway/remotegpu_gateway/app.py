"""`create_app(settings)`: the gateway as one FastAPI application."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from remotegpu_base import __version__

from remotegpu_gateway import admin, api, errors, internal, openai_api
from remotegpu_gateway.bodies import BodyGuard
from remotegpu_gateway.catalog_source import Catalog
from remotegpu_gateway.core import Gateway
from remotegpu_gateway.metrics import HttpMetricsMiddleware
from remotegpu_gateway.registry import RuntimeRegistry
from remotegpu_gateway.settings import Settings
from remotegpu_gateway.storage import BlobStorage

log = logging.getLogger("remotegpu_gateway")

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
    app.include_router(openai_api.router)
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
        except Exception:  # noqa: BLE001 - the probe answers; the log says why
            log.exception("readiness: the database is unavailable")
            return JSONResponse({"status": "database unavailable"}, status_code=503)
        return JSONResponse({"status": "ok", "schema_version": version, "models": len(gw.catalog.ids())})

    app.add_middleware(
        BodyGuard,
        max_bytes=settings.max_body_bytes,
        timeout=settings.body_timeout_seconds,
        concurrency=settings.max_concurrent_bodies,
        metrics=gw.metrics,
    )
    app.add_middleware(HttpMetricsMiddleware, metrics=gw.metrics)
    if settings.cors_origins:
        # Outermost: preflights are answered here, and errors (401, 413, ...) carry the
        # headers too, so a browser client can read them. Keys travel in a header, never
        # in cookies: no credentials mode.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    return app
