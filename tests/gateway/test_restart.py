"""Nothing accepted with a 2xx is lost on a gateway restart: jobs in every state survive."""

from __future__ import annotations

from typing import Any

import httpx
from remotegpu_gateway.store import MIGRATIONS, Store

from tests.gateway.conftest import SCHNELL, auth, png_bytes


def test_jobs_in_every_state_survive_a_restart(start_gateway: Any) -> None:
    g = start_gateway(lease_ttl_seconds=30)
    key = g.key()
    names = ("succeeded", "failed", "cancelled", "running", "cancel_requested", "pending")
    ids = {name: g.submit(key, {"prompt": name, "model": SCHNELL}).json()["job_id"] for name in names}
    g.http.post(f"/v1/inference/jobs/{ids['cancelled']}/cancel", headers=auth(key))
    w = g.worker()
    leases = {}
    for name in ("succeeded", "failed", "running", "cancel_requested"):  # FIFO: in submit order
        lease = w.lease(SCHNELL, "w1", wait_seconds=2)
        assert lease is not None and lease.job_id == ids[name]
        leases[name] = lease
    png = png_bytes()
    w.complete(ids["succeeded"], leases["succeeded"].lease_token, png)
    w.fail(ids["failed"], leases["failed"].lease_token, "boom")
    g.http.post(f"/v1/inference/jobs/{ids['cancel_requested']}/cancel", headers=auth(key))
    w.close()
    before = {n: g.job(key, j).json() for n, j in ids.items()}
    assert {n: s["status"] for n, s in before.items()} == {
        "succeeded": "succeeded",
        "failed": "failed",
        "cancelled": "cancelled",
        "running": "running",
        "pending": "queued",
        "cancel_requested": "running",
    }
    port = g.port
    g.stop()

    g2 = start_gateway(port=port, lease_ttl_seconds=30)
    after = {n: g2.job(key, j).json() for n, j in ids.items()}
    for n in ids:
        for field in ("job_id", "model", "created_at", "started_at", "completed_at", "error_message"):
            assert after[n][field] == before[n][field], (n, field)
    # The new process has not heard from the worker yet: the pending job is warming.
    assert after["pending"]["status"] == "warming"
    assert after["running"]["status"] == "running" and after["failed"]["error_message"] == "boom"
    assert httpx.get(after["succeeded"]["result_url"]).content == png
    # The worker carries on with its leases across the restart.
    w = g2.worker()
    assert w.heartbeat(ids["running"], leases["running"].lease_token).action == "continue"
    assert w.heartbeat(ids["cancel_requested"], leases["cancel_requested"].lease_token).action == "cancel"
    w.complete(ids["running"], leases["running"].lease_token, png)
    w.release(ids["cancel_requested"], leases["cancel_requested"].lease_token)
    lease = w.lease(SCHNELL, "w2", wait_seconds=2)
    assert lease is not None and lease.job_id == ids["pending"]
    w.close()
    assert g2.job(key, ids["running"]).json()["status"] == "succeeded"
    assert g2.job(key, ids["cancel_requested"]).json()["status"] == "cancelled"


def test_migrations_are_versioned_and_idempotent(database_url: str) -> None:
    store = Store(database_url)
    latest = MIGRATIONS[-1][0]
    first = store.migrate()
    assert first == [v for v, _, _ in MIGRATIONS] and first[:3] == [1, 2, 3]
    assert store.migrate() == []
    assert store.schema_version() == latest
    store.close()
    again = Store(database_url)
    assert again.migrate() == [] and again.schema_version() == latest
    again.close()


def test_a_version_1_database_gets_the_per_model_stats_index(database_url: str) -> None:
    import sqlalchemy as sa
    from remotegpu_gateway.store import schema_migrations

    store = Store(database_url)
    store.migrate()
    with store._write.begin() as conn:  # as a gateway before migration 2 left it
        conn.execute(sa.text("DROP INDEX ix_jobs_model_completed"))
        conn.execute(schema_migrations.delete().where(schema_migrations.c.version >= 2))
    assert store.schema_version() == 1
    # The later migrations run again too, and find their tables and indexes in place.
    later = [v for v, _, _ in MIGRATIONS if v >= 2]
    assert store.migrate() == later and store.schema_version() == later[-1]
    with store._read.connect() as conn:
        assert "ix_jobs_model_completed" in {i["name"] for i in sa.inspect(conn).get_indexes("jobs")}
    store.close()
