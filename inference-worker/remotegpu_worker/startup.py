"""The worker's own cold-start phases, reported to the gateway for the jobs' timelines.

`process_started` is the process's start as the kernel recorded it (before torch's
import); `weights_fetched` comes from the fetch record the weights fetcher (the pod's
init container, `remotegpu cache fetch`) leaves when it downloaded anything.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from remotegpu_base.protocol import ColdStartPhase, WorkerAPIClient, WorkerPhases

log = logging.getLogger("remotegpu_worker.startup")

# Where the pod's fetcher writes its record (a volume shared with the worker container).
FETCH_RECORD_ENV = "REMOTEGPU_FETCH_RECORD"


def process_start_time() -> float:
    """UNIX time this process started (Linux /proc), else now."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime: clock ticks after boot (field 22 of stat)
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def fetch_record(path: str | None = None) -> dict[str, object] | None:
    """The fetcher's record ({"fetched": bool, "finished_at": ..., ...}), if any."""
    path = path or os.environ.get(FETCH_RECORD_ENV)
    if not path:
        return None
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class StartupPhases:
    def __init__(self) -> None:
        self.phases: dict[ColdStartPhase, float] = {ColdStartPhase.PROCESS_STARTED: process_start_time()}
        record = fetch_record()
        if record and record.get("fetched") and isinstance(record.get("finished_at"), (int, float)):
            self.phases[ColdStartPhase.WEIGHTS_FETCHED] = float(record["finished_at"])  # type: ignore[arg-type]

    def reached(self, phase: ColdStartPhase) -> None:
        self.phases[phase] = time.time()

    def report(self, client: WorkerAPIClient, worker_id: str, model: str) -> None:
        try:
            client.report_phases(WorkerPhases(worker_id=worker_id, model=model, phases=self.phases))
        except Exception as e:  # noqa: BLE001 - advisory: a missing timeline never stops the worker
            log.debug("cold-start phases not reported: %s", e)
