"""The embedded default's supervisor, in-process against the real gateway: a model loads
on its first job (warming/starting), serves (ready), unloads when idle (sleeping)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from remotegpu_base.catalog import ImageModel
from remotegpu_worker.metrics import WorkerMetrics

from remotegpu import embedded
from remotegpu.embedded import Supervisor
from tests.worker.conftest import WORKER_TOKEN, RunningGateway, png_size

TINY = "remotegpu/tiny-random-flux1"
BROKEN = "remotegpu/broken-weights"


def state(gw: RunningGateway, model: str) -> str:
    for m in gw.http.get("/v1/inference/models").json()["image"]:
        if m["model"] == model:
            return str(m["runtime"]["state"])
    raise KeyError(model)


def run_job(gw: RunningGateway, seen: set[str]) -> str:
    job_id = gw.submit(TINY, "supervised", steps=2, size={"width": 1024, "height": 768})
    deadline = time.monotonic() + 120
    while True:
        job = gw.job(job_id)
        seen.add(job["status"])
        seen.add("model:" + state(gw, TINY))
        if job["status"] in ("succeeded", "failed", "cancelled"):
            assert job["status"] == "succeeded", job
            return job_id
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_load_on_first_job_serve_then_sleep(
    tmp_path: Path,
    tiny_data_dir: Path,
    tiny_catalog: dict[str, ImageModel],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REMOTEGPU_IDLE_SECONDS", "2")
    monkeypatch.setattr(embedded, "LOAD_BACKOFF_SECONDS", 0.2)  # 2 s, then 4 s, for each broken job
    broken = tiny_catalog["flux2"].model_copy(deep=True)
    broken.name = "broken"
    broken.spec.model = BROKEN
    broken.spec.weights.source = "tiny-models/flux1"  # a FluxPipeline where flux2 is expected
    models = [tiny_catalog["flux1"], broken]
    gw = RunningGateway(tmp_path, models)
    sup = Supervisor(gw.url, WORKER_TOKEN, models, tiny_data_dir, gw.gw.registry, WorkerMetrics())
    transitions: list[str] = []
    gw.gw.registry.on_change(lambda: transitions.append(gw.gw.registry.state(TINY).value))
    try:
        sup.start()
        assert state(gw, TINY) == "sleeping"
        for cycle in range(2):
            seen: set[str] = set()
            transitions.clear()
            job_id = run_job(gw, seen)
            assert "warming" in seen, (cycle, seen)
            # sleeping -> starting (loading, jobs warming) -> ready
            states = [s for i, s in enumerate(transitions) if i == 0 or transitions[i - 1] != s]
            assert states[:2] == ["starting", "ready"], (cycle, transitions)
            assert png_size(gw.result(job_id)) == (1024, 768)
            # No more jobs: after the idle window the model unloads and sleeps. (The state
            # is read from the transitions, not at a moment: on a loaded machine the 2 s
            # window may already be over when the result has been read.)
            deadline = time.monotonic() + 60
            while state(gw, TINY) != "sleeping" or sup.workers[TINY].thread.is_alive():
                assert time.monotonic() < deadline, "did not go to sleep"
                time.sleep(0.1)
            states = [s for i, s in enumerate(transitions) if i == 0 or transitions[i - 1] != s]
            assert states == ["starting", "ready", "sleeping"], (cycle, transitions)
            assert sup.workers[TINY].engine is None

        # A model whose weights do not load: tried 3 times with back-off, then its waiting
        # job fails with the reason. The model still takes jobs (never a 503): the next one
        # starts a fresh try.
        for _ in range(2):
            job_id = gw.submit(BROKEN, "x", steps=2)
            job = gw.wait(job_id, {"succeeded", "failed", "cancelled"}, timeout=300)
            assert job["status"] == "failed", job
            assert job["error_message"] == "the model failed to load 3 times; the job never started"
            assert job["run_ms"] == 0 and job["started_at"] is None
    finally:
        sup.shutdown(grace=0)
        gw.stop()
