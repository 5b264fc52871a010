"""Leader election on a coordination.k8s.io/v1 Lease, the way client-go does it.

Why not kopf peering: peering is a pause-while-a-higher-priority-operator-runs
mechanism for debugging; two replicas with the same priority both pause ("possibly
conflicting operators"), and it needs kopf's own peering CRDs. A Lease is the
standard for N replicas: exactly one holds it and reconciles; the others wait and
take over within `lease_seconds` when the holder stops renewing.

- The holder renews every `renew_seconds`; if it cannot renew for
  `renew_deadline` it stops reconciling at once (the process exits and restarts as
  a standby). Each renewal attempt is cut off at that deadline too (a hung API
  call must not outlive it), and the deadline is shorter than the lease, so the
  old holder has stopped before any standby can take the Lease over.
- A candidate judges expiry by its own clock: it remembers when it last saw the
  Lease change (client-go's observedTime), so clock skew between nodes does not
  matter.
- Writes use the Lease's resourceVersion: of two candidates racing for an expired
  Lease, one gets a 409 Conflict and stays a standby.
- On a clean shutdown the holder releases the Lease (clears holderIdentity), so a
  standby takes over immediately instead of after the lease duration.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from remotegpu_base import kube
from remotegpu_base.kube import Lease

log = logging.getLogger(__name__)


@dataclass
class LeaseConfig:
    namespace: str
    name: str = "remotegpu-operator"
    identity: str = "unknown"
    lease_seconds: float = 15.0
    renew_seconds: float = 5.0
    renew_deadline: float = 10.0


def micro_time(t: datetime | None = None) -> str:
    return (t or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, config: LeaseConfig, api: kube.Api):
        self.config = config
        self.api = api
        self._observed: tuple[Any, Any] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0  # monotonic
        self.last_renew = 0.0  # monotonic time of our last successful acquire/renew

    def _spec(self, acquire_time: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.config.identity,
            "leaseDurationSeconds": max(1, int(round(self.config.lease_seconds))),
            "acquireTime": acquire_time,
            "renewTime": micro_time(),
            "leaseTransitions": transitions,
        }

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this identity holds the Lease afterwards."""
        c = self.config
        lease = await kube.get(self.api, Lease, c.namespace, c.name)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": c.name, "namespace": c.namespace},
                "spec": self._spec(micro_time(), 0),
            }
            try:
                await kube.create(self.api, Lease, body)
            except kube.ServerError as e:
                if kube.status_of(e) == 409:
                    return False
                raise
            self.last_renew = time.monotonic()
            log.info("acquired the leader Lease %s/%s as %s", c.namespace, c.name, c.identity)
            return True

        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        record = (holder, spec.get("renewTime"))
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        duration = spec.get("leaseDurationSeconds") or c.lease_seconds
        mine = holder == c.identity
        expired = not holder or time.monotonic() - self._observed_at > duration
        if not mine and not expired:
            return False
        transitions = (spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        acquired = str(spec["acquireTime"]) if mine and spec.get("acquireTime") else micro_time()
        lease["spec"] = self._spec(acquired, transitions)
        try:
            await kube.replace(self.api, Lease, lease)  # carries resourceVersion
        except kube.ServerError as e:
            if kube.status_of(e) == 409:  # someone else wrote it first
                return False
            raise
        self.last_renew = time.monotonic()
        if not mine:
            log.info(
                "acquired the leader Lease %s/%s as %s (was %s)", c.namespace, c.name, c.identity, holder
            )
        return True

    async def release(self) -> None:
        """Hands the Lease back (only if still ours), so a standby need not wait for it to expire."""
        c = self.config
        try:
            lease = await kube.get(self.api, Lease, c.namespace, c.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != c.identity:
                return
            lease["spec"].pop("holderIdentity", None)
            lease["spec"]["leaseDurationSeconds"] = 1
            lease["spec"]["renewTime"] = micro_time()
            await kube.replace(self.api, Lease, lease)
            log.info("released the leader Lease %s/%s", c.namespace, c.name)
        except Exception as e:  # best effort: the Lease expires anyway
            log.warning("releasing the leader Lease failed: %s", e)

    async def hold(self, stop: asyncio.Event) -> bool:
        """Renews the Lease until `stop` is set (False) or it is lost (True).

        Lost means: someone else holds it, or no renewal succeeded within
        `renew_deadline` of the last one; no attempt may run past that deadline.
        """
        c = self.config
        while not stop.is_set():
            # The next renewal is due renew_seconds after the last success (not after this
            # loop started: starting kopf may have taken a while since the Lease was taken).
            due = max(0.0, self.last_renew + c.renew_seconds - time.monotonic())
            try:
                await asyncio.wait_for(stop.wait(), timeout=due)
                return False
            except TimeoutError:
                pass
            left = c.renew_deadline - (time.monotonic() - self.last_renew)
            try:
                if left > 0 and await asyncio.wait_for(self.try_acquire_or_renew(), timeout=left):
                    continue
                if left > 0:
                    log.error("the leader Lease is held by someone else: stopping")
                    return True
            except Exception as e:  # includes the cut-off (TimeoutError)
                if time.monotonic() - self.last_renew < c.renew_deadline:
                    log.warning("renewing the leader Lease failed (will retry): %s", e or type(e).__name__)
                    continue
            log.error("could not renew the leader Lease for %.0fs: stopping", c.renew_deadline)
            return True
        return False
