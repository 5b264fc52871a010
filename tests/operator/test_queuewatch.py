"""The event-driven path: the queue watcher wakes a model's daemon within milliseconds of a change."""

from __future__ import annotations

import threading
import time

from remotegpu_operator.main import operator_settings
from remotegpu_operator.queuewatch import QueueWatcher

from tests.operator.conftest import TOKEN, QueueStub


def test_a_queue_change_wakes_only_that_models_daemon_at_once():
    stub = QueueStub()
    watcher = QueueWatcher(stub.url, TOKEN, wait_seconds=25)
    woken = threading.Event()
    other = threading.Event()
    watcher.register("m/a", 1, woken.set)
    watcher.register("m/b", 2, other.set)
    watcher.start()
    try:
        deadline = time.monotonic() + 5
        while watcher.get("m/a") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.get("m/a") is not None and watcher.get("m/a").depth == 0
        time.sleep(0.2)  # the watcher now sits in a long-poll
        woken.clear()
        other.clear()
        t0 = stub.set("m/a", warming=1)
        # Without the wake-up the watcher would see it only after its 25 s long-poll; 10 s
        # is a margin a loaded machine meets.
        assert woken.wait(15), "not woken"
        assert time.monotonic() - t0 < 10
        assert watcher.get("m/a").warming == 1
        assert not other.is_set(), "a model whose queue did not change was woken"
    finally:
        watcher.stop()
        stub.close()


def test_an_unreachable_gateway_makes_the_queue_unknown():
    stub = QueueStub()
    watcher = QueueWatcher(stub.url, TOKEN, wait_seconds=0.2, stale_after=1.0)
    try:
        watcher.start()
        deadline = time.monotonic() + 5
        while watcher.get("m/a") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.get("m/a") is not None
        stub.close()
        deadline = time.monotonic() + 5
        while watcher.get("m/a") is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watcher.get("m/a") is None
    finally:
        watcher.stop()


def test_no_gateway_url_means_no_queue():
    w = QueueWatcher(None, TOKEN)
    w.start()
    assert not w.available and w.get("m/a") is None


def test_watch_streams_have_timeouts():
    # kopf #585/#847: without these a silently dropped watch hangs the operator forever.
    s = operator_settings()
    assert s.watching.server_timeout and s.watching.client_timeout
    assert s.watching.client_timeout > s.watching.server_timeout
    assert s.watching.connect_timeout
    assert s.peering.standalone and s.scanning.disabled


def test_why_the_queue_is_unknown():
    assert QueueWatcher(None, TOKEN).why_unknown()[0] == "NoGateway"
    w = QueueWatcher("http://127.0.0.1:9", TOKEN, wait_seconds=0.1, stale_after=0.5)
    w.start()
    try:
        assert w.why_unknown()[0] == "Waiting"  # just started, nothing read yet
        time.sleep(0.8)
        assert w.get("m/a") is None and w.why_unknown()[0] == "GatewayUnreachable"
    finally:
        w.stop()


def test_only_a_change_that_matters_wakes_a_model_not_the_age_of_its_backlog():
    # Every queue change bumps the snapshot, and every backlogged model's oldest wait
    # grows with it: that alone must not wake (and re-patch) every model.
    stub = QueueStub()
    stub.set("m/a", queued=1, oldest_wait_seconds=1.0)
    stub.set("m/b", queued=3, oldest_wait_seconds=5.0)
    watcher = QueueWatcher(stub.url, TOKEN, wait_seconds=25)
    woken_a, woken_b = threading.Event(), threading.Event()
    watcher.register("m/a", 1, woken_a.set)
    watcher.register("m/b", 2, woken_b.set)
    watcher.start()
    try:
        deadline = time.monotonic() + 10
        while watcher.get("m/b") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.get("m/b") is not None
        time.sleep(0.2)
        woken_a.clear()
        woken_b.clear()
        with stub.cond:  # one snapshot: a gets a job, b's backlog only ages
            stub.models["m/a"] = stub.models["m/a"].model_copy(
                update={"queued": 2, "oldest_wait_seconds": 2.0}
            )
            stub.models["m/b"] = stub.models["m/b"].model_copy(update={"oldest_wait_seconds": 6.0})
            stub.version += 1
            stub.cond.notify_all()
        assert woken_a.wait(15), "a was not woken"
        deadline = time.monotonic() + 10
        while watcher.get("m/b").oldest_wait_seconds != 6.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.get("m/b").oldest_wait_seconds == 6.0
        assert not woken_b.is_set(), "a model whose backlog only aged was woken"
    finally:
        watcher.stop()
        stub.close()
