"""The leader stops before its Lease can expire, even when the API server stops answering."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from remotegpu_base.kube import connect
from remotegpu_operator.leader import LeaderElector, LeaseConfig

from tests.fixtures.cluster import Kube

NO_API: Any = None  # for tests in which the elector makes no call


class Relay:
    """A TCP relay on loopback to the API server that can be cut: afterwards it relays nothing
    either way and accepts new connections into a black hole, leaving every socket open (a
    partitioned API server: requests hang rather than fail)."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.socks: list[socket.socket] = []
        self._cut = threading.Event()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self._cut.set()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self.sock.accept()[0]
            except OSError:
                continue
            self.socks.append(conn)
            if self._cut.is_set():
                continue
            up = socket.create_connection(self.upstream)
            self.socks.append(up)
            for src, dst in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._cut.is_set():
                    dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        for s in self.socks:
            s.close()
        self.sock.close()


@pytest.mark.cluster
def test_a_hung_renewal_cannot_outlive_the_renew_deadline(kube: Kube, namespace: str, tmp_path: Path):
    config = yaml.safe_load(kube.kubeconfig.read_text())
    server = urlparse(config["clusters"][0]["cluster"]["server"])
    assert server.hostname and server.port
    relay = Relay(server.hostname, server.port)
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{relay.port}"
    (tmp_path / "relay.kubeconfig").write_text(yaml.safe_dump(config))
    lease_seconds = 8.0

    async def main() -> float:
        # The client's own timeout (30 s) is far beyond the lease: only the deadline cuts it off.
        api = await connect(str(tmp_path / "relay.kubeconfig"), timeout=30)
        elector = LeaderElector(
            LeaseConfig(
                namespace=namespace,
                identity="me",
                lease_seconds=lease_seconds,
                renew_seconds=1,
                renew_deadline=3,
            ),
            api,
        )
        assert await elector.try_acquire_or_renew()  # the Lease, taken through the relay
        relay.cut()
        lost = await asyncio.wait_for(elector.hold(asyncio.Event()), timeout=60)
        assert lost
        return time.monotonic() - elector.last_renew

    try:
        stopped_after = asyncio.run(main())
    finally:
        relay.close()
    # A standby may take the Lease over `lease_seconds` after the last renewal: the old
    # leader must have stopped by then (it stops at the 3 s deadline; 5 s of slack).
    assert stopped_after < lease_seconds, f"stopped {stopped_after:.1f}s after the last renewal"
    lease = kube.get_json("lease", "remotegpu-operator", namespace=namespace)
    assert lease["spec"]["holderIdentity"] == "me"  # it held the real Lease until cut off


def test_hold_returns_quietly_when_asked_to_stop():
    async def main() -> bool:
        elector = LeaderElector(LeaseConfig(namespace="ns", identity="me"), NO_API)
        stop = asyncio.Event()
        stop.set()
        return await elector.hold(stop)

    assert asyncio.run(main()) is False


def test_the_first_renewal_is_due_from_the_acquisition_not_from_when_holding_starts(monkeypatch):
    # Starting kopf took longer than renew_seconds after the Lease was taken: the first
    # renewal must come at once, inside the deadline, not renew_seconds later (lost).
    async def main() -> tuple[bool, int]:
        elector = LeaderElector(
            LeaseConfig(namespace="ns", identity="me", lease_seconds=30, renew_seconds=5, renew_deadline=20),
            NO_API,
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
        t0 = time.monotonic()
        lost = await asyncio.wait_for(elector.hold(stop), timeout=60)
        assert time.monotonic() - t0 < 5, "waited a whole renew period first"
        return lost, calls

    assert asyncio.run(main()) == (False, 1)
