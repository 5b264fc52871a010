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
    from remotegpu_gateway.store import MIGRATIONS

    latest = MIGRATIONS[-1][0]
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


def test_a_version_2_database_gets_the_extension_columns_and_keeps_its_jobs(database_url: str) -> None:
    """Migration 3 (priority, deadlines, webhooks, idempotency keys) on a database that a
    gateway before it left: its jobs stay, with the defaults (normal priority)."""
    import sqlalchemy as sa
    from remotegpu_gateway.store import schema_migrations

    store = Store(database_url)
    store.migrate()
    key, _ = store.create_key("k", ["inference"])
    job = store.create_job(owner_key_id=key.id, model="m", request={}, input_image_keys=[])
    with store._write.begin() as conn:  # as a gateway at version 2 left it
        for index in ("ix_jobs_queue_priority", "ix_jobs_deadline", "ix_jobs_owner_created"):
            conn.execute(sa.text(f"DROP INDEX {index}"))
        for column in ("priority", "deadline_at", "webhook_url", "webhook_events", "base_url", "revision"):
            conn.execute(sa.text(f"ALTER TABLE jobs DROP COLUMN {column}"))
        conn.execute(sa.text("ALTER TABLE api_keys DROP COLUMN webhook_secret"))
        conn.execute(sa.text("DROP TABLE idempotency_keys"))
        conn.execute(sa.text("DROP TABLE webhook_deliveries"))
        conn.execute(schema_migrations.delete().where(schema_migrations.c.version >= 3))
    assert store.migrate()[0] == 3
    again = store.get_job(job.id)
    assert again is not None and again.priority == 0 and again.revision == 0 and again.deadline_at is None
    assert store.set_webhook_secret(key.id).startswith("whsec_")
    store.close()
