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
    busy_workers=(),
    scale_downs=(),
    job_seconds=60.0,  # one job is one drain window of work: one worker per job
    work_seconds=None,
    cold_start_seconds=None,
    **scaling,
) -> Observation:
    s = Scaling(**{"max_replicas": 4, "idle_seconds": 60, **scaling})
    q = (
        ModelQueue(queued=queued, warming=warming, running=running, busy_workers=list(busy_workers))
        if queue
        else None
    )
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
        scale_downs=scale_downs,
        job_seconds=job_seconds,
        work_seconds=work_seconds,
        cold_start_seconds=cold_start_seconds,
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
    assert d.desired == 1 and d.reason == "PendingDropped"
    d = decide(obs(current=1, last_active=ago(100), last_saturated=ago(100), scale_down_limit=3), NOW)
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


# -- the faults of issue 13, one test each ------------------------------------------


def test_scale_down_never_goes_below_the_busy_workers_with_jobs_per_replica_above_one():
    # Two workers each run a job; jobsPerReplica 2 must not make one of them a victim.
    d = decide(
        obs(current=2, running=2, jobs_per_replica=2, last_saturated=ago(1000), last_active=ago(0)), NOW
    )
    assert d.desired == 2
    # The gateway's list of busy workers counts too (a job between lease and run).
    d = decide(obs(current=3, running=1, busy_workers=("a", "b"), last_saturated=ago(1000)), NOW)
    assert d.desired == 2


def run_for(seconds: float, every: float, o: Observation) -> tuple[int, list[str]]:
    """Feeds each decision's replicas and memory into the next, every `every` seconds."""
    reasons = []
    t = NOW
    end = NOW + timedelta(seconds=seconds)
    while t <= end:
        d = decide(o, t)
        reasons.append(d.reason)
        o = Observation(
            **{
                **o.__dict__,
                "current": d.desired,
                "last_active": d.last_active,
                "last_saturated": d.last_saturated,
                "scale_downs": d.scale_downs,
            }
        )
        t += timedelta(seconds=every)
    return o.current, reasons


def test_scale_down_is_rate_limited_in_time_not_per_decision():
    # A burst of queue events (a decision every 0.1 s) once the idle window has passed:
    # 8 -> 0 in 14 s before; now scaleDownLimit replicas per scaleDownPeriodSeconds.
    o = obs(current=8, max_replicas=8, last_active=ago(1000), last_saturated=ago(1000))
    left, reasons = run_for(14, 0.1, o)
    assert left == 7 and "ScaleDownRateLimited" in reasons
    o = obs(
        current=8,
        max_replicas=8,
        last_active=ago(1000),
        last_saturated=ago(1000),
        scale_down_limit=2,
        scale_down_period_seconds=30,
    )
    assert run_for(59, 0.5, o)[0] == 4
    assert run_for(121, 0.5, o)[0] == 0


def test_pending_pods_are_dropped_as_soon_as_their_demand_is_gone():
    # 3 replicas, 2 of them Pending for lack of a GPU; the queue just emptied (inside
    # the idle window): the Pending pods go now, the scheduled worker stays for the window.
    d = decide(obs(current=3, unschedulable=2, last_active=ago(1), last_saturated=ago(1)), NOW)
    assert d.desired == 1 and d.reason == "PendingDropped"
    # Demand fell from 3 to 1 job: the one Pending pod beyond it goes.
    d = decide(obs(current=3, queued=1, running=1, unschedulable=2, last_saturated=ago(1)), NOW)
    assert d.desired == 2


def test_a_pin_above_max_replicas_is_capped():
    d = decide(obs(pinned=9, max_replicas=2), NOW)
    assert d.desired == 2 and "capped at maxReplicas 2" in d.message


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
            assert current - d.desired <= max(down, unsched), ctx
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
        # Scale-down only after the idle window (or to shed replicas above max, or pods
        # that wait for capacity nothing needs any more).
        if d.desired < current and current <= mx:
            assert idle is None or idle >= 60 or current - d.desired <= unsched, ctx
        # Running jobs keep their workers: one worker per running job, whatever jobsPerReplica.
        if d.desired < current:
            assert d.desired >= min(running, current), ctx
        # Scale-up only happens towards the target, never past it.
        if d.desired > current:
            assert d.desired <= max(replicas_for(depth, per), mn), ctx


# -- the policy: work, drain time, cold-start payback, modes, victims, GPU arbitration --


def test_the_target_comes_from_gpu_seconds_over_the_drain_time():
    # 10 jobs of 7 GPU-s = 70 GPU-s; a 60 s drain target needs 2 workers, not 10.
    d = decide(obs(queued=10, job_seconds=7, max_replicas=10, scale_up_limit=10), NOW)
    assert d.target == 2 and d.desired == 2
    # Measured work wins over the per-job estimate; jobsPerReplica still caps it.
    d = decide(obs(queued=2, work_seconds=600, max_replicas=10, scale_up_limit=10), NOW)
    assert d.target == 2
    d = decide(
        obs(queued=4, work_seconds=600, max_replicas=10, scale_up_limit=10, target_drain_seconds=20), NOW
    )
    assert d.target == 4


def test_job_seconds_is_steps_times_megapixels_times_the_catalog_cost():
    from remotegpu_base.catalog import load_models_file

    spec = load_models_file()[0].spec
    size = spec.parameters.size.default
    want = (
        spec.parameters.steps.default
        * size.width
        * size.height
        / 1e6
        * spec.scaling.seconds_per_step_megapixel
    )
    from remotegpu_operator.scaling import job_seconds

    assert job_seconds(spec) == pytest.approx(want)


def test_no_worker_is_started_when_the_current_ones_drain_the_queue_first():
    # 1 worker, 3 jobs of 30 s: drained in 90 s; a new worker takes 120 s to load.
    d = decide(obs(current=1, queued=3, job_seconds=30, target_drain_seconds=30, cold_start_seconds=120), NOW)
    assert d.desired == 1 and d.reason == "ColdStartPayback"
    # A fast load pays back.
    d = decide(obs(current=1, queued=3, job_seconds=30, target_drain_seconds=30, cold_start_seconds=20), NOW)
    assert d.desired == 3
    # A sleeping model always wakes.
    assert decide(obs(queued=1, job_seconds=1, cold_start_seconds=600), NOW).desired == 1


def test_fixed_mode_pins_min_equals_max_and_external_mode_writes_nothing():
    d = decide(obs(current=0, mode="Fixed", min_replicas=2, max_replicas=2), NOW)
    assert d.desired == 2 and d.reason == "Fixed" and d.write
    # `kubectl scale` writes minReplicas: in Fixed mode that is the count, whatever max says.
    assert decide(obs(current=2, mode="Fixed", min_replicas=6, max_replicas=2), NOW).desired == 6
    d = decide(obs(current=3, queued=50, mode="External", last_active=ago(1e6), last_saturated=ago(1e6)), NOW)
    assert d.desired == 3 and d.reason == "External" and not d.write
    with pytest.raises(ValueError, match="minReplicas must be <= scaling.maxReplicas"):
        Scaling(mode="Queue", min_replicas=3, max_replicas=2)


def test_victims_are_waiting_pods_then_unready_then_the_newest_idle_never_busy_ones():
    from remotegpu_operator.scaling import Worker, victims

    ws = [
        Worker("busy", busy=True, started=ago(10)),
        Worker("old-idle", started=ago(500)),
        Worker("new-idle", started=ago(50)),
        Worker("loading", ready=False, started=ago(5)),
        Worker("pending", scheduled=False, ready=False, started=ago(1)),
    ]
    assert victims(ws, 4) == ["pending", "loading", "new-idle", "old-idle"]
    assert victims(ws, 5)[-1] == "busy"


def test_idle_gpus_of_other_models_are_reclaimed_by_priority_after_min_residency():
    from remotegpu_operator.scaling import Claim, Worker, reclaim

    hungry = Claim("hungry", priority=1, work_seconds=300, waiting_pods=2)
    low = Claim(
        "low",
        priority=0,
        work_seconds=50,
        workers=3,
        idle=(Worker("low-a", started=ago(600)), Worker("low-b", started=ago(10))),
    )
    idle_peer = Claim("peer", priority=1, workers=1, idle=(Worker("peer-a", started=ago(600)),))
    busy_high = Claim("high", priority=5, workers=1, idle=(Worker("high-a", started=ago(600)),))
    a = reclaim([hungry, low, idle_peer, busy_high], NOW)
    # The lower-priority model gives its resident idle worker (low-b is too young); an
    # equal-priority model with no work gives too; a higher-priority one never does.
    assert a.released_by("low") == ["low-a"]
    assert a.released_by("peer") == ["peer-a"]
    assert a.released_by("high") == []
    assert a.holders["hungry"] == ["high", "low", "peer"]
    # Nobody waits: nothing is taken.
    assert reclaim([low, idle_peer], NOW).reclaims == []
