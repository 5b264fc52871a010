"""The tests' Prometheus, built by cluster/build.sh from its pinned Go module: the pinned
version, with Kubernetes service discovery (what Debian's lacks) and no other."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from cluster.localcluster import pinned
from tests.chart.helm import prometheus_bin, promtool_bin


def check_config(tmp_path: Path, job: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump({"scrape_configs": [{"job_name": "pods", **job}]}))
    return subprocess.run([str(promtool_bin()), "check", "config", str(path)], capture_output=True, text=True)


def test_prometheus_is_the_pinned_version():
    # Prometheus 3.X.Y is its Go module's v0.3XX.Y.
    minor, patch = (int(n) for n in pinned("PROMETHEUS").removeprefix("v0.").split("."))
    want = f"{minor // 100}.{minor % 100}.{patch}"
    for binary in (prometheus_bin(), promtool_bin()):
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True)
        assert f"version {want} " in out.stdout, out.stdout


def test_kubernetes_service_discovery_is_built_in(tmp_path: Path):
    sd = {"role": "pod", "api_server": "https://127.0.0.1:6443", "namespaces": {"names": ["imaging"]}}
    out = check_config(tmp_path, {"kubernetes_sd_configs": [sd]})
    assert out.returncode == 0, out.stdout + out.stderr


def test_other_service_discovery_is_left_out(tmp_path: Path):
    """The build tags took effect (no cloud SDKs): a cloud's discovery is refused."""
    out = check_config(tmp_path, {"ec2_sd_configs": [{"region": "eu-west-1"}]})
    assert out.returncode != 0
    assert "ec2_sd_configs" in out.stdout + out.stderr
