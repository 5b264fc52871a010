"""The autoscaler tick's pure steps on their own: what observe() found -> decide() -> the plan."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from remotegpu_base.catalog import ImageModelSpec
from remotegpu_base.protocol import ModelQueue
from remotegpu_operator import handlers, scaling

from tests.operator.resources import imagemodel

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def t(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(name: str, created: float, ready_after: float | None = None, scheduled: bool = True) -> dict:
    conds = [{"type": "PodScheduled", "status": "True" if scheduled else "False"}]
    if ready_after is not None:
        conds.append({"type": "Ready", "status": "True", "lastTransitionTime": t(created - ready_after)})
    return {"metadata": {"name": name, "creationTimestamp": t(created)}, "status": {"conditions": conds}}


def seen(
    name: str, pods: list[dict], queue: ModelQueue, replicas: int, ns: str = "ns", **scaling_
) -> handlers.Seen:
    body = imagemodel(name, f"test/{name}", scaling=scaling_)
    body["metadata"].update(namespace=ns, creationTimestamp=t(1000), uid="u")
    return handlers.Seen(
        body=body,
        spec=ImageModelSpec.model_validate(body["spec"]),
        dep={"metadata": {"name": f"{name}-worker"}, "spec": {"replicas": replicas}},
        queue=queue,
        pods=pods,
        unschedulable=[],
        failing=[],
        workers=handlers.worker_views(pods, queue),
        now=NOW,
    )


def test_the_cold_start_is_measured_from_the_pods():
    pods = [pod("a", created=300, ready_after=40), pod("b", created=200, ready_after=55), pod("c", created=5)]
    assert handlers.measured_cold_start(pods) == 55
    assert handlers.measured_cold_start([pod("c", created=5)]) is None


def test_a_scale_down_names_its_victims_idle_before_busy():
    pods = [pod("busy", created=600, ready_after=10), pod("idle", created=500, ready_after=10)]
    s = seen(
        "m", pods, ModelQueue(running=1, busy_workers=["busy"]), replicas=2, maxReplicas=2, idleSeconds=10
    )
    mem = handlers.Memory(last_active=NOW, last_saturated=NOW - timedelta(seconds=100))
    plan = handlers.decide(s, mem, {})
    assert plan.decision.desired == 1 and plan.victims == ["idle"]


def test_idle_workers_are_released_for_a_higher_priority_model_waiting_for_a_gpu():
    hungry = scaling.Claim("ns/hungry", priority=5, work_seconds=500, waiting_pods=1)
    pods = [pod("idle-1", created=600, ready_after=10)]
    s = seen("low", pods, ModelQueue(), replicas=1, maxReplicas=2, idleSeconds=3600)
    plan = handlers.decide(
        s, handlers.Memory(last_active=NOW, last_saturated=NOW), {("ns", "hungry"): hungry}
    )
    assert plan.decision.reason == "Reclaimed" and plan.decision.desired == 0
    assert plan.victims == ["idle-1"] and plan.beneficiary == "ns/hungry"
    # A model in another namespace competes for nothing here.
    other = scaling.Claim("other/hungry", priority=5, work_seconds=500, waiting_pods=1)
    plan = handlers.decide(
        s, handlers.Memory(last_active=NOW, last_saturated=NOW), {("other", "hungry"): other}
    )
    assert plan.decision.desired == 1


def test_the_older_imagemodel_for_a_model_wins_and_the_newer_is_held_at_zero():
    a = imagemodel("a", "test/same")
    b = imagemodel("b", "test/same")
    a["metadata"].update(namespace="ns", creationTimestamp=t(100))
    b["metadata"].update(namespace="ns", creationTimestamp=t(50))
    models = {("ns", "a"): a, ("ns", "b"): b}
    assert handlers.duplicate_of(("ns", "a"), models) is None
    assert handlers.duplicate_of(("ns", "b"), models) == "a"
    s = seen("b", [], ModelQueue(queued=3), replicas=0)
    s.duplicate_of = "a"
    plan = handlers.decide(s, handlers.Memory(), {})
    assert plan.decision.desired == 0 and plan.decision.reason == "DuplicateModel"


def test_a_wake_for_a_model_deleted_since_is_dropped():
    woken = {("ns", "gone"), ("ns", "live")}
    assert handlers.due_now({("ns", "live"): {}}, woken, due_all=False) == [("ns", "live")]
    assert not woken
    woken.add(("ns", "gone"))
    assert handlers.due_now({("ns", "live"): {}}, woken, due_all=True) == [("ns", "live")]
    assert not woken


def test_the_autoscaler_loop_waits_after_a_wake_for_a_deleted_model(monkeypatch):
    """A queue change's wake that raced the model's deletion once stayed woken for good: the
    loop stopped waiting between ticks and spun (seen on the real nodes: an operator pod at
    40 % CPU, slowing every other pod)."""
    ticked: list[tuple[str, str]] = []
    clock_reads = [0]

    async def tick(key: tuple[str, str]) -> None:
        ticked.append(key)

    def monotonic() -> float:  # read once or twice per pass of the loop
        clock_reads[0] += 1
        return time.monotonic()

    monkeypatch.setattr(handlers, "_tick_safely", tick)
    monkeypatch.setattr(handlers, "time", SimpleNamespace(monotonic=monotonic))
    monkeypatch.setattr(handlers, "_ctx", SimpleNamespace(models={("ns", "live"): {}}, interval=0.2))
    monkeypatch.setattr(handlers, "_woken", {("ns", "gone")})

    async def main() -> None:
        loop = asyncio.create_task(handlers.autoscale_forever())
        await asyncio.sleep(1.0)
        loop.cancel()

    asyncio.run(main())
    # A tick every 0.2 s for a second: a few passes, not the thousands of a busy loop.
    assert clock_reads[0] < 100, f"{clock_reads[0]} passes of the loop in a second: it never waited"
    assert ticked and set(ticked) == {("ns", "live")}
