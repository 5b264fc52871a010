"""No accepted job waits forever: a job that cannot start fails, and its error says why.

The clock is moved forward instead of waiting out real timeouts (see `Clock`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from remotegpu_base.catalog import ImageModel, load_models_file
from remotegpu_base.protocol import RuntimeState, WorkerStatus

from tests.gateway.conftest import DEV, SCHNELL, Clock, RunningGateway
from tests.waiting import wait_for


def catalog(**start_timeouts: int) -> list[ImageModel]:
    """The bundled catalog, with scaling.startTimeoutSeconds set for some models (by model ID)."""
    models = load_models_file()
    for m in models:
        m.spec.scaling.start_timeout_seconds = start_timeouts.get(m.spec.model)
    return models


def submit(g: RunningGateway, key: str, model: str) -> str:
    r = g.submit(key, {"prompt": "a lighthouse", "model": model})
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def status(g: RunningGateway, key: str, job_id: str) -> dict[str, Any]:
    r = g.job(key, job_id)
    assert r.status_code == 200, r.text
    return dict(r.json())


def failed(g: RunningGateway, key: str, job_id: str) -> dict[str, Any]:
    return dict(
        wait_for(
            lambda: (s := status(g, key, job_id))["status"] == "failed" and s,
            30,
            f"job {job_id} to fail",
        )
    )


def test_a_job_that_never_starts_fails_after_the_start_timeout(
    start_gateway: Callable[..., RunningGateway], clock: Clock
) -> None:
    # The global default for DEV; SCHNELL has its own, shorter bound in the catalog.
    g = start_gateway(start_timeout_seconds=900, models=catalog(**{SCHNELL: 60}))
    key = g.key()
    schnell, dev = submit(g, key, SCHNELL), submit(g, key, DEV)

    clock.advance(50)  # not 59: the reaper runs on, and real seconds pass too
    assert g.gw.fail_unstartable() == []
    assert status(g, key, schnell)["status"] == "warming"

    clock.advance(11)
    job = failed(g, key, schnell)
    assert job["error_message"] == "the job did not start within 60s: no capacity came up for this model"
    assert job["run_ms"] == 0 and job["started_at"] is None and job["result_url"] is None
    assert job["wait_ms"] >= 61_000 and job["completed_at"] is not None
    assert status(g, key, dev)["status"] == "warming"

    clock.advance(900)
    job = failed(g, key, dev)
    assert job["error_message"].startswith("the job did not start within 900s: no capacity came up")
    assert job["run_ms"] == 0


def test_the_start_timeout_counts_from_when_the_job_went_back_to_the_queue(
    start_gateway: Callable[..., RunningGateway], clock: Clock
) -> None:
    g = start_gateway(start_timeout_seconds=900, lease_ttl_seconds=30)
    key = g.key()
    job_id = submit(g, key, SCHNELL)
    w = g.worker()
    clock.advance(800)
    first = w.lease(SCHNELL, "w1", wait_seconds=5)
    assert first is not None
    w.release(job_id, first.lease_token, "draining")  # back in the queue at 800 s
    clock.advance(200)  # 1000 s after the submit, 200 s after it was queued again
    assert g.gw.fail_unstartable() == []
    second = w.lease(SCHNELL, "w1", wait_seconds=5)
    assert second is not None and second.job_id == job_id
    w.close()


def test_jobs_of_a_model_removed_from_the_catalog_fail_at_once(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    g = start_gateway()
    key = g.key()
    gone, stays = submit(g, key, DEV), submit(g, key, SCHNELL)
    # What the ImageModel watch does when the resource is deleted (or a models file loses it).
    g.gw.catalog.replace([m for m in g.gw.catalog.models() if m.spec.model != DEV])
    job = failed(g, key, gone)  # no clock moves: the catalog change alone fails it
    assert job["error_message"].startswith(f"the model {DEV} left the catalog")
    assert job["run_ms"] == 0 and job["started_at"] is None
    assert status(g, key, stays)["status"] == "warming"
    assert g.submit(key, {"prompt": "a", "model": DEV}).status_code == 400


def test_a_model_that_failed_to_load_fails_its_jobs_and_is_tried_again(
    start_gateway: Callable[..., RunningGateway], clock: Clock
) -> None:
    g = start_gateway(start_timeout_seconds=900)
    key = g.key()
    w = g.worker()

    def report(state: RuntimeState, failures: int) -> None:
        w.report_status(WorkerStatus(worker_id="w1", model=SCHNELL, state=state, load_failures=failures))

    # A worker retrying its load, then past the start timeout: the reason is the loads.
    waiting = submit(g, key, SCHNELL)
    report(RuntimeState.STARTING, 2)
    clock.advance(901)
    job = failed(g, key, waiting)
    assert job["error_message"] == "the job did not start within 900s: the model failed to load 2 times"

    # A worker that gives up after its last try: the waiting jobs fail now, not at the timeout.
    waiting = submit(g, key, SCHNELL)
    report(RuntimeState.SLEEPING, 3)
    job = status(g, key, waiting)
    assert job["status"] == "failed" and job["run_ms"] == 0
    assert job["error_message"] == "the model failed to load 3 times; the job never started"

    # The model still takes jobs (no 503): the next one gets a fresh try.
    r = g.submit(key, {"prompt": "again", "model": SCHNELL})
    assert r.status_code == 202, r.text
    models = {m["model"]: m for m in g.http.get("/v1/inference/models").json()["image"]}
    assert models[SCHNELL]["runtime"]["available"] is True
    lease = w.lease(SCHNELL, "w2", wait_seconds=5)  # w1 said it was going away
    assert lease is not None and lease.job_id == r.json()["job_id"]
    w.close()
