"""`make images` rebuilds an image only when what its build reads changes (cluster/images.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster import images


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "requirements.lock").write_text("a==1\n")
    (tmp_path / "notes.md").write_text("not copied\n")
    (tmp_path / "Dockerfile").write_text(
        "ARG BASE_IMAGE=python:3.11-slim-bookworm\nFROM ${BASE_IMAGE}\n"
        "COPY requirements.lock ./\nCOPY --chown=1:1 pkg ./pkg\nCOPY --from=other /x /x\nRUN true\n"
    )
    monkeypatch.setattr(images, "REPO", tmp_path)
    return tmp_path


def digest(base_id: str = "sha256:base") -> str:
    return images.input_hash(images.Image("t", "Dockerfile"), "localhost/base", base_id)


def test_the_copied_paths_are_read_from_the_dockerfile(repo: Path):
    assert images.copy_sources(repo / "Dockerfile") == ["requirements.lock", "pkg"]
    assert {"requirements.lock", "pyproject.toml", "base", "inference-worker"} <= set(
        images.copy_sources(Path(__file__).resolve().parents[2] / "inference-worker" / "Dockerfile")
    )


def test_a_change_to_a_copied_file_the_dockerfile_or_the_base_changes_the_tag(repo: Path):
    before = digest()
    (repo / "pkg" / "mod.py").write_text("x = 2\n")
    assert digest() != before
    after_code = digest()
    (repo / "Dockerfile").write_text((repo / "Dockerfile").read_text() + "USER 1\n")
    assert digest() != after_code
    assert digest("sha256:other-base") != digest()


def test_what_the_build_does_not_read_keeps_the_tag(repo: Path):
    before = digest()
    (repo / "notes.md").write_text("edited\n")
    (repo / "pkg" / "__pycache__").mkdir()
    (repo / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    assert digest() == before
