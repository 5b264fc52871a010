"""Input and result images in an S3-compatible bucket (SeaweedFS, really running): the
round trip, retention deleting the objects, and an outage of the store (a submit answers
500 with nothing queued; a worker's upload fails with 500, and its retry succeeds once the
store is back). On SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable

import httpx
import pytest
from remotegpu_base.protocol import WorkerAPIClient

from tests.fixtures.seaweedfs import SeaweedFS
from tests.gateway.conftest import KONTEXT, RunningGateway, auth, b64, png_bytes
from tests.waiting import wait_for


@pytest.fixture
def start_s3_gateway(
    start_gateway: Callable[..., RunningGateway], s3_env: SeaweedFS
) -> Callable[..., RunningGateway]:
    def start(server: SeaweedFS | None = None, **overrides: object) -> RunningGateway:
        server = server or s3_env
        prefix = f"imaging-{uuid.uuid4().hex[:8]}"  # one bucket, a prefix per test
        return start_gateway(
            s3_bucket=server.bucket(), s3_endpoint_url=server.endpoint, s3_prefix=prefix, **overrides
        )

    return start


def edit(gw: RunningGateway, key: str) -> httpx.Response:
    return gw.submit(
        key, {"prompt": "a", "model": KONTEXT, "input_images_base64": [b64(png_bytes(512, 512))]}
    )


def test_images_round_trip_through_the_bucket(
    start_s3_gateway: Callable[..., RunningGateway], s3_env: SeaweedFS
) -> None:
    gw = start_s3_gateway()
    bucket, prefix = gw.gw.settings.s3_bucket, gw.gw.settings.s3_prefix
    assert bucket
    key = gw.key()
    submitted = edit(gw, key)
    assert submitted.is_success, submitted.text
    job = submitted.json()["job_id"]
    assert s3_env.keys(bucket, prefix) == [f"{prefix}/inputs/{job}/0"]
    w = gw.worker()
    try:
        lease = w.lease(KONTEXT, "w1", wait_seconds=5)
        assert lease is not None and lease.job_id == job and lease.request.input_images_base64  # read back
        result = png_bytes(64, 64)
        w.complete(job, lease.lease_token, result)
    finally:
        w.close()
    (stored,) = [k for k in s3_env.keys(bucket, prefix) if k.startswith(f"{prefix}/results/{job}/")]
    assert s3_env.client().get_object(Bucket=bucket, Key=stored)["Body"].read() == result
    # Served by the gateway under its own signed URL, as with a folder; nothing on local disk.
    status = gw.job(key, job).json()
    assert status["status"] == "succeeded"
    assert httpx.get(status["result_url"]).content == result
    assert gw.http.get(f"/v1/inference/jobs/{job}/result", headers=auth(key)).content == result
    assert not gw.gw.settings.resolved_results_dir().exists()


def test_retention_deletes_the_objects(
    start_s3_gateway: Callable[..., RunningGateway], s3_env: SeaweedFS
) -> None:
    gw = start_s3_gateway(retention_seconds=2.0, purge_interval_seconds=0.2)
    bucket, prefix = gw.gw.settings.s3_bucket, gw.gw.settings.s3_prefix
    assert bucket
    key = gw.key()
    done = edit(gw, key).json()["job_id"]
    w = gw.worker()
    try:
        lease = w.lease(KONTEXT, "w1", wait_seconds=5)
        assert lease is not None
        w.complete(done, lease.lease_token, png_bytes())
    finally:
        w.close()
    waiting = edit(gw, key).json()["job_id"]  # never leased: must survive
    assert len([k for k in s3_env.keys(bucket, prefix) if f"/{done}/" in k]) == 2  # its input and its result
    wait_for(lambda: gw.job(key, done).status_code == 404, 20, "the finished job to be deleted")
    wait_for(
        lambda: s3_env.keys(bucket, prefix) == [f"{prefix}/inputs/{waiting}/0"],
        20,
        "its objects to be deleted",
    )


def test_an_outage_of_the_store_loses_nothing(
    start_s3_gateway: Callable[..., RunningGateway], s3_env: SeaweedFS
) -> None:
    store = SeaweedFS().start()
    try:
        gw = start_s3_gateway(store, lease_ttl_seconds=600)  # stopping and starting the store takes a while
        bucket, prefix = gw.gw.settings.s3_bucket, gw.gw.settings.s3_prefix
        assert bucket
        key = gw.key()
        job = edit(gw, key).json()["job_id"]
        w: WorkerAPIClient = gw.worker()
        try:
            lease = w.lease(KONTEXT, "w1", wait_seconds=5)
            assert lease is not None

            store.stop()
            # A submit whose input image cannot be stored: 500, and no job exists.
            refused = edit(gw, key)
            assert refused.status_code == 500, refused.text
            assert "could not store" in refused.json()["error"]["message"]
            counts = gw.gw.store.queue_counts()[KONTEXT]
            assert (counts.pending, counts.running) == (0, 1), counts  # only the leased job
            # The worker's upload fails with a 500 (the worker retries those); the job keeps running.
            with pytest.raises(httpx.HTTPStatusError) as failed:
                w.complete(job, lease.lease_token, png_bytes())
            assert failed.value.response.status_code == 500
            assert gw.job(key, job).json()["status"] == "running"

            store.start()  # the store is back: the same upload succeeds
            w.complete(job, lease.lease_token, png_bytes())
        finally:
            w.close()
        assert gw.job(key, job).json()["status"] == "succeeded"
        assert [k for k in store.keys(bucket, prefix) if k.startswith(f"{prefix}/results/{job}/")]
    finally:
        store.stop()
        shutil.rmtree(store.dir, ignore_errors=True)
