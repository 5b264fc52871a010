"""API keys: hashing, scopes, rotation with grace, revocation, the CLI and the admin API."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from remotegpu_gateway.store import Store, api_key_secrets, api_keys

from tests.gateway.conftest import SCHNELL, Clock, RunningGateway, auth

ROOT = Path(__file__).resolve().parents[2]


def status(g: RunningGateway, key: str | None) -> int:
    headers = auth(key) if key is not None else {}
    return g.http.get("/v1/inference/jobs/none", headers=headers).status_code  # 404 once authorised


def test_auth_codes(gateway: RunningGateway) -> None:
    inference = gateway.key("inf")
    admin = gateway.key("adm", ["admin"])
    both = gateway.key("both", ["inference", "admin"])
    assert status(gateway, None) == 401
    assert status(gateway, "rgpu_0123456789abcdef.wrong") == 401
    assert status(gateway, "garbage") == 401
    assert status(gateway, inference[:-1] + ("A" if inference[-1] != "A" else "B")) == 401
    assert status(gateway, inference) == 404
    assert status(gateway, both) == 404
    assert status(gateway, admin) == 403
    r = gateway.http.get("/v1/inference/jobs/none", headers={"Authorization": f"Basic {inference}"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    # The admin API wants the admin scope.
    assert gateway.http.get("/v1/admin/keys", headers=auth(inference)).status_code == 403
    assert gateway.http.get("/v1/admin/keys", headers=auth(admin)).status_code == 200


def test_secrets_are_stored_only_as_hashes(gateway: RunningGateway) -> None:
    token = gateway.key("k")
    secret = token.partition(".")[2]
    store = gateway.gw.store
    with store._read.connect() as conn:
        rows = conn.execute(sa.select(api_key_secrets)).all()
        keys = conn.execute(sa.select(api_keys)).all()
    dump = repr(rows) + repr(keys)
    assert secret not in dump and token not in dump
    assert hashlib.sha256(secret.encode()).hexdigest() in {r.secret_hash for r in rows}


def test_last_used_is_recorded(gateway: RunningGateway) -> None:
    key, token = gateway.gw.store.create_key("k", ["inference"])
    assert key.last_used_at is None
    before = time.time()
    status(gateway, token)
    used = gateway.gw.store.get_key(key.id).last_used_at
    assert used is not None and used >= before - 1


def test_rotation_keeps_access_and_revokes_the_old_secret(gateway: RunningGateway) -> None:
    store = gateway.gw.store
    key, old = store.create_key("k", ["inference"])
    job_id = gateway.submit(old, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    new = store.rotate_key(key.id)
    assert new != old
    assert gateway.job(old, job_id).status_code == 401
    assert gateway.job(new, job_id).status_code == 200  # same identity, same jobs


def test_rotation_with_grace_period(gateway: RunningGateway, clock: Clock) -> None:
    store = gateway.gw.store
    key, old = store.create_key("k", ["inference"])
    new = store.rotate_key(key.id, grace_seconds=60)
    assert status(gateway, old) == 404 and status(gateway, new) == 404
    clock.advance(61)
    assert status(gateway, old) == 401 and status(gateway, new) == 404


def test_rotation_keeps_the_expiry_and_scopes(gateway: RunningGateway) -> None:
    """A key created to expire in an hour still expires then after a rotation (with or
    without grace), keeps its scopes, and the new secret works."""
    admin = gateway.key("root", ["admin"])
    body = {"name": "temp", "scopes": ["inference", "admin"], "expires_in_seconds": 3600}
    created = gateway.http.post("/v1/admin/keys", json=body, headers=auth(admin)).json()
    expires_at = created["secrets"][0]["expires_at"]
    for grace in (0, 60):
        r = gateway.http.post(
            f"/v1/admin/keys/{created['id']}/rotate", json={"grace_seconds": grace}, headers=auth(admin)
        )
        assert r.status_code == 200, r.text
        rotated = r.json()
        newest = max(rotated["secrets"], key=lambda s: s["created_at"])
        assert newest["expires_at"] == expires_at
        assert sorted(rotated["scopes"]) == ["admin", "inference"]
        assert status(gateway, rotated["key"]) == 404
        assert gateway.http.get("/v1/admin/keys", headers=auth(rotated["key"])).status_code == 200
    listed = {k["id"]: k for k in gateway.http.get("/v1/admin/keys", headers=auth(admin)).json()}
    live = [s for s in listed[created["id"]]["secrets"] if s["revoked_at"] is None]
    assert live and all(s["expires_at"] is not None and s["expires_at"] <= expires_at for s in live)


def test_an_expired_key_cannot_be_rotated_back_to_life(gateway: RunningGateway) -> None:
    store = gateway.gw.store
    key, _ = store.create_key("k", ["inference"], expires_in_seconds=3600)
    with store._tx() as conn:  # as if the hour had passed
        conn.execute(
            api_key_secrets.update()
            .where(api_key_secrets.c.key_id == key.id)
            .values(expires_at=time.time() - 1)
        )
    admin = gateway.key("root", ["admin"])
    r = gateway.http.post(f"/v1/admin/keys/{key.id}/rotate", headers=auth(admin))
    assert r.status_code == 409 and "expired" in r.json()["error"]["message"]


def test_revocation(gateway: RunningGateway) -> None:
    store = gateway.gw.store
    key, token = store.create_key("k", ["inference"])
    job_id = gateway.submit(token, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    store.revoke_key(key.id)
    assert gateway.job(token, job_id).status_code == 401
    assert gateway.submit(token, {"prompt": "a", "model": SCHNELL}).status_code == 401
    assert store.get_key(key.id).revoked_at is not None


def test_admin_api(gateway: RunningGateway) -> None:
    admin = gateway.key("root", ["admin"])
    h = auth(admin)
    r = gateway.http.post("/v1/admin/keys", json={"name": "app", "scopes": ["inference"]}, headers=h)
    assert r.status_code == 201
    created = r.json()
    token, key_id = created["key"], created["id"]
    assert created["scopes"] == ["inference"] and created["name"] == "app"
    job_id = gateway.submit(token, {"prompt": "a", "model": SCHNELL}).json()["job_id"]
    listing = gateway.http.get("/v1/admin/keys", headers=h).json()
    assert {k["id"] for k in listing} >= {key_id}
    assert token not in str(listing) and token.partition(".")[2] not in str(listing)
    rotated = gateway.http.post(
        f"/v1/admin/keys/{key_id}/rotate", json={"grace_seconds": 0}, headers=h
    ).json()
    assert gateway.job(token, job_id).status_code == 401
    assert gateway.job(rotated["key"], job_id).status_code == 200
    r = gateway.http.post(f"/v1/admin/keys/{key_id}/revoke", headers=h)
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    assert gateway.job(rotated["key"], job_id).status_code == 401
    assert gateway.http.post("/v1/admin/keys/key_nope/revoke", headers=h).status_code == 404
    assert gateway.http.post("/v1/admin/keys/key_nope/rotate", headers=h).status_code == 404
    r = gateway.http.post("/v1/admin/keys", json={"name": "x", "scopes": ["root"]}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["field"].startswith("scopes")


def run_cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "remotegpu.cli", "keys", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli(gateway: RunningGateway, database_url: str) -> None:
    db = ["--database-url", database_url]
    r = run_cli("create", "--name", "cli-key", "--scope", "inference", *db)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip().splitlines()[-1]
    assert token.startswith("rgpu_")
    assert status(gateway, token) == 404  # works against the running gateway
    listing = run_cli("list", *db)
    assert listing.returncode == 0 and "cli-key" in listing.stdout and token not in listing.stdout
    key_id = next(line.split()[0] for line in listing.stdout.splitlines() if "cli-key" in line)
    r = run_cli("rotate", key_id, *db)
    assert r.returncode == 0
    new = r.stdout.strip().splitlines()[-1]
    assert status(gateway, token) == 401 and status(gateway, new) == 404
    r = run_cli("revoke", key_id, *db)
    assert r.returncode == 0 and status(gateway, new) == 401
    assert "revoked" in run_cli("list", *db).stdout
    assert run_cli("revoke", "key_missing", *db).returncode == 1


def test_cli_data_dir(tmp_path: Path) -> None:
    r = run_cli(
        "create", "--name", "local", "--data-dir", str(tmp_path), env_extra={"REMOTEGPU_DATABASE_URL": ""}
    )
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip().splitlines()[-1]
    store = Store(f"sqlite:///{tmp_path / 'remotegpu.db'}")
    key = store.authenticate(token)
    assert key is not None and key.name == "local" and key.scopes == ["inference"]
    store.close()


def test_expiring_key(gateway: RunningGateway, clock: Clock) -> None:
    admin = gateway.key("root", ["admin"])
    r = gateway.http.post(
        "/v1/admin/keys", json={"name": "temp", "expires_in_seconds": 60}, headers=auth(admin)
    )
    assert r.status_code == 201 and r.json()["secrets"][0]["expires_at"] is not None
    token = r.json()["key"]
    assert status(gateway, token) == 404
    clock.advance(61)
    r = gateway.http.get("/v1/inference/jobs/none", headers=auth(token))
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
