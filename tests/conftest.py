"""Shared fixtures: each real service the tests need has its own plugin module."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.cluster",
    "tests.fixtures.postgres",
    "tests.fixtures.processes",
    "tests.fixtures.seaweedfs",
    "tests.fixtures.tiny_models",
]

# Seconds each test file took (setup, call and teardown of its tests), from a run with
# --store-durations: `make test` hands the files out longest first.
DURATIONS = Path(__file__).with_name("durations.json")
# A file not in it yet: as long as a slow file (new files start early, not last).
UNKNOWN_FILE_SECONDS = 120.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store-durations",
        action="store_true",
        help="write each test file's time in this run into tests/durations.json",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on the real nodes must carry the `real_nodes` mark: `make test` runs those
    in a session of their own (the nodes' bridges and nftables tables exist once per host),
    beside the parallel session of all the others."""
    for item in items:
        if "real_nodes" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("real_nodes"):
            raise pytest.UsageError(f"{item.nodeid} uses the real nodes: mark it `pytest.mark.real_nodes`")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        longest_files_first(items)


def longest_files_first(items: list[pytest.Item]) -> None:
    """With --dist loadfile a worker takes a whole file: the longest ones go first, so no
    worker is left with a long file after the others are done. Only under pytest-xdist
    (every worker sorts alike); a file's tests keep their order."""
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    items.sort(key=lambda item: -known.get(_file(item.nodeid), UNKNOWN_FILE_SECONDS))


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


class DurationRecorder:
    """Sums each file's test times (in the controller, under pytest-xdist too) and merges
    them into DURATIONS at the end: the files this run did not run keep their entries."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[_file(report.nodeid)] += report.duration

    def pytest_sessionfinish(self) -> None:
        if not self.seconds:
            return
        merged = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
        merged.update({f: round(s) for f, s in self.seconds.items()})
        DURATIONS.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("store_durations") and not os.environ.get("PYTEST_XDIST_WORKER"):
        config.pluginmanager.register(DurationRecorder(), "remotegpu-durations")
