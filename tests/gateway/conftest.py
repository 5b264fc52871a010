"""Gateway test harness: the real app under uvicorn on loopback, on SQLite or PostgreSQL."""

from __future__ import annotations

import base64
import io
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image
from remotegpu_base.protocol import RuntimeState, WorkerAPIClient, WorkerStatus
from remotegpu_gateway.app import create_app
from remotegpu_gateway.connections import uvicorn_config
from remotegpu_gateway.core import Gateway
from remotegpu_gateway.settings import Settings

from cluster.localcluster import free_port

WORKER_TOKEN = "test-worker-token"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
DEV = "black-forest-labs/FLUX.1-dev"
KONTEXT = "black-forest-labs/FLUX.1-Kontext-dev"
KLEIN = "black-forest-labs/FLUX.2-klein-9B"
FLUX2 = "black-forest-labs/FLUX.2-dev"
TINY = "remotegpu/tiny-random-flux1"


def png_bytes(
    width: int = 512, height: int = 512, fmt: str = "PNG", color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class RunningGateway:
    """create_app(settings) served by uvicorn in a thread, the way `remotegpu gateway` serves it."""

    def __init__(self, settings: Settings, port: int | None = None):
        self.settings = settings
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        self.gw: Gateway = self.app.state.gateway
        config = uvicorn_config(
            self.app, settings, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"gateway-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.01)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def stop(self) -> None:
        self.http.close()
        self.gw.notifier.close()  # as GatewayServer does on SIGTERM: long-polls and streams end
        self.server.should_exit = True
        self.thread.join(timeout=60)
        if self.thread.is_alive():
            frame = sys._current_frames().get(self.thread.ident or 0)
            stack = "".join(traceback.format_stack(frame)) if frame else "(no frame)"
            raise AssertionError(f"gateway thread did not stop within 60 s; it is at:\n{stack}")

    # helpers
    def key(self, name: str = "test", scopes: list[str] | None = None) -> str:
        return self.gw.store.create_key(name, scopes or ["inference"])[1]

    def worker(self) -> WorkerAPIClient:
        return WorkerAPIClient(self.url, WORKER_TOKEN)

    def ready(self, model: str, worker_id: str = "w-ready") -> None:
        with _closing(self.worker()) as w:
            w.report_status(WorkerStatus(worker_id=worker_id, model=model, state=RuntimeState.READY))

    def submit(self, key: str, body: dict[str, Any]) -> httpx.Response:
        return self.http.post("/v1/inference/image", json=body, headers=auth(key))

    def job(self, key: str, job_id: str) -> httpx.Response:
        return self.http.get(f"/v1/inference/jobs/{job_id}", headers=auth(key))


class _closing:
    def __init__(self, client: WorkerAPIClient):
        self.client = client

    def __enter__(self) -> WorkerAPIClient:
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()


class Clock:
    """Wall time plus an offset a test moves forward: leases expire and start timeouts pass
    when the test says so, not after real seconds a loaded machine may stretch."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gateway.db'}"
    return str(request.getfixturevalue("postgres_database_url"))


@pytest.fixture
def make_settings(database_url: str, tmp_path: Path, clock: Clock) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = dict(
            database_url=database_url,
            data_dir=tmp_path / "data",
            worker_token=WORKER_TOKEN,
            reaper_interval_seconds=0.1,
            clock=clock,
        )
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def start_gateway(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., RunningGateway]]:
    running: list[RunningGateway] = []

    def start(port: int | None = None, **overrides: Any) -> RunningGateway:
        g = RunningGateway(make_settings(**overrides), port=port)
        running.append(g)
        return g

    yield start
    for g in running:
        if g.thread.is_alive():
            g.stop()


@pytest.fixture
def gateway(start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    return start_gateway()


@pytest.fixture
def key(gateway: RunningGateway) -> str:
    return gateway.key()
