"""`make test` hands the test files to its workers longest first (tests/conftest.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import conftest


@dataclass
class Item:
    nodeid: str


@dataclass
class Report:
    nodeid: str
    duration: float


def test_the_longest_files_go_first_and_a_files_tests_keep_their_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    durations = tmp_path / "durations.json"
    durations.write_text(json.dumps({"a.py": 5, "b.py": 300, "c.py": 60}))
    monkeypatch.setattr(conftest, "DURATIONS", durations)
    items = [Item(n) for n in ["a.py::t1", "a.py::t2", "b.py::t2", "b.py::t1", "c.py::t", "new.py::t"]]
    conftest.longest_files_first(items)  # type: ignore[arg-type]
    # A file not measured yet counts as a slow one: it does not start last.
    assert [i.nodeid for i in items] == [
        "b.py::t2",
        "b.py::t1",
        "new.py::t",
        "c.py::t",
        "a.py::t1",
        "a.py::t2",
    ]


def test_store_durations_sums_each_file_and_keeps_the_files_it_did_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    durations = tmp_path / "durations.json"
    durations.write_text(json.dumps({"a.py": 5, "gone.py": 7}))
    monkeypatch.setattr(conftest, "DURATIONS", durations)
    recorder = conftest.DurationRecorder()
    for nodeid, seconds in [("a.py::t", 0.4), ("a.py::t", 20.3), ("a.py::u", 1.0), ("b.py::t[x]", 2.6)]:
        recorder.pytest_runtest_logreport(Report(nodeid, seconds))  # type: ignore[arg-type]
    recorder.pytest_sessionfinish()
    assert json.loads(durations.read_text()) == {"a.py": 22, "b.py": 3, "gone.py": 7}


def test_the_table_names_files_that_exist():
    """A renamed or deleted file's entry goes (`--store-durations` keeps old entries)."""
    root = Path(__file__).resolve().parents[1]
    stale = [f for f in json.loads(conftest.DURATIONS.read_text()) if not (root / f).is_file()]
    assert not stale, f"tests/durations.json names files that are gone: {stale}"
