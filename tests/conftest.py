"""Shared fixtures: each real service the tests need has its own plugin module."""

import pytest

pytest_plugins = [
    "tests.fixtures.cluster",
    "tests.fixtures.postgres",
    "tests.fixtures.tiny_models",
]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Groups for `pytest -n N --dist loadgroup` (make test): a file's tests run in one
    worker (they share module fixtures), and so do all tests on the real nodes, which
    exist once per machine (their bridges, subnets and nftables tables are host-wide)."""
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        if "real_nodes" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("real-nodes"))
        else:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
