"""The images' Dockerfiles pass hadolint and keep the official Python base by default.

(`make images` builds them with buildah; tests/e2e runs them on the real nodes.)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cluster import REPO

HADOLINT = Path(sys.executable).parent / "hadolint"


@pytest.mark.parametrize(
    "dockerfile",
    [
        "Dockerfile",
        "inference-worker/Dockerfile",
        "cluster/postgresql/Dockerfile",
        "cluster/pause/Dockerfile",
    ],
)
def test_dockerfile_passes_hadolint(dockerfile: str):
    out = subprocess.run([str(HADOLINT), str(REPO / dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && apt-get install curl\n")
    out = subprocess.run([str(HADOLINT), str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL" in out.stdout


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "inference-worker/Dockerfile"])
def test_image_python_is_the_one_the_lock_was_compiled_for(dockerfile: str):
    """The lock pins wheels for one Python; an image on another one installs untested builds."""
    lock = (REPO / "requirements.lock").read_text()
    locked = re.search(r"--python-version (\d+\.\d+)", lock)
    text = (REPO / dockerfile).read_text()
    base = re.search(r"^ARG BASE_IMAGE=python:(\d+\.\d+)-slim-bookworm$", text, re.MULTILINE)
    assert locked and base, "expected `--python-version X.Y` in the lock and `ARG BASE_IMAGE=python:X.Y-…`"
    assert base.group(1) == locked.group(1)
    # The base is the ARG (the tests pass a local Debian bookworm one: its Python is 3.11 too).
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.MULTILINE)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "inference-worker/Dockerfile"])
def test_image_installs_with_the_uv_of_make_install(dockerfile: str):
    """The images install the lock with the uv `make install` uses, whose cache
    `make images` mounts (cluster/images.py): another version may read it differently."""
    makefile = re.search(r"^UV_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    image = re.search(r"^ARG UV_VERSION=(\S+)$", (REPO / dockerfile).read_text(), re.MULTILINE)
    assert makefile and image and image.group(1) == makefile.group(1)
