"""Worker test harness: engines on the tiny models, and the real gateway on loopback."""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image
from remotegpu_base.catalog import ImageModel
from remotegpu_base.protocol import WorkerAPIClient

from cluster.localcluster import free_port

WORKER_TOKEN = "worker-test-token"
REPO = Path(__file__).resolve().parents[2]
REMOTEGPU = str(REPO / ".venv" / "bin" / "remotegpu")


def png_b64(width: int = 512, height: int = 512, color: tuple[int, int, int] = (200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), "not a PNG"
    with Image.open(io.BytesIO(data)) as im:
        return im.size


@pytest.fixture(scope="session")
def engines(tiny_data_dir: Path, tiny_catalog: dict[str, ImageModel]) -> Iterator[Callable[[str], Any]]:
    """engines('flux1') -> a loaded, warmed-up ImageEngine (one per architecture per session)."""
    from remotegpu_worker.engine import ImageEngine

    cache: dict[str, Any] = {}

    def get(arch: str) -> Any:
        if arch not in cache:
            e = ImageEngine(tiny_catalog[arch], tiny_data_dir, device="cpu")
            e.load()
            e.warm_up()
            cache[arch] = e
        return cache[arch]

    yield get
    for e in cache.values():
        e.unload()


class RunningGateway:
    """The real gateway (`create_app(settings)`) under uvicorn in a thread, on SQLite."""

    def __init__(self, data_dir: Path, models: list[ImageModel], lease_ttl: float = 30.0, **settings: Any):
        from remotegpu_gateway.app import create_app
        from remotegpu_gateway.settings import Settings

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = Settings(
            database_url=f"sqlite:///{data_dir / 'gateway.db'}",
            data_dir=data_dir,
            worker_token=WORKER_TOKEN,
            public_url=self.url,
            models=models,
            lease_ttl_seconds=lease_ttl,
            reaper_interval_seconds=0.2,
            poll_interval_seconds=0.2,
            **settings,
        )
        self.app = create_app(settings)
        self.gw = self.app.state.gateway
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, name=f"gateway-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.01)
        self.api_key = self.gw.store.create_key("worker-tests", ["inference"])[1]
        self.http = httpx.Client(
            base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {self.api_key}"}
        )

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self) -> WorkerAPIClient:
        return WorkerAPIClient(self.url, WORKER_TOKEN)

    def submit(self, model: str, prompt: str = "a red fox", **fields: Any) -> str:
        r = self.http.post("/v1/inference/image", json={"model": model, "prompt": prompt, **fields})
        assert r.status_code == 202, r.text
        return str(r.json()["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/inference/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def cancel(self, job_id: str) -> dict[str, Any]:
        r = self.http.post(f"/v1/inference/jobs/{job_id}/cancel")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait(self, job_id: str, statuses: set[str], timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout}s: {job}"
            time.sleep(0.1)

    def result(self, job_id: str) -> bytes:
        r = self.http.get(f"/v1/inference/jobs/{job_id}/result")
        assert r.status_code == 200, r.text
        return r.content


@pytest.fixture
def gateway_factory(
    tmp_path: Path, tiny_catalog: dict[str, ImageModel]
) -> Iterator[Callable[..., RunningGateway]]:
    started: list[RunningGateway] = []

    def make(lease_ttl: float = 30.0, **settings: Any) -> RunningGateway:
        d = tmp_path / f"gw{len(started)}"
        d.mkdir()
        g = RunningGateway(d, list(tiny_catalog.values()), lease_ttl=lease_ttl, **settings)
        started.append(g)
        return g

    yield make
    for g in started:
        g.stop()


@pytest.fixture
def gateway(gateway_factory: Callable[..., RunningGateway]) -> RunningGateway:
    return gateway_factory()


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMOTEGPU_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env
