"""GET /v1/inference/models: public catalog, parameters, runtime state, recent stats; /metrics."""

from __future__ import annotations

import time
from typing import Any

from remotegpu_base.catalog import load_models_file
from remotegpu_base.protocol import RuntimeState, WorkerStatus

from tests.gateway.conftest import DEV, KLEIN, KONTEXT, SCHNELL, RunningGateway, png_bytes

SPEC_TABLE = {
    # model: (min images, max images, max prompt, default size, steps, guidance)
    SCHNELL: (0, 0, 1024, (512, 512), 4, 0.0),
    KONTEXT: (1, 1, 2048, (512, 512), 30, 3.5),
    DEV: (0, 0, 2048, (512, 512), 30, 3.5),
    KLEIN: (0, 4, 2048, (1024, 1024), 4, 1.0),
    "black-forest-labs/FLUX.2-dev": (0, 6, 4096, (512, 512), 30, 4.0),
}


def models(g: RunningGateway) -> dict[str, Any]:
    r = g.http.get("/v1/inference/models")  # public: no key
    assert r.status_code == 200
    return {m["model"]: m for m in r.json()["image"]}


def test_catalog_is_public_and_complete(gateway: RunningGateway) -> None:
    got = models(gateway)
    assert set(got) == {m.spec.model for m in load_models_file()}
    for model_id, (lo, hi, prompt_max, size, steps, guidance) in SPEC_TABLE.items():
        m = got[model_id]
        p = m["parameters"]
        assert p["input_images"] == {"min": lo, "max": hi}
        assert p["prompt"]["max_length"] == prompt_max
        assert (p["size"]["default"]["width"], p["size"]["default"]["height"]) == size
        assert p["steps"]["default"] == steps and p["guidance"]["default"] == guidance
        assert {"width": 2048, "height": 1152} in p["size"]["allowed"]
        assert len(p["size"]["allowed"]) == 15
        assert set(m) == {"model", "description", "parameters", "runtime", "recent_summary_stats"}
        assert m["runtime"]["state"] == "sleeping" and m["runtime"]["available"] is True
        stats = m["recent_summary_stats"]
        for k in ("wait_ms", "run_ms", "total_ms"):
            assert stats[k] == {"count": 0, "p50": None, "p95": None}
    assert got[SCHNELL]["parameters"]["guidance"]["fixed"] is True
    assert got[SCHNELL]["parameters"]["negative_prompt"]["supported"] is False
    assert "Random weights" in got["remotegpu/tiny-random-flux1"]["description"]


def test_parameters_render_the_catalog_schema(gateway: RunningGateway) -> None:
    got = models(gateway)
    for entry in gateway.gw.catalog.models():
        assert got[entry.spec.model]["parameters"] == entry.spec.public_parameters()


def test_runtime_state_follows_workers_and_availability(start_gateway: Any) -> None:
    g = start_gateway(worker_stale_seconds=3.0)  # room for a loaded machine's stalls between reads
    w = g.worker()
    w.report_status(WorkerStatus(worker_id="a", model=DEV, state=RuntimeState.STARTING))
    assert models(g)[DEV]["runtime"]["state"] == "starting"
    w.report_status(WorkerStatus(worker_id="a", model=DEV, state=RuntimeState.READY))
    rt = models(g)[DEV]["runtime"]
    assert rt["state"] == "ready" and rt["ready_workers"] == 1
    w.report_status(WorkerStatus(worker_id="a", model=DEV, state=RuntimeState.SLEEPING))
    assert models(g)[DEV]["runtime"]["state"] == "sleeping"
    # A ready worker that goes silent stops counting.
    w.report_status(WorkerStatus(worker_id="b", model=DEV, state=RuntimeState.READY))
    assert models(g)[DEV]["runtime"]["state"] == "ready"
    time.sleep(3.3)
    assert models(g)[DEV]["runtime"]["state"] == "sleeping"
    # The cluster's view (ImageModel status.state) also counts.
    g.gw.registry.set_cluster_state(DEV, "starting")
    assert models(g)[DEV]["runtime"]["state"] == "starting"
    g.gw.registry.set_availability(KLEIN, False, "weights for FLUX.2-klein-9B are not downloaded")
    rt = models(g)[KLEIN]["runtime"]
    assert rt["available"] is False and "not downloaded" in rt["unavailable_reason"]
    w.close()


def test_recent_summary_stats(gateway: RunningGateway, key: str) -> None:
    w = gateway.worker()
    for _ in range(3):
        gateway.submit(key, {"prompt": "a", "model": SCHNELL})
        time.sleep(0.1)
        lease = w.lease(SCHNELL, "w1", wait_seconds=2)
        assert lease is not None
        time.sleep(0.2)
        w.complete(lease.job_id, lease.lease_token, png_bytes(8, 8))
    # A failed job does not count.
    gateway.submit(key, {"prompt": "a", "model": SCHNELL})
    lease = w.lease(SCHNELL, "w1", wait_seconds=2)
    assert lease is not None
    w.fail(lease.job_id, lease.lease_token, "x")
    w.close()
    time.sleep(2.1)  # the stats are cached for 2 s
    stats = models(gateway)[SCHNELL]["recent_summary_stats"]
    assert stats["window_seconds"] == 3600
    assert stats["wait_ms"]["count"] == stats["run_ms"]["count"] == stats["total_ms"]["count"] == 3
    assert stats["wait_ms"]["p50"] >= 80 and stats["run_ms"]["p50"] >= 180
    assert stats["total_ms"]["p95"] >= stats["total_ms"]["p50"] >= stats["run_ms"]["p50"]
    assert models(gateway)[DEV]["recent_summary_stats"]["run_ms"]["count"] == 0


def sample(text: str, name: str, labels: dict[str, str]) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def test_metrics(gateway: RunningGateway, key: str) -> None:
    job_ids = [gateway.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"] for _ in range(3)]
    gateway.submit(key, {"prompt": "a"})  # 422
    w = gateway.worker()
    lease = w.lease(SCHNELL, "w1", wait_seconds=2)
    assert lease is not None
    w.complete(lease.job_id, lease.lease_token, png_bytes(8, 8))
    lease = w.lease(SCHNELL, "w1", wait_seconds=2)
    assert lease is not None
    w.close()
    gateway.http.post(f"/v1/inference/jobs/{job_ids[2]}/cancel", headers={"Authorization": f"Bearer {key}"})
    text = gateway.http.get("/metrics").text
    assert sample(text, "remotegpu_jobs_submitted_total", {"model": SCHNELL}) == 3
    assert sample(text, "remotegpu_jobs_finished_total", {"model": SCHNELL, "status": "succeeded"}) == 1
    assert sample(text, "remotegpu_jobs_finished_total", {"model": SCHNELL, "status": "cancelled"}) == 1
    assert sample(text, "remotegpu_queue_depth", {"model": SCHNELL, "state": "running"}) == 1
    assert sample(text, "remotegpu_queue_depth", {"model": SCHNELL, "state": "queued"}) == 0
    assert sample(text, "remotegpu_queue_depth", {"model": DEV, "state": "warming"}) == 0
    assert sample(text, "remotegpu_job_wait_seconds_count", {"model": SCHNELL}) == 2
    assert sample(text, "remotegpu_job_run_seconds_count", {"model": SCHNELL}) == 1
    route = {"route": "/v1/inference/image", "method": "POST"}
    assert sample(text, "remotegpu_http_requests_total", {**route, "code": "202"}) == 3
    assert sample(text, "remotegpu_http_requests_total", {**route, "code": "422"}) == 1
    assert (sample(text, "remotegpu_http_request_duration_seconds_count", route) or 0) >= 4
    # Job IDs never become labels.
    assert job_ids[0] not in text


def test_recent_stats_are_per_model(gateway: RunningGateway) -> None:
    """A busy model cannot crowd a quiet one out of the stats (they were read with one shared
    row limit, newest first)."""
    from remotegpu_gateway.store import jobs

    now = time.time()

    def succeeded(model: str, n: int, completed_ago: float, wait: float, run: float) -> list[dict[str, Any]]:
        done = now - completed_ago
        return [
            dict(
                id=f"{model}-{i}",
                owner_key_id="k",
                model=model,
                status="succeeded",
                request="{}",
                input_image_keys="[]",
                created_at=done - run - wait,
                updated_at=done,
                started_at=done - run,
                completed_at=done,
                attempt=1,
                cancel_requested=False,
            )
            for i in range(n)
        ]

    rows = succeeded(SCHNELL, 6000, 60, 0.5, 1.0) + succeeded(DEV, 3, 600, 2.0, 4.0)
    with gateway.gw.store._write.begin() as conn:  # 6003 finished jobs, as if served earlier
        conn.execute(jobs.insert(), rows)
    got = models(gateway)
    quiet = got[DEV]["recent_summary_stats"]
    assert quiet["run_ms"] == {"count": 3, "p50": 4000, "p95": 4000}
    assert quiet["wait_ms"] == {"count": 3, "p50": 2000, "p95": 2000}
    busy = got[SCHNELL]["recent_summary_stats"]
    assert busy["run_ms"]["count"] >= 5000 and busy["run_ms"]["p50"] == 1000
