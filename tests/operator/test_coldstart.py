"""The pod's cold-start phases the operator reports (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

from remotegpu_base.protocol import ColdStartPhase as P
from remotegpu_operator import coldstart


def pod(name: str, created: str, scheduled: str | None = None, started: str | None = None) -> dict:
    status: dict = {}
    if scheduled:
        status["conditions"] = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled}]
    if started:
        status["containerStatuses"] = [{"name": "worker", "state": {"running": {"startedAt": started}}}]
    return {"metadata": {"name": name, "creationTimestamp": created}, "status": status}


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_phases_of_a_pod_created_by_the_scale_up():
    decision = datetime(2026, 11, 28, 10, 0, 0, 400000, tzinfo=UTC)
    p = pod("w-1", "2026-11-28T10:00:00Z", "2026-11-28T10:00:01Z", "2026-11-28T10:00:03Z")
    assert coldstart.pod_phases(p, decision) == {
        P.SCALE_DECISION: decision.timestamp(),
        P.POD_SCHEDULED: ts("2026-11-28T10:00:01Z"),
        P.CONTAINER_STARTED: ts("2026-11-28T10:00:03Z"),
    }


def test_a_pod_older_than_the_last_scale_up_has_no_decision_phase():
    decision = datetime(2026, 11, 28, 10, 5, tzinfo=UTC)
    p = pod("w-old", "2026-11-28T10:00:00Z", "2026-11-28T10:00:01Z", "2026-11-28T10:00:03Z")
    assert P.SCALE_DECISION not in coldstart.pod_phases(p, decision)


def test_only_started_unreported_pods_are_reported():
    pods = [
        pod("pending", "2026-11-28T10:00:00Z", "2026-11-28T10:00:01Z"),
        pod("started", "2026-11-28T10:00:00Z", "2026-11-28T10:00:01Z", "2026-11-28T10:00:02Z"),
        pod("done", "2026-11-28T10:00:00Z", "2026-11-28T10:00:01Z", "2026-11-28T10:00:02Z"),
    ]
    out = coldstart.to_report(pods, None, reported={"done"})
    assert [name for name, _ in out] == ["started"]


def test_with_a_fetch_init_container_the_pod_starts_with_it():
    p = pod("w-2", "2026-11-28T10:00:00Z", "2026-11-28T10:00:01Z", "2026-11-28T10:00:09Z")
    fetch = {
        "name": "fetch-weights",
        "state": {"terminated": {"startedAt": "2026-11-28T10:00:02Z", "exitCode": 0}},
    }
    p["status"]["initContainerStatuses"] = [fetch]
    assert coldstart.pod_phases(p, None)[P.CONTAINER_STARTED] == ts("2026-11-28T10:00:02Z")
    # while only the fetcher runs, nothing is reported yet
    fetching = pod("w-3", "2026-11-28T10:00:00Z", "2026-11-28T10:00:01Z")
    fetching["status"]["initContainerStatuses"] = [
        {"name": "fetch-weights", "state": {"running": {"startedAt": "2026-11-28T10:00:02Z"}}}
    ]
    assert coldstart.to_report([fetching], None, set()) == []
