"""`remotegpu serve` under the first thing a newcomer does: one job for every model at
once, cold; then a kill -9 with jobs in every state, and a restart. Real processes."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from remotegpu_base.catalog import ImageModel, load_models_file

from tests.fixtures.processes import Proc
from tests.fixtures.tiny_models import copy_tiny_models
from tests.waiting import wait_for, wait_http
from tests.worker.conftest import REMOTEGPU, base_env, free_port, png_b64, png_size

BROKEN = "remotegpu/broken-weights"
TERMINAL = {"succeeded", "failed", "cancelled"}


def tiny_models() -> list[ImageModel]:
    return [m for m in load_models_file() if m.spec.weights.random]


def broken_model() -> ImageModel:
    """A catalog entry whose weights are a FluxPipeline where a Flux2Pipeline is expected."""
    m = next(m for m in tiny_models() if m.spec.architecture.value == "flux2").model_copy(deep=True)
    m.name, m.spec.model = "broken-weights", BROKEN
    m.spec.weights.source = "tiny-models/flux1"
    return m


def body(model: ImageModel, steps: int = 2, prompt: str = "a lighthouse") -> dict[str, Any]:
    p = model.spec.parameters
    b: dict[str, Any] = {"model": model.spec.model, "prompt": prompt, "steps": min(steps, p.steps.max)}
    if p.input_images.min:
        size = p.size.default
        b["input_images_base64"] = [png_b64(size.width, size.height)] * p.input_images.min
    return b


class Service:
    """`remotegpu serve` on a data directory, and an inference key for it."""

    def __init__(self, procs: Callable[..., Proc], data: Path, models_file: Path | None = None):
        self.procs, self.data, self.models_file = procs, data, models_file
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Proc | None = None
        self.http = httpx.Client(base_url=self.url, timeout=60)
        self.starts = 0

    def start(self) -> None:
        args = [REMOTEGPU, "serve", "--port", str(self.port), "--data-dir", str(self.data)]
        if self.models_file is not None:
            args += ["--models-file", str(self.models_file)]
        self.starts += 1
        self.proc = self.procs(args, base_env(), self.data.parent / f"serve-{self.starts}.log")
        wait_http(f"{self.url}/readyz", 240, self.proc)

    def create_key(self) -> None:
        out = subprocess.run(
            [REMOTEGPU, "keys", "create", "--name", "me", "--data-dir", str(self.data)],
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        self.http.headers["Authorization"] = f"Bearer {out.stdout.strip().splitlines()[-1]}"

    def submit(self, b: dict[str, Any]) -> str:
        r = self.http.post("/v1/inference/image", json=b)
        assert r.status_code == 202, r.text
        return str(r.json()["job_id"])

    def submit_at_once(self, bodies: list[dict[str, Any]]) -> list[str]:
        """All requests released together, as clients that start at the same moment."""
        ids: list[str] = [""] * len(bodies)
        barrier = threading.Barrier(len(bodies))

        def one(i: int) -> None:
            barrier.wait()
            ids[i] = self.submit(bodies[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert all(ids), ids
        return ids

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/inference/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def finished(self, job_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        def all_done() -> dict[str, dict[str, Any]] | None:
            jobs = {j: self.job(j) for j in job_ids}
            return jobs if all(v["status"] in TERMINAL for v in jobs.values()) else None

        try:
            return dict(wait_for(all_done, timeout, "every job to finish", every=0.5))
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log()[-4000:]}") from None

    def log(self) -> str:
        return self.proc.log() if self.proc else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def assert_succeeded(svc: Service, jobs: dict[str, dict[str, Any]]) -> None:
    for job_id, job in jobs.items():
        assert job["status"] == "succeeded", (job, svc.log()[-4000:])
        png = httpx.get(job["result_url"], timeout=60)
        assert png.status_code == 200 and png_size(png.content), job_id


def test_cold_serve_runs_one_job_per_model_submitted_at_once(
    procs: Callable[..., Proc], tmp_path: Path, tiny_data_dir: Path
) -> None:
    data = tmp_path / "data"
    copy_tiny_models(tiny_data_dir, data)
    svc = Service(procs, data)
    svc.start()
    svc.create_key()
    models = tiny_models()
    ids = svc.submit_at_once([body(m) for m in models])
    jobs = svc.finished(ids, timeout=600)
    assert_succeeded(svc, jobs)
    assert {j["model"] for j in jobs.values()} == {m.spec.model for m in models}
    assert "Cannot copy out of meta tensor" not in svc.log()


def test_kill_9_and_restart_with_jobs_in_every_state(
    procs: Callable[..., Proc], tmp_path: Path, tiny_data_dir: Path
) -> None:
    data = tmp_path / "data"
    copy_tiny_models(tiny_data_dir, data)
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        yaml.safe_dump_all([m.to_resource() for m in [*tiny_models(), broken_model()]], sort_keys=False)
    )
    svc = Service(procs, data, models_file)
    svc.start()
    svc.create_key()
    tiny = tiny_models()
    broken = broken_model()

    # Finished before the kill: one succeeded, one cancelled, one failed (its model never loads).
    done = svc.submit(body(tiny[0]))
    cancelled = svc.submit(body(broken))
    assert svc.http.post(f"/v1/inference/jobs/{cancelled}/cancel").json()["cancel"] == "cancelled"
    failed = svc.submit(body(broken))
    before = svc.finished([done, failed], timeout=600)
    assert before[done]["status"] == "succeeded"
    assert before[failed]["status"] == "failed", before[failed]
    assert before[failed]["error_message"].startswith("the model failed to load 3 times")
    assert before[failed]["run_ms"] == 0

    # In flight at the kill: running, queued (a ready model) and warming (loading) jobs.
    # The broken model answers 202, not 503: its next job tries the load again.
    in_flight = svc.submit_at_once([body(m, steps=30) for m in tiny for _ in range(3)])
    retried = svc.submit(body(broken))

    def mixed() -> set[str] | None:
        states = {svc.job(j)["status"] for j in in_flight}
        return states if "running" in states and states & {"queued", "warming"} else None

    states_at_kill = wait_for(mixed, 600, "a job running while others wait", every=0.2)
    svc.kill9()

    svc.start()  # same data directory and port
    after = svc.finished([*in_flight, retried], timeout=900)
    assert_succeeded(svc, {j: after[j] for j in in_flight})
    assert after[retried]["status"] == "failed" and "failed to load" in after[retried]["error_message"]
    # What had finished stays as it was.
    assert svc.job(done)["status"] == "succeeded"
    assert httpx.get(svc.job(done)["result_url"], timeout=60).status_code == 200
    assert svc.job(cancelled)["status"] == "cancelled"
    assert svc.job(failed) == before[failed]
    assert "Cannot copy out of meta tensor" not in svc.log(), states_at_kill
