"""The worker's own HTTP endpoints: liveness, readiness and Prometheus metrics.

GET /healthz  200 while the process is alive (the loop thread has not died)
GET /readyz   200 only after the weights are loaded and the warm-up ran, and not draining
GET /metrics  Prometheus text, `remotegpu_worker_*`
"""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


class WorkerState:
    """What the endpoints report; updated by main as the worker goes through its phases."""

    def __init__(self, model: str):
        self.model = model
        self.phase = "starting"  # starting | loading | warming | ready | draining | stopped | failed
        self.error: str | None = None
        self.started = time.monotonic()
        self.load_seconds: float | None = None
        self.warmup_seconds: float | None = None
        self.loop: Any = None  # WorkerLoop once running
        self.live = True

    def ready(self) -> bool:
        return self.phase == "ready" and self.loop is not None and not self.loop.draining

    def view(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "phase": self.phase,
            "ready": self.ready(),
            "busy": bool(self.loop and self.loop.busy),
            "jobs_done": self.loop.jobs_done if self.loop else 0,
            "load_seconds": self.load_seconds,
            "warmup_seconds": self.warmup_seconds,
            "uptime_seconds": round(time.monotonic() - self.started, 1),
            "error": self.error,
        }


def create_app(state: WorkerState, registry: Any) -> FastAPI:
    app = FastAPI(title="RemoteGPU inference worker", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse(state.view(), status_code=200 if state.live else 503)

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        return JSONResponse(state.view(), status_code=200 if state.ready() else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class HttpServer:
    """uvicorn in a daemon thread (signals stay with the main thread)."""

    def __init__(self, app: FastAPI, host: str, port: int):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="worker-http", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the worker's HTTP server did not start (port in use?)")
            if time.monotonic() > deadline:
                raise RuntimeError("the worker's HTTP server did not start in time")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
