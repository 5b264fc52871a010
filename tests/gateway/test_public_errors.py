"""Errors never show internals: clients get what went wrong without local paths,
exception reprs or object addresses; the log gets all of it, with the job id or model."""

from __future__ import annotations

import logging

import pytest

from tests.gateway.conftest import KONTEXT, SCHNELL, RunningGateway, b64, png_bytes

INTERNALS = ("/opt/", "/srv/", "/tmp/", "0x", "Error", "Traceback", "object at", "<_io")


def assert_public(text: str) -> None:
    leaked = [marker for marker in INTERNALS if marker in text]
    assert not leaked, f"{leaked} in {text!r}"


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_a_worker_failure_reaches_the_client_without_internals(
    gateway: RunningGateway, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="remotegpu_gateway")
    job_id = gateway.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    w = gateway.worker()
    lease = w.lease(SCHNELL, "w1", wait_seconds=5)
    assert lease is not None
    raw = (
        "the model could not be loaded: NotImplementedError: Cannot copy out of meta tensor "
        "<Parameter object at 0x7f3a2c1d9e50> in /opt/venv/lib/python3.11/site-packages/torch/nn.py\n"
        'Traceback (most recent call last):\n  File "/opt/venv/x.py", line 1\nValueError: x'
    )
    w.fail(lease.job_id, lease.lease_token, raw, retryable=False)
    w.close()
    job = gateway.job(key, job_id).json()
    assert job["status"] == "failed"
    assert job["error_message"].startswith("the model could not be loaded: ")
    assert_public(job["error_message"])
    assert job_id in logged(caplog) and "Cannot copy out of meta tensor" in logged(caplog)


def test_the_catalog_and_503_give_a_useful_reason_without_internals(
    gateway: RunningGateway, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="remotegpu_gateway")
    gateway.gw.registry.set_availability(
        SCHNELL,
        False,
        "weights for this model are not present on this server: "
        "OSError: [Errno 2] No such file or directory: '/srv/weights/flux/model_index.json'",
    )
    models = {m["model"]: m for m in gateway.http.get("/v1/inference/models").json()["image"]}
    reason = models[SCHNELL]["runtime"]["unavailable_reason"]
    assert reason.startswith("weights for this model are not present on this server")
    assert_public(reason)
    r = gateway.submit(key, {"prompt": "a", "model": SCHNELL})
    assert r.status_code == 503
    assert "weights for this model are not present on this server" in r.json()["error"]["message"]
    assert_public(r.text)
    assert SCHNELL in logged(caplog) and "/srv/weights/flux/model_index.json" in logged(caplog)


def test_a_storage_failure_is_500_without_paths(
    gateway: RunningGateway, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="remotegpu_gateway")
    root = gateway.settings.resolved_results_dir()
    (root / "inputs").write_bytes(b"not a folder")  # the real storage fails
    r = gateway.submit(key, {"prompt": "a", "model": KONTEXT, "input_images_base64": [b64(png_bytes())]})
    assert r.status_code == 500
    assert str(root) not in r.text
    assert_public(r.text)
    record = next(r for r in caplog.records if "input images" in r.getMessage())
    assert str(root) in record.getMessage() and "job " in record.getMessage()


@pytest.mark.parametrize("data", [b"hello, not an image", png_bytes()[:200]], ids=["text", "truncated png"])
def test_an_undecodable_image_is_400_without_reprs(gateway: RunningGateway, key: str, data: bytes) -> None:
    r = gateway.submit(key, {"prompt": "a", "model": KONTEXT, "input_images_base64": [b64(data)]})
    assert r.status_code == 400
    assert "does not decode to a PNG, JPEG or WebP image" in r.json()["error"]["message"]
    assert_public(r.text)


def test_readiness_without_a_database_says_so_without_internals(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down() -> int:
        raise OSError("could not open /srv/db/remotegpu.db: <sqlite3.Connection object at 0x7f00deadbeef>")

    monkeypatch.setattr(gateway.gw.store, "schema_version", down)
    r = gateway.http.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "database unavailable"
    assert_public(r.text)
