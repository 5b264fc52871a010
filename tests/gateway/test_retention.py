"""Retention: finished jobs are deleted with their input images and result after a while."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from remotegpu_gateway.settings import RETENTION_ENV, retention_seconds

from tests.gateway.conftest import KONTEXT, Clock, RunningGateway, auth, b64, png_bytes
from tests.waiting import wait_for


def stored_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_finished_jobs_are_deleted_with_their_images_after_the_retention(
    start_gateway: Callable[..., RunningGateway], clock: Clock
) -> None:
    # An hour's retention that passes when the test moves the clock, not while it still looks
    # (and a start timeout longer than that, so the waiting job still waits then).
    gw = start_gateway(retention_seconds=3600.0, purge_interval_seconds=0.2, start_timeout_seconds=86400)
    key = gw.key()
    source = b64(png_bytes(512, 512))
    body = {"prompt": "a", "model": KONTEXT, "input_images_base64": [source]}
    done = gw.submit(key, body).json()["job_id"]
    w = gw.worker()
    lease = w.lease(KONTEXT, "w1", wait_seconds=5)
    assert lease is not None and lease.job_id == done
    w.complete(done, lease.lease_token, png_bytes())
    w.close()
    waiting = gw.submit(key, body).json()["job_id"]  # never leased: must survive
    root = gw.gw.settings.resolved_results_dir()
    before = stored_files(root)
    assert f"inputs/{done}/0" in before and f"inputs/{waiting}/0" in before
    assert any(f.startswith(f"results/{done}/") for f in before)
    result = f"/v1/inference/jobs/{done}/result"
    assert gw.http.get(result, headers=auth(key)).status_code == 200
    # The signed URL expires no later than the result is deleted.
    status = gw.job(key, done).json()
    expires = int(parse_qs(urlparse(status["result_url"]).query)["expires"][0])
    completed = datetime.fromisoformat(status["completed_at"].replace("Z", "+00:00")).timestamp()
    assert completed < expires <= completed + 3600 + 1

    clock.advance(3601)
    wait_for(lambda: gw.job(key, done).status_code == 404, 20, "the finished job to be deleted")
    assert gw.http.get(result, headers=auth(key)).status_code == 404
    # The rows go first, then the files, then the count (one sweep, in a worker thread).
    wait_for(lambda: stored_files(root) == [f"inputs/{waiting}/0"], 20, "its images to be deleted")
    assert not (root / "results" / done).exists() and not (root / "inputs" / done).exists()
    assert gw.job(key, waiting).json()["status"] in ("queued", "warming")
    wait_for(
        lambda: gw.gw.metrics.registry.get_sample_value("remotegpu_jobs_purged_total") == 1,
        20,
        "the purge to be counted",
    )


def test_retention_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RETENTION_ENV, raising=False)
    assert retention_seconds() == 7 * 24 * 3600  # the life of a signed result_url
    monkeypatch.setenv(RETENTION_ENV, "0")
    assert retention_seconds() == 0  # kept forever
    assert retention_seconds(1.5) == 5400  # the flag wins over the environment
    monkeypatch.setenv(RETENTION_ENV, "a week")
    with pytest.raises(SystemExit, match="hours"):
        retention_seconds()
    with pytest.raises(SystemExit, match="positive"):
        retention_seconds(-1)
