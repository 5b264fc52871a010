"""The worker loop against the real gateway (in a thread, SQLite, loopback HTTP)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from prometheus_client import generate_latest
from remotegpu_base.protocol import GenerationRequest
from remotegpu_worker.engine import ImageEngine
from remotegpu_worker.loop import LoopSettings, WorkerLoop
from remotegpu_worker.metrics import WorkerMetrics

from tests.worker.conftest import RunningGateway, png_b64, png_size

TINY = "remotegpu/tiny-random-flux1"
KONTEXT = "remotegpu/tiny-random-flux1-kontext"
FLUX2 = "remotegpu/tiny-random-flux2"


class LoopThread:
    def __init__(self, engine: ImageEngine, gw: RunningGateway, **settings: Any):
        s = LoopSettings(lease_wait_seconds=1.0, heartbeat_seconds=0.2, drain_grace_seconds=60.0)
        for k, v in settings.items():
            setattr(s, k, v)
        self.metrics = WorkerMetrics()
        self.loop = WorkerLoop(engine, gw.client, metrics=self.metrics, settings=s)
        self.result: list[str] = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.loop.run()), daemon=True)
        self.thread.start()

    def stop(self, grace: float = 0.0) -> str:
        self.loop.drain(grace)
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "loop did not stop"
        return self.result[0]

    def count(self, outcome: str) -> float:
        return float(self.metrics.jobs.labels(self.loop.model, outcome)._value.get())


def wait_running(gw: RunningGateway, job_id: str, min_step: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = gw.gw.store.get_job(job_id, None)
        if job.status == "running" and (job.progress_step or 0) >= min_step:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not running at step >= {min_step}")


def test_job_succeeds_and_matches_a_direct_run(engines: Any, gateway: RunningGateway) -> None:
    engine = engines("flux1")
    lt = LoopThread(engine, gateway)
    try:
        job_id = gateway.submit(
            TINY, "a tiny test", size={"width": 1024, "height": 768}, steps=3, seed=5, guidance=2.0
        )
        job = gateway.wait(job_id, {"succeeded", "failed", "cancelled"})
        assert job["status"] == "succeeded", job
        assert job["run_ms"] > 0 and job["result_url"]
        png = gateway.result(job_id)
        assert png_size(png) == (1024, 768)
        direct = engine.generate(
            GenerationRequest(prompt="a tiny test", width=1024, height=768, steps=3, guidance=2.0, seed=5)
        )
        assert direct.data == png, "the same seed and request must give identical bytes"
        # The model reports ready while the worker polls.
        models = {m["model"]: m for m in gateway.http.get("/v1/inference/models").json()["image"]}
        assert models[TINY]["runtime"]["state"] == "ready"
    finally:
        assert lt.stop() == "drained"
    assert lt.count("succeeded") == 1
    text = generate_latest(lt.metrics.registry).decode()
    assert "remotegpu_worker_inference_seconds_count" in text
    assert 'remotegpu_worker_jobs_total{model="remotegpu/tiny-random-flux1",outcome="succeeded"} 1.0' in text
    # The other outcomes read 0 from the start (increase() over a counter needs its 0).
    assert 'remotegpu_worker_jobs_total{model="remotegpu/tiny-random-flux1",outcome="failed"} 0.0' in text
    assert (
        'remotegpu_worker_job_seconds_count{model="remotegpu/tiny-random-flux1",outcome="lost"} 0.0' in text
    )


def test_input_image_models_through_the_gateway(engines: Any, gateway: RunningGateway) -> None:
    loops = [LoopThread(engines("flux1-kontext"), gateway), LoopThread(engines("flux2"), gateway)]
    try:
        k = gateway.submit(KONTEXT, "make it blue", steps=2, input_images_base64=[png_b64(512, 512)])
        f = gateway.submit(
            FLUX2,
            "combine these",
            steps=2,
            size={"width": 768, "height": 1024},
            input_images_base64=[png_b64(512, 512), png_b64(1024, 768, (0, 0, 255))],
        )
        for job_id, size in [(k, (512, 512)), (f, (768, 1024))]:
            job = gateway.wait(job_id, {"succeeded", "failed", "cancelled"})
            assert job["status"] == "succeeded", job
            assert png_size(gateway.result(job_id)) == size
    finally:
        for lt in loops:
            lt.stop()


def test_cancel_mid_run_stops_at_the_next_step(engines: Any, gateway: RunningGateway) -> None:
    lt = LoopThread(engines("flux1"), gateway)
    try:
        job_id = gateway.submit(TINY, "long job", steps=50, seed=1)
        wait_running(gateway, job_id, min_step=2)
        t0 = time.monotonic()
        assert gateway.cancel(job_id)["cancel"] == "requested"
        job = gateway.wait(job_id, {"succeeded", "failed", "cancelled"}, timeout=30)
        assert job["status"] == "cancelled", job
        assert time.monotonic() - t0 < 10
        record = gateway.gw.store.get_job(job_id, None)
        assert record.progress_step is None or record.progress_step < 50
        # The worker carries on with the next job.
        nxt = gateway.submit(TINY, "next", steps=2)
        assert gateway.wait(nxt, {"succeeded", "failed", "cancelled"})["status"] == "succeeded"
    finally:
        lt.stop()
    assert lt.count("cancelled") == 1 and lt.count("succeeded") == 1


def test_bad_input_fails_with_a_useful_message(
    engines: Any, gateway: RunningGateway, tiny_data_dir: Any
) -> None:
    # The worker's catalog entry disagrees with the gateway's (no negative prompts): the
    # worker refuses the request and says why, instead of silently ignoring the field.
    spec = engines("flux1").spec.model_copy(deep=True)
    spec.parameters.negative_prompt.supported = False
    engine = ImageEngine(spec, tiny_data_dir, device="cpu")
    engine.load()
    engine.warm_up()
    lt = LoopThread(engine, gateway)
    try:
        job_id = gateway.submit(TINY, "x", negative_prompt="blurry", steps=2)
        job = gateway.wait(job_id, {"succeeded", "failed", "cancelled"})
        assert job["status"] == "failed"
        assert "bad input" in job["error_message"] and "negative_prompt" in job["error_message"]
    finally:
        lt.stop()
    assert lt.count("failed") == 1


def test_an_internal_error_fails_the_job_without_internals(
    engines: Any, gateway: RunningGateway, monkeypatch: Any, caplog: Any
) -> None:
    """The job's error_message is public: the exception, its paths and object addresses stay
    in the worker's log, next to the job id."""
    engine = engines("flux1")

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("kernel failed in /opt/venv/lib/torch/x.py on <Tensor object at 0x7f00deadbeef>")

    monkeypatch.setattr(engine, "render", broken)
    caplog.set_level(logging.WARNING, logger="remotegpu_worker")
    lt = LoopThread(engine, gateway)
    try:
        job_id = gateway.submit(TINY, "x", steps=2)
        job = gateway.wait(job_id, {"succeeded", "failed", "cancelled"})
    finally:
        lt.stop()
    assert job["status"] == "failed"
    assert "inference failed on the worker" in job["error_message"]
    for internal in ("/opt/", "0x", "RuntimeError", "object at"):
        assert internal not in job["error_message"]
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert job_id in log and "/opt/venv/lib/torch/x.py" in log


def test_drain_finishes_the_current_job_within_the_grace(engines: Any, gateway: RunningGateway) -> None:
    lt = LoopThread(engines("flux1"), gateway)
    try:
        job_id = gateway.submit(TINY, "finish me", steps=30)
        wait_running(gateway, job_id)
    finally:
        assert lt.stop(grace=60) == "drained"
    assert gateway.job(job_id)["status"] == "succeeded"


def test_drain_past_the_grace_hands_the_job_back(engines: Any, gateway: RunningGateway) -> None:
    lt = LoopThread(engines("flux1"), gateway)
    try:
        job_id = gateway.submit(TINY, "hand me back", steps=50)
        wait_running(gateway, job_id)
    finally:
        lt.stop(grace=0.2)
    assert lt.count("released") == 1
    record = gateway.gw.store.get_job(job_id, None)
    assert record.status == "pending" and record.attempt == 0, record
    # Another worker picks it up and completes it.
    lt2 = LoopThread(engines("flux1"), gateway)
    try:
        assert gateway.wait(job_id, {"succeeded", "failed", "cancelled"})["status"] == "succeeded"
    finally:
        lt2.stop()


def test_the_next_job_renders_while_the_last_one_is_encoded(
    engines: Any, gateway: RunningGateway, monkeypatch: Any
) -> None:
    """PNG encoding and delivery need no GPU: the next job's denoising does not wait for them."""
    from remotegpu_worker.engine import pipelines

    engine = engines("flux1")
    renders: list[str] = []
    second_render = threading.Event()
    overlapped: list[bool] = []
    real_render, real_encode = engine.render, pipelines.encode_image

    def render(req: Any, *a: Any, **kw: Any) -> Any:
        renders.append(req.prompt)
        if len(renders) == 2:
            second_render.set()
        return real_render(req, *a, **kw)

    def encode_image(image: Any, *a: Any) -> bytes:
        if not overlapped:  # the first job's encode waits to see the second job start rendering
            overlapped.append(second_render.wait(30))
        return real_encode(image, *a)

    monkeypatch.setattr(engine, "render", render)
    monkeypatch.setattr(pipelines, "encode_image", encode_image)
    first = gateway.submit(TINY, "first", steps=2)
    second = gateway.submit(TINY, "second", steps=2)
    lt = LoopThread(engine, gateway)
    try:
        for job_id in (first, second):
            assert gateway.wait(job_id, {"succeeded", "failed"})["status"] == "succeeded"
    finally:
        assert lt.stop() == "drained"
    assert overlapped == [True], "the second job did not start rendering while the first was encoded"
    assert lt.count("succeeded") == 2
    text = generate_latest(lt.metrics.registry).decode()
    assert 'remotegpu_worker_encode_seconds_count{model="remotegpu/tiny-random-flux1"} 2.0' in text


def test_a_result_that_cannot_be_delivered_fails_the_job_at_once(
    engines: Any, gateway: RunningGateway, monkeypatch: Any
) -> None:
    """An error after rendering (encoding, delivery) is reported, not left to the lease's expiry."""
    from remotegpu_worker.engine import pipelines

    def broken(image: Any, *args: Any) -> bytes:
        raise OSError("disk full at /secret/path")

    monkeypatch.setattr(pipelines, "encode_image", broken)
    lt = LoopThread(engine := engines("flux1"), gateway)
    try:
        job_id = gateway.submit(TINY, "undeliverable", steps=2)
        job = gateway.wait(job_id, {"succeeded", "failed"}, timeout=25)  # the lease TTL is 30 s
        assert job["status"] == "failed", job
        assert "could not be delivered" in job["error_message"]
        assert "/secret/path" not in job["error_message"]
    finally:
        assert lt.stop() == "drained"
    assert engine.ready


def test_each_step_is_reported_as_it_ends(engines: Any, gateway: RunningGateway, monkeypatch: Any) -> None:
    """Progress goes out per step (for the job's event stream), not only at the heartbeat
    interval: with a 10 s interval, a 4-step job whose steps take 1 s each still shows
    its steps one by one (each report is one job revision)."""
    engine = engines("flux1")
    real_render = engine.render

    def render(req: Any, flag: Any, on_step: Any) -> Any:
        def slow_step(step: int, total: int) -> None:
            on_step(step, total)
            time.sleep(1.0)

        return real_render(req, flag, slow_step)

    monkeypatch.setattr(engine, "render", render)
    job_id = gateway.submit(TINY, "steps", steps=4)
    lt = LoopThread(engine, gateway, heartbeat_seconds=30.0, progress_seconds=0.05)
    try:
        assert gateway.wait(job_id, {"succeeded", "failed"})["status"] == "succeeded"
    finally:
        assert lt.stop() == "drained"
    job = gateway.gw.store.get_job(job_id, None)
    assert job.progress_total == 4
    # Revisions: the lease, one per reported step, the completion.
    assert job.revision >= 1 + 3 + 1, f"only {job.revision - 2} step reports reached the gateway"
