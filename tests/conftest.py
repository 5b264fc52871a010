"""Shared fixtures: each real service the tests need has its own plugin module."""

pytest_plugins = [
    "tests.fixtures.cluster",
    "tests.fixtures.postgres",
    "tests.fixtures.tiny_models",
]
