"""A worker's result upload during an outage of the object store: `remotegpu worker` as a
real process, the gateway on S3Storage, SeaweedFS cut off from the gateway and back again
(tests/fixtures/outage.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from tests.fixtures.outage import Outage
from tests.fixtures.processes import Proc
from tests.fixtures.seaweedfs import SeaweedFS
from tests.waiting import wait_for
from tests.worker.conftest import RunningGateway, png_size
from tests.worker.test_loop import TINY
from tests.worker.test_worker_process import start_worker


def failed_uploads(gw: RunningGateway) -> float:
    """Result uploads (the internal API's complete) that the gateway answered with 500."""
    return sum(
        s.value
        for metric in gw.gw.metrics.registry.collect()
        if metric.name == "remotegpu_http_requests"
        for s in metric.samples
        if s.name.endswith("_total") and s.labels["route"].endswith("/complete") and s.labels["code"] == "500"
    )


def test_a_result_upload_during_a_store_outage_is_retried_and_the_job_succeeds_once(
    procs: Callable[..., Proc],
    gateway_factory: Callable[..., RunningGateway],
    tiny_data_dir: Path,
    tmp_path: Path,
    s3_env: SeaweedFS,
    s3_outage: Outage,
) -> None:
    bucket, prefix = s3_env.bucket(), f"worker-{uuid.uuid4().hex[:8]}"
    gw = gateway_factory(s3_bucket=bucket, s3_endpoint_url=s3_outage.url, s3_prefix=prefix)
    # Uploads sent again for 10 minutes (default 1): a margin for a busy machine.
    worker, _ = start_worker(
        procs, gw, tiny_data_dir, tmp_path / "worker.log", REMOTEGPU_UPLOAD_RETRY_SECONDS="600"
    )

    s3_outage.cut()  # a text-only job needs the store only for its result
    job_id = gw.submit(TINY, "through an outage", steps=4, seed=9)
    wait_for(lambda: failed_uploads(gw) >= 2, 120, "the worker's upload to fail and be sent again")
    assert gw.job(job_id)["status"] == "running"  # the worker still holds the lease

    s3_outage.restore()  # within the worker's retry window: the next attempt lands
    job = gw.wait(job_id, {"succeeded", "failed", "cancelled"}, timeout=120)
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    assert gw.gw.store.get_job(job_id, None).attempt == 1  # rendered once, never re-queued
    results = [k for k in s3_env.keys(bucket, prefix) if "/results/" in k]
    assert len(results) == 1 and f"/results/{job_id}/" in results[0], results
    assert png_size(gw.result(job_id)) == (512, 512)
    assert f"job {job_id}: the result upload failed (HTTP 500" in worker.log()
