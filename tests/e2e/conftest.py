"""Fixtures of the end-to-end tests: the whole system installed once per run (see system.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.system import System, deploy
from tests.fixtures.cluster import Kube, RealNodes


@pytest.fixture(scope="session")
def system(kube: Kube, real_nodes: RealNodes, tiny_models_dir: Path, tmp_path_factory) -> Iterator[System]:
    with deploy(kube, real_nodes, tiny_models_dir, tmp_path_factory.mktemp("e2e")) as system:
        yield system
