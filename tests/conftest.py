"""Shared fixtures: each real service the tests need has its own plugin module."""

import pytest

pytest_plugins = [
    "tests.fixtures.cluster",
    "tests.fixtures.postgres",
    "tests.fixtures.processes",
    "tests.fixtures.seaweedfs",
    "tests.fixtures.tiny_models",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on the real nodes must carry the `real_nodes` mark: `make test` runs those
    in a session of their own (the nodes' bridges and nftables tables exist once per host),
    beside the parallel session of all the others."""
    for item in items:
        if "real_nodes" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("real_nodes"):
            raise pytest.UsageError(f"{item.nodeid} uses the real nodes: mark it `pytest.mark.real_nodes`")
