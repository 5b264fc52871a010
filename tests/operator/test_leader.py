"""The leader stops before its Lease can expire, even when the API server stops answering."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import kopf
from remotegpu_operator.kubeapi import KubeAPI
from remotegpu_operator.leader import LeaderElector, LeaseConfig


class BlackHole:
    """A TCP server on loopback that accepts connections and never answers (a partitioned API server)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        for c in self.conns:
            c.close()
        self.sock.close()


def test_a_hung_renewal_cannot_outlive_the_renew_deadline():
    hole = BlackHole()
    lease_seconds = 8.0

    async def main() -> float:
        # The client's own timeout (30 s) is far beyond the lease: only the deadline cuts it off.
        api = KubeAPI(kopf.ConnectionInfo(server=f"http://127.0.0.1:{hole.port}"), timeout=30)
        elector = LeaderElector(
            LeaseConfig(
                namespace="ns", identity="me", lease_seconds=lease_seconds, renew_seconds=1, renew_deadline=3
            ),
            api,
        )
        elector.last_renew = time.monotonic()  # it held the Lease until now
        try:
            lost = await asyncio.wait_for(elector.hold(asyncio.Event()), timeout=60)
        finally:
            await api.aclose()
        assert lost
        return time.monotonic() - elector.last_renew

    try:
        stopped_after = asyncio.run(main())
    finally:
        hole.close()
    # A standby may take the Lease over `lease_seconds` after the last renewal: the old
    # leader must have stopped by then (it stops at the 3 s deadline; 5 s of slack).
    assert stopped_after < lease_seconds, f"stopped {stopped_after:.1f}s after the last renewal"


def test_hold_returns_quietly_when_asked_to_stop():
    async def main() -> bool:
        api = KubeAPI(kopf.ConnectionInfo(server="http://127.0.0.1:9"), timeout=1)
        elector = LeaderElector(LeaseConfig(namespace="ns", identity="me"), api)
        stop = asyncio.Event()
        stop.set()
        try:
            return await elector.hold(stop)
        finally:
            await api.aclose()

    assert asyncio.run(main()) is False


def test_the_first_renewal_is_due_from_the_acquisition_not_from_when_holding_starts(monkeypatch):
    # Starting kopf took longer than renew_seconds after the Lease was taken: the first
    # renewal must come at once, inside the deadline, not renew_seconds later (lost).
    async def main() -> tuple[bool, int]:
        api = KubeAPI(kopf.ConnectionInfo(server="http://127.0.0.1:9"), timeout=1)
        elector = LeaderElector(
            LeaseConfig(namespace="ns", identity="me", lease_seconds=30, renew_seconds=5, renew_deadline=20),
            api,
        )
        calls = 0
        stop = asyncio.Event()

        async def renew() -> bool:
            nonlocal calls
            calls += 1
            elector.last_renew = time.monotonic()
            stop.set()
            return True

        monkeypatch.setattr(elector, "try_acquire_or_renew", renew)
        elector.last_renew = time.monotonic() - 6  # taken 6 s ago: a renewal is overdue
        try:
            t0 = time.monotonic()
            lost = await asyncio.wait_for(elector.hold(stop), timeout=60)
            assert time.monotonic() - t0 < 5, "waited a whole renew period first"
            return lost, calls
        finally:
            await api.aclose()

    assert asyncio.run(main()) == (False, 1)
