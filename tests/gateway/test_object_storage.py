"""Input and result images in an S3-compatible bucket (SeaweedFS, really running): the
round trip, retention deleting the objects, and an outage of the store (a submit answers
500 with nothing queued; a worker's upload fails with 500, and its retry succeeds once the
store is back; the outage is the store cut off the network, tests/fixtures/outage.py). On
SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import httpx
import pytest
from remotegpu_base.protocol import WorkerAPIClient

from tests.fixtures.outage import Outage
from tests.fixtures.seaweedfs import SeaweedFS
from tests.gateway.conftest import KONTEXT, WORKER_TOKEN, RunningGateway, auth, b64, png_bytes
from tests.waiting import wait_for


@pytest.fixture
def start_s3_gateway(
    start_gateway: Callable[..., RunningGateway], s3_env: SeaweedFS
) -> Callable[..., RunningGateway]:
    def start(**overrides: object) -> RunningGateway:
        prefix = f"imaging-{uuid.uuid4().hex[:8]}"  # one bucket, a prefix per test
        settings = {"s3_bucket": s3_env.bucket(), "s3_endpoint_url": s3_env.endpoint, "s3_prefix": prefix}
        return start_gateway(**{**settings, **overrides})

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
    start_s3_gateway: Callable[..., RunningGateway], s3_env: SeaweedFS, s3_outage: Outage
) -> None:
    gw = start_s3_gateway(s3_endpoint_url=s3_outage.url)
    bucket, prefix = gw.gw.settings.s3_bucket, gw.gw.settings.s3_prefix
    assert bucket
    key = gw.key()
    job = edit(gw, key).json()["job_id"]
    w: WorkerAPIClient = gw.worker()
    try:
        lease = w.lease(KONTEXT, "w1", wait_seconds=5)
        assert lease is not None

        s3_outage.cut()
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

        s3_outage.restore()  # the store is back: the same upload succeeds
        w.complete(job, lease.lease_token, png_bytes())
    finally:
        w.close()
    assert gw.job(key, job).json()["status"] == "succeeded"
    assert [k for k in s3_env.keys(bucket, prefix) if k.startswith(f"{prefix}/results/{job}/")]


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_rolling_restart_of_two_gateways_under_load_loses_nothing(
    start_s3_gateway: Callable[..., RunningGateway], start_gateway: Callable[..., RunningGateway]
) -> None:
    """Two gateways share PostgreSQL and the bucket; a client submits without pause (to
    either, as a load balancer would, retrying a refused connection on the other with its
    Idempotency-Key) and a worker runs the jobs, while each gateway in turn stops
    gracefully and a new one takes its port. Every accepted job runs exactly once."""
    first = start_s3_gateway()
    s = first.gw.settings
    same = {"s3_bucket": s.s3_bucket, "s3_endpoint_url": s.s3_endpoint_url, "s3_prefix": s.s3_prefix}
    gateways = [first, start_gateway(**same)]
    key = first.key()
    stop = threading.Event()
    accepted: list[str] = []
    retried = [0]
    done: set[str] = set()

    def up() -> list[str]:
        return [g.url for g in gateways if g.server.started and not g.server.should_exit]

    def call(fn: Callable[[str], httpx.Response]) -> httpx.Response:
        while True:
            for url in up() or [first.url]:
                try:
                    return fn(url)
                except httpx.TransportError:
                    retried[0] += 1
            time.sleep(0.05)

    def submitter() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            body = {"prompt": f"job {n}", "model": KONTEXT, "input_images_base64": [b64(png_bytes(512, 512))]}
            headers = {**auth(key), "Idempotency-Key": f"job-{n}"}
            r = call(
                lambda url, b=body, h=headers: httpx.post(f"{url}/v1/inference/image", json=b, headers=h)
            )
            assert r.status_code == 202, r.text
            accepted.append(r.json()["job_id"])

    def worker() -> None:
        while not stop.is_set() or len(done) < len(accepted):
            urls = up()
            if not urls:
                time.sleep(0.05)
                continue
            w = WorkerAPIClient(urls[0], WORKER_TOKEN)
            try:
                lease = w.lease(KONTEXT, "w1", wait_seconds=1)
                if lease is not None:
                    assert lease.job_id not in done, "a job ran twice"
                    w.complete(lease.job_id, lease.lease_token, png_bytes())
                    done.add(lease.job_id)
            except httpx.TransportError:
                pass  # that gateway is stopping: the lease (if any) expires and returns the job
            finally:
                w.close()

    threads = [threading.Thread(target=submitter), threading.Thread(target=worker)]
    for t in threads:
        t.start()
    try:
        for i in range(2):  # the rolling restart: one gateway after the other
            wait_for(lambda n=len(accepted): len(accepted) >= n + 5, 60, "submits to flow")
            old = gateways[i]
            old.stop()
            gateways[i] = start_gateway(port=old.port, **same)
        wait_for(lambda n=len(accepted): len(accepted) >= n + 5, 60, "submits after the restart")
    finally:
        stop.set()
        threads[0].join(timeout=60)
    threads[1].join(timeout=120)
    assert len(set(accepted)) == len(accepted) >= 15
    assert done == set(accepted), f"{len(set(accepted) - done)} accepted jobs never ran"
    statuses = {j: gateways[0].job(key, j).json()["status"] for j in accepted}
    assert set(statuses.values()) == {"succeeded"}
    print(f"rolling restart: {len(accepted)} submits accepted, {len(done)} jobs done, 0 lost; "
          f"{retried[0]} connection(s) retried on the other gateway")  # fmt: skip
