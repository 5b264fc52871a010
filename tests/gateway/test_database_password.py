"""The chart's bundled PostgreSQL: the gateway's URL names no password (it is rendered in
the Deployment, the same every time) and libpq takes the password from PGPASSWORD, which
the chart fills from the generated Secret. Against a server that requires the password."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from remotegpu_gateway.settings import Settings

from tests.fixtures.postgres import PostgresServer
from tests.gateway.conftest import SCHNELL, WORKER_TOKEN, RunningGateway

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def guarded() -> Iterator[PostgresServer]:
    server = PostgresServer(password=secrets.token_hex(24)).start()
    try:
        yield server
    finally:
        server.stop()


def settings(server: PostgresServer, tmp_path: Path) -> Settings:
    assert ":" not in server.url.split("//")[1].split("@")[0]  # no password in the URL
    return Settings(database_url=server.url, data_dir=tmp_path / "data", worker_token=WORKER_TOKEN)


def test_password_from_pgpassword(guarded: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PGPASSWORD", guarded.password or "")
    g = RunningGateway(settings(guarded, tmp_path))
    try:
        key = g.key()
        job = g.submit(key, {"model": SCHNELL, "prompt": "a lighthouse"})
        assert job.is_success, job.text
        w = g.worker()  # the lease long-poll wakes through LISTEN: a connection of its own
        try:
            lease = w.lease(SCHNELL, "w1", wait_seconds=5)
        finally:
            w.close()
        assert lease is not None and lease.job_id == job.json()["job_id"]
    finally:
        g.stop()


def test_without_the_password_the_gateway_says_so(
    guarded: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    with pytest.raises(Exception, match="password"):
        RunningGateway(settings(guarded, tmp_path))
