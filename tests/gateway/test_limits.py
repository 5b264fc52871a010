"""Per-key limits against the running gateway, on SQLite and PostgreSQL, shared by two
replicas on one database: 429 with Retry-After and the IETF RateLimit headers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from tests.gateway.conftest import SCHNELL, Clock, RunningGateway, auth, png_bytes

BODY = {"model": SCHNELL, "prompt": "a lighthouse"}


def at_minute_start(clock: Clock) -> None:
    """Moves the gateway clock to 1 s into a minute: the test's requests share one window."""
    now = clock()
    clock.advance(60 - now % 60 + 1)


def admin(g: RunningGateway) -> dict[str, str]:
    return auth(g.key("admin", ["admin"]))


def test_requests_per_minute_shared_by_two_replicas(
    start_gateway: Callable[..., RunningGateway], clock: Clock
) -> None:
    a = start_gateway()
    b = start_gateway()
    key_id, token = a.gw.store.create_key("two-a-minute", ["inference"])
    r = a.http.patch(f"/v1/admin/keys/{key_id.id}/limits", json={"requests_per_minute": 2}, headers=admin(a))
    assert r.status_code == 200, r.text
    assert r.json()["requests_per_minute"] == 2
    at_minute_start(clock)

    first = a.submit(token, BODY)
    assert first.status_code == 202, first.text
    assert first.headers["RateLimit-Policy"] == '"requests";q=2;w=60'
    assert first.headers["RateLimit"].startswith('"requests";r=1;t=')
    second = b.submit(token, BODY)  # the other replica sees the first request
    assert second.status_code == 202, second.text
    assert second.headers["RateLimit"].startswith('"requests";r=0;t=')
    third = a.submit(token, BODY)
    assert third.status_code == 429, third.text
    assert third.json()["error"]["type"] == "rate_limited"
    assert "2 requests per minute" in third.json()["error"]["message"]
    retry = int(third.headers["Retry-After"])
    assert 1 <= retry <= 60
    assert third.headers["RateLimit-Policy"] == '"requests";q=2;w=60'
    assert third.headers["RateLimit"] == f'"requests";r=0;t={retry}'
    assert b.submit(token, BODY).status_code == 429
    # Other keys are not affected; nothing refused was queued.
    assert a.submit(a.key("other"), BODY).status_code == 202
    assert len([j for j in a.gw.store.queue_counts().values()]) == 1
    assert a.gw.store.queue_counts()[SCHNELL].pending == 3
    # The next minute opens a new window.
    clock.advance(60)
    assert b.submit(token, BODY).status_code == 202
    metrics = a.http.get("/metrics").text
    assert 'remotegpu_rate_limited_requests_total{limit="requests"} 1.0' in metrics


def test_a_key_without_limits_gets_no_headers(gateway: RunningGateway, key: str) -> None:
    r = gateway.submit(key, BODY)
    assert r.status_code == 202
    assert "RateLimit" not in r.headers and "RateLimit-Policy" not in r.headers


def test_concurrent_jobs_across_replicas(start_gateway: Callable[..., RunningGateway]) -> None:
    a = start_gateway()
    b = start_gateway()
    key, token = a.gw.store.create_key("two-at-once", ["inference"])
    a.gw.limits.set(key.id, {"max_concurrent_jobs": 2})
    r1 = a.submit(token, BODY)
    assert r1.status_code == 202
    assert r1.headers["RateLimit"] == '"concurrency";r=1'
    assert r1.headers["RateLimit-Policy"] == '"concurrency";q=2;qu="concurrent-requests"'
    assert b.submit(token, BODY).status_code == 202
    refused = b.submit(
        token, {**BODY, "model": "black-forest-labs/FLUX.2-klein-9B", "input_images_base64": []}
    )
    assert refused.status_code == 429, refused.text
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["RateLimit"] == '"concurrency";r=0'
    assert "may have at most 2 at once" in refused.json()["error"]["message"]
    # A finished job frees its slot.
    w = a.worker()
    try:
        lease = w.lease(SCHNELL, "w1", wait_seconds=5)
        assert lease is not None
        w.complete(lease.job_id, lease.lease_token, png_bytes())
    finally:
        w.close()
    assert b.submit(token, BODY).status_code == 202
    assert a.submit(token, BODY).status_code == 429


def test_concurrent_limit_holds_under_parallel_submits(start_gateway: Callable[..., RunningGateway]) -> None:
    """Twelve submits at once through two replicas: exactly the limit is admitted."""
    import concurrent.futures

    a = start_gateway()
    b = start_gateway()
    key, token = a.gw.store.create_key("three-at-once", ["inference"])
    a.gw.limits.set(key.id, {"max_concurrent_jobs": 3})

    def submit(i: int) -> int:
        g = (a, b)[i % 2]
        with httpx.Client(base_url=g.url, timeout=60) as http:
            return http.post("/v1/inference/image", json=BODY, headers=auth(token)).status_code

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(submit, range(12)))
    assert sorted(codes) == [202] * 3 + [429] * 9, codes
    assert a.gw.store.queue_counts()[SCHNELL].pending == 3


def test_refused_jobs_leave_no_input_images(gateway: RunningGateway) -> None:
    from tests.gateway.conftest import KONTEXT, b64

    key, token = gateway.gw.store.create_key("one", ["inference"])
    gateway.gw.limits.set(key.id, {"max_concurrent_jobs": 1})
    body = {"model": KONTEXT, "prompt": "x", "input_images_base64": [b64(png_bytes())]}
    assert gateway.submit(token, body).status_code == 202
    assert gateway.submit(token, body).status_code == 429
    inputs = gateway.settings.resolved_results_dir() / "inputs"
    assert len(list(inputs.iterdir())) == 1, "the refused job's input image was kept"


def test_gpu_seconds_per_day(gateway: RunningGateway, clock: Clock) -> None:
    key, token = gateway.gw.store.create_key("gpu", ["inference"])
    gateway.gw.limits.set(key.id, {"gpu_seconds_per_day": 30})
    r = gateway.submit(token, BODY)
    assert r.status_code == 202
    assert r.headers["RateLimit-Policy"] == '"gpu-seconds";q=30;qu="gpu-seconds";w=86400'
    assert r.headers["RateLimit"].startswith('"gpu-seconds";r=30;t=')
    w = gateway.worker()
    try:
        lease = w.lease(SCHNELL, "w1", wait_seconds=5)
        assert lease is not None
        for _ in range(8):  # the job runs 40 s of GPU time, renewing its lease (30 s) as workers do
            clock.advance(5)
            w.heartbeat(lease.job_id, lease.lease_token)
        w.complete(lease.job_id, lease.lease_token, png_bytes())
    finally:
        w.close()
    refused = gateway.submit(token, BODY)
    assert refused.status_code == 429, refused.text
    now = clock()
    to_midnight = 86400 - now % 86400
    assert abs(int(refused.headers["Retry-After"]) - to_midnight) <= 5
    assert refused.headers["RateLimit"].startswith('"gpu-seconds";r=0;t=')
    assert "GPU-seconds today" in refused.json()["error"]["message"]
    clock.advance(to_midnight + 1)  # a new UTC day
    assert gateway.submit(token, BODY).status_code == 202


def test_defaults_from_settings_and_overrides(
    start_gateway: Callable[..., RunningGateway], clock: Clock
) -> None:
    g = start_gateway(key_requests_per_minute=1)
    token = g.key("defaulted")
    at_minute_start(clock)
    assert g.submit(token, BODY).status_code == 202
    assert g.submit(token, BODY).status_code == 429
    key_id = g.gw.store.list_keys()[-1].id
    headers = admin(g)
    view = g.http.get(f"/v1/admin/keys/{key_id}/limits", headers=headers).json()
    assert view["requests_per_minute"] == 1 and view["overrides"]["requests_per_minute"] is None
    # 0: unlimited for this key, whatever the default.
    r = g.http.patch(f"/v1/admin/keys/{key_id}/limits", json={"requests_per_minute": 0}, headers=headers)
    assert r.json()["requests_per_minute"] == 0 and r.json()["overrides"]["requests_per_minute"] == 0
    assert g.submit(token, BODY).status_code == 202
    # null: back to the default.
    r = g.http.patch(f"/v1/admin/keys/{key_id}/limits", json={"requests_per_minute": None}, headers=headers)
    assert r.json()["requests_per_minute"] == 1
    assert g.submit(token, BODY).status_code == 429


def test_admin_api_validation(gateway: RunningGateway) -> None:
    headers = admin(gateway)
    assert gateway.http.patch("/v1/admin/keys/key_nope/limits", json={}, headers=headers).status_code == 404
    key_id = gateway.gw.store.create_key("k", ["inference"])[0].id
    for bad in (
        {"requests_per_minute": -1},
        {"requests_per_minute": "2"},
        {"max_concurrent_jobs": 2**31},  # beyond the database's integer
        {"gpu_seconds_per_day": 1e300},
        {"burst": 3},
    ):
        r = gateway.http.patch(f"/v1/admin/keys/{key_id}/limits", json=bad, headers=headers)
        assert r.status_code == 422, (bad, r.text)
    created = gateway.http.post(
        "/v1/admin/keys",
        json={"name": "limited", "requests_per_minute": 5, "max_concurrent_jobs": 2},
        headers=headers,
    )
    assert created.status_code == 201, created.text
    view = gateway.http.get(f"/v1/admin/keys/{created.json()['id']}/limits", headers=headers).json()
    assert (view["requests_per_minute"], view["max_concurrent_jobs"], view["gpu_seconds_per_day"]) == (
        5,
        2,
        0,
    )
    # The inference scope cannot change limits.
    r = gateway.http.patch(f"/v1/admin/keys/{key_id}/limits", json={}, headers=auth(gateway.key()))
    assert r.status_code == 403


def test_status_polls_are_not_counted(gateway: RunningGateway, clock: Clock) -> None:
    key, token = gateway.gw.store.create_key("poller", ["inference"])
    gateway.gw.limits.set(key.id, {"requests_per_minute": 1})
    at_minute_start(clock)
    job_id = gateway.submit(token, BODY).json()["job_id"]
    for _ in range(3):
        assert gateway.job(token, job_id).status_code == 200
    assert gateway.submit(token, BODY).status_code == 429


def test_cli_sets_limits_the_running_gateway_enforces(
    gateway: RunningGateway, database_url: str, clock: Clock, tmp_path: Path
) -> None:
    from tests.gateway.test_keys import run_cli

    db = ["--database-url", database_url, "--data-dir", str(tmp_path / "cli")]
    bad = run_cli("create", "too-many", "--max-concurrent-jobs", str(2**31), *db)
    assert bad.returncode == 1 and "max_concurrent_jobs" in bad.stdout
    assert all(k.name != "too-many" for k in gateway.gw.store.list_keys()), "a refused create left a key"
    made = run_cli("create", "team", "--requests-per-minute", "1", *db)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    at_minute_start(clock)
    assert gateway.submit(token, BODY).status_code == 202
    assert gateway.submit(token, BODY).status_code == 429
    updated = run_cli("update", "team", "--requests-per-minute", "5", "--max-concurrent-jobs", "2", *db)
    assert updated.returncode == 0, updated.stderr
    assert "requests-per-minute    5" in updated.stdout and "max-concurrent-jobs    2" in updated.stdout
    ok = gateway.submit(token, BODY)
    assert ok.status_code == 202
    requests, concurrency = ok.headers["RateLimit"].split(", ")
    assert requests.startswith('"requests";r=3;t=') and concurrency == '"concurrency";r=0'
    assert gateway.submit(token, BODY).status_code == 429  # two unfinished jobs
    assert run_cli("update", "nobody", "--requests-per-minute", "1", *db).returncode == 1
    assert run_cli("update", "team", "--requests-per-minute", "-1", *db).returncode == 2  # argparse
