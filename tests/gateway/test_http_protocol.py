"""HTTP details clients rely on: the Bearer challenge, HEAD on the result URL, CORS."""

from __future__ import annotations

import argparse
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from remotegpu_gateway.settings import http_settings

from tests.gateway.conftest import SCHNELL, RunningGateway, auth, png_bytes
from tests.gateway.test_server import start_gateway

BAD_KEY = "rgpu_0123456789abcdef.not-a-valid-secret"


def test_every_401_carries_the_bearer_challenge(gateway: RunningGateway) -> None:
    key = gateway.key()
    job_id = gateway.submit(key, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    result = f"/v1/inference/jobs/{job_id}/result"
    unauthorised = [
        gateway.http.get(f"/v1/inference/jobs/{job_id}"),
        gateway.http.get(f"/v1/inference/jobs/{job_id}", headers=auth(BAD_KEY)),
        gateway.http.post("/v1/inference/image", json={"prompt": "a", "model": SCHNELL}),
        gateway.http.post(
            "/v1/inference/image", json={"prompt": "a", "model": SCHNELL}, headers=auth(BAD_KEY)
        ),
        gateway.http.post(f"/v1/inference/jobs/{job_id}/cancel", headers=auth(BAD_KEY)),
        gateway.http.get(result),
        gateway.http.get(result, params={"expires": 9999999999, "signature": "forged"}),
        gateway.http.get(result, headers=auth(BAD_KEY)),
        gateway.http.get("/v1/admin/keys", headers=auth(BAD_KEY)),
        gateway.http.post(
            "/internal/v1/lease", json={"model": SCHNELL, "worker_id": "w"}, headers=auth(BAD_KEY)
        ),
    ]
    for r in unauthorised:
        assert r.status_code == 401, (r.request.url, r.text)
        assert r.headers.get("www-authenticate") == "Bearer", (r.request.url, r.headers)


def test_head_on_the_result_url(gateway: RunningGateway) -> None:
    key = gateway.key()
    submitted = gateway.submit(key, {"prompt": "a", "model": SCHNELL}).json()
    assert gateway.http.head(submitted["result_url"]).status_code == 409  # not succeeded yet
    image = png_bytes(8, 8)
    w = gateway.worker()
    lease = w.lease(SCHNELL, "w1", wait_seconds=5)
    assert lease is not None
    w.complete(lease.job_id, lease.lease_token, image)
    w.close()
    url = gateway.job(key, submitted["job_id"]).json()["result_url"]
    head = gateway.http.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "image/png"
    assert int(head.headers["content-length"]) == len(image)
    assert gateway.http.get(url).content == image
    owner = gateway.http.head(f"/v1/inference/jobs/{submitted['job_id']}/result", headers=auth(key))
    assert owner.status_code == 200
    forged = gateway.http.head(url.replace("signature=", "signature=x"))
    assert forged.status_code == 401 and forged.headers["www-authenticate"] == "Bearer"


def _preflight(g: RunningGateway, origin: str) -> httpx.Response:
    return g.http.options(
        "/v1/inference/image",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_cors_is_off_by_default(gateway: RunningGateway) -> None:
    r = _preflight(gateway, "https://app.example.com")
    assert "access-control-allow-origin" not in r.headers
    r = gateway.http.get("/v1/inference/models", headers={"Origin": "https://app.example.com"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_allows_only_the_listed_origins(start_gateway: Callable[..., RunningGateway]) -> None:
    allowed = "https://app.example.com"
    g = start_gateway(cors_origins=[allowed, "http://localhost:5173"])
    r = _preflight(g, allowed)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == allowed
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    denied = _preflight(g, "https://evil.example.net")
    assert "access-control-allow-origin" not in denied.headers
    # Answers, errors included, are readable by the allowed page only.
    key = g.key()
    ok = g.http.post(
        "/v1/inference/image",
        json={"prompt": "a", "model": SCHNELL},
        headers={**auth(key), "Origin": allowed},
    )
    assert ok.status_code == 202 and ok.headers["access-control-allow-origin"] == allowed
    refused = g.http.get("/v1/inference/jobs/x", headers={"Origin": allowed})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == allowed
    other = g.http.get("/v1/inference/models", headers={"Origin": "https://evil.example.net"})
    assert "access-control-allow-origin" not in other.headers


def test_cors_origins_from_the_command_line_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, url, _data, _env = start_gateway(
        tmp_path, f"sqlite:///{tmp_path}/gw.db", [SCHNELL], "--cors-origin", "https://app.example.com"
    )
    try:
        r = httpx.get(f"{url}/v1/inference/models", headers={"Origin": "https://app.example.com"})
        assert r.headers.get("access-control-allow-origin") == "https://app.example.com"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    monkeypatch.setenv("REMOTEGPU_CORS_ORIGINS", "https://a.example.com, http://localhost:5173/")
    got = http_settings(argparse.Namespace(cors_origin=None))["cors_origins"]
    assert got == ["https://a.example.com", "http://localhost:5173"]
    monkeypatch.setenv("REMOTEGPU_CORS_ORIGINS", "https://a.example.com/app")
    with pytest.raises(SystemExit, match="scheme://host"):
        http_settings(argparse.Namespace(cors_origin=None))
