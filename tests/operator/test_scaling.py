"""The autoscaler's rules, one by one, and exhaustively over a grid of inputs."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from remotegpu_base.catalog import Scaling
from remotegpu_base.protocol import ModelQueue
from remotegpu_operator.scaling import Direction, Observation, decide, replicas_for

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def obs(
    current=0,
    queued=0,
    warming=0,
    running=0,
    pinned=None,
    unschedulable=0,
    last_active=None,
    last_saturated=None,
    queue=True,
    was_active=False,
    was_saturated=False,
    **scaling,
) -> Observation:
    s = Scaling(**{"max_replicas": 4, "idle_seconds": 60, **scaling})
    q = ModelQueue(queued=queued, warming=warming, running=running) if queue else None
    return Observation(
        scaling=s,
        pinned=pinned,
        queue=q,
        current=current,
        unschedulable=unschedulable,
        last_active=last_active,
        last_saturated=last_saturated,
        was_active=was_active,
        was_saturated=was_saturated,
    )


def test_a_new_model_sleeps():
    d = decide(obs(), NOW)
    assert d.desired == 0 and d.direction_from(0) is Direction.NONE


def test_the_first_job_wakes_a_sleeping_model_at_once():
    d = decide(obs(warming=1), NOW)
    assert d.desired == 1 and d.reason == "ScaledUp"
    assert d.last_active == NOW and d.last_saturated == NOW


def test_depth_counts_queued_warming_and_running():
    assert decide(obs(queued=1, warming=1, running=1, current=3), NOW).desired == 3


@pytest.mark.parametrize(
    ("depth", "per", "want"), [(0, 1, 0), (1, 1, 1), (1, 2, 1), (2, 2, 1), (3, 2, 2), (9, 4, 3)]
)
def test_jobs_per_replica(depth, per, want):
    assert replicas_for(depth, per) == want
    assert (
        decide(obs(queued=depth, jobs_per_replica=per, max_replicas=10, scale_up_limit=10), NOW).desired
        == want
    )


def test_scale_up_is_clamped_to_max_and_limited_per_decision():
    assert decide(obs(queued=100, max_replicas=3, scale_up_limit=10), NOW).desired == 3
    assert decide(obs(queued=100, max_replicas=10, scale_up_limit=2), NOW).desired == 2
    assert decide(obs(queued=100, current=2, max_replicas=10, scale_up_limit=2), NOW).desired == 4


def test_min_replicas_is_a_floor_even_when_idle():
    assert decide(obs(min_replicas=2), NOW).desired == 2
    assert (
        decide(obs(min_replicas=2, current=2, last_active=ago(1e6), last_saturated=ago(1e6)), NOW).desired
        == 2
    )


def test_a_pin_wins_over_everything():
    assert decide(obs(pinned=3, queued=100), NOW).desired == 3
    assert decide(obs(pinned=0, queued=100, current=2), NOW).desired == 0
    d = decide(obs(pinned=2, queue=False), NOW)
    assert d.desired == 2 and d.reason == "Pinned"


def test_no_scale_down_inside_the_idle_window():
    d = decide(obs(current=1, last_active=ago(30), last_saturated=ago(30)), NOW)
    assert d.desired == 1 and d.reason == "IdleWindow"


def test_scale_to_zero_after_the_idle_window():
    d = decide(obs(current=1, last_active=ago(61), last_saturated=ago(61)), NOW)
    assert d.desired == 0 and d.reason == "ScaledToZero"


def test_idle_window_survives_a_restart_through_status_times():
    # A fresh operator with no remembered times would scale down at once; the status times prevent it.
    kept = decide(obs(current=2, last_active=ago(5), last_saturated=ago(5)), NOW)
    assert kept.desired == 2


def test_the_idle_window_starts_when_the_work_is_seen_ending():
    # The last look with work was 50 s ago; now the queue is empty: the window starts now.
    d = decide(
        obs(current=1, last_active=ago(50), last_saturated=ago(50), was_active=True, was_saturated=True), NOW
    )
    assert d.desired == 1 and d.last_active == NOW and d.last_saturated == NOW
    d = decide(obs(current=2, last_active=ago(50), last_saturated=ago(50), was_active=True), NOW)
    assert d.last_active == NOW and d.last_saturated == ago(50)


def test_scale_down_is_limited_per_decision():
    d = decide(obs(current=4, last_active=ago(100), last_saturated=ago(100), scale_down_limit=1), NOW)
    assert d.desired == 3
    d = decide(obs(current=4, last_active=ago(100), last_saturated=ago(100), scale_down_limit=3), NOW)
    assert d.desired == 1


def test_partial_scale_down_while_busy_spares_running_jobs():
    # 4 replicas, 2 jobs running, queue has not needed 4 for longer than the window: shed idle ones only.
    d = decide(obs(current=4, running=2, last_saturated=ago(100), scale_down_limit=4), NOW)
    assert d.desired == 2
    assert d.last_active == NOW


def test_a_busy_model_keeps_its_workers():
    d = decide(obs(current=2, running=2, last_saturated=ago(1000), last_active=ago(1000)), NOW)
    assert d.desired == 2 and d.last_saturated == NOW


def test_a_model_with_waiting_jobs_never_goes_to_zero():
    for unsched in (0, 1):
        d = decide(
            obs(current=1, warming=1, unschedulable=unsched, last_active=ago(1e6), last_saturated=ago(1e6)),
            NOW,
        )
        assert d.desired >= 1


def test_pending_pods_without_gpus_block_further_scale_up():
    d = decide(obs(current=2, queued=4, unschedulable=1), NOW)
    assert d.desired == 2 and d.capacity_blocked and d.reason == "CapacityBlocked"
    assert "cannot be scheduled" in d.message


def test_pending_pods_do_not_block_a_scale_down():
    d = decide(
        obs(current=3, unschedulable=2, last_active=ago(100), last_saturated=ago(100), scale_down_limit=3),
        NOW,
    )
    assert d.desired == 0


def test_unknown_queue_holds_replicas():
    d = decide(obs(current=3, queue=False, last_active=ago(1e6), last_saturated=ago(1e6)), NOW)
    assert d.desired == 3 and d.reason == "QueueUnknown"
    assert decide(obs(current=0, queue=False, min_replicas=1), NOW).desired == 1


def test_lowered_max_sheds_excess_without_waiting():
    d = decide(obs(current=4, queued=10, max_replicas=2, scale_down_limit=1), NOW)
    assert d.desired == 3
    d = decide(obs(current=4, queued=10, max_replicas=2, scale_down_limit=5), NOW)
    assert d.desired == 2


def test_max_zero_disables_a_model():
    assert decide(obs(current=0, queued=3, max_replicas=0), NOW).desired == 0


GRID = list(
    itertools.product(
        range(0, 5),  # current
        range(0, 4),  # queued
        range(0, 3),  # running
        range(0, 3),  # unschedulable
        (None, 10.0, 1000.0),  # seconds since saturated/active
        (0, 1),  # min
        (1, 3),  # max
        (1, 2),  # jobs per replica
        (1, 2),  # up limit
        (1, 2),  # down limit
    )
)


@pytest.mark.parametrize("case", [GRID])
def test_invariants_over_a_grid(case):
    for current, queued, running, unsched, idle, mn, mx, per, up, down in case:
        since = None if idle is None else ago(idle)
        o = obs(
            current=current,
            queued=queued,
            running=running,
            unschedulable=unsched,
            last_active=since,
            last_saturated=since,
            min_replicas=mn,
            max_replicas=mx,
            jobs_per_replica=per,
            scale_up_limit=up,
            scale_down_limit=down,
            idle_seconds=60,
        )
        d = decide(o, NOW)
        depth = queued + running
        ctx = (current, queued, running, unsched, idle, mn, mx, per, up, down, d)
        assert d.desired >= 0, ctx
        # Steps are bounded by the limits.
        assert d.desired - current <= up, ctx
        if current <= mx:
            assert current - d.desired <= down, ctx
            assert d.desired <= max(mx, current), ctx
        # Never below the floor, never above the max when scaling up.
        if d.desired > current:
            assert d.desired <= mx, ctx
            if unsched:  # blocked on capacity: only the floor (min, or one worker for waiting jobs)
                assert d.desired <= max(mn, 1 if depth else 0), ctx
        assert d.desired >= min(mn, max(current, mn)), ctx
        # Work present: never zero (max >= 1 here).
        if depth > 0:
            assert d.desired >= 1 or current == 0 and unsched > 0, ctx
        # Scale-down only after the idle window (or to shed replicas above max).
        if d.desired < current and current <= mx:
            assert idle is None or idle >= 60, ctx
        # Running jobs keep their workers.
        if d.desired < current:
            assert d.desired >= min(replicas_for(running, per), current), ctx
        # Scale-up only happens towards the target, never past it.
        if d.desired > current:
            assert d.desired <= max(replicas_for(depth, per), mn), ctx
