"""The chart's per-key limit defaults and the OpenAI wait reach the gateway as the
environment variables it reads (rendered with the real helm)."""

from __future__ import annotations

from pathlib import Path

import pytest
from remotegpu_gateway.settings import KEY_LIMITS_ENV, OPENAI_WAIT_ENV, served_settings

from tests.chart.helm import one, render, template
from tests.chart.test_render import env_of


def test_defaults_are_unlimited(tmp_path: Path) -> None:
    env = env_of(one(render(), "Deployment", "remotegpu-gateway"))
    for name, (var, _) in KEY_LIMITS_ENV.items():
        assert env[var]["value"] == "0", name
    assert env[OPENAI_WAIT_ENV]["value"] == "600"


def test_limits_reach_the_gateway_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "gateway": {
            "keyLimits": {"requestsPerMinute": 60, "maxConcurrentJobs": 4, "gpuSecondsPerDay": 3600},
            "openaiWaitSeconds": 120,
        }
    }
    env = env_of(one(render(values, tmp_path), "Deployment", "remotegpu-gateway"))
    for var in [v for v, _ in KEY_LIMITS_ENV.values()] + [OPENAI_WAIT_ENV]:
        monkeypatch.setenv(var, env[var]["value"])
    import argparse

    args = argparse.Namespace(host="127.0.0.1", port=8000)
    s = served_settings(args, tmp_path)
    assert (s["key_requests_per_minute"], s["key_max_concurrent_jobs"], s["key_gpu_seconds_per_day"]) == (
        60,
        4,
        3600.0,
    )
    assert s["openai_wait_seconds"] == 120.0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gateway": {"keyLimits": {"requestsPerMinute": -1}}}, "/gateway/keyLimits/requestsPerMinute"),
        ({"gateway": {"keyLimits": {"maxConcurrentJobs": 1.5}}}, "/gateway/keyLimits/maxConcurrentJobs"),
        ({"gateway": {"keyLimits": {"burst": 3}}}, "burst"),
        ({"gateway": {"openaiWaitSeconds": 0}}, "/gateway/openaiWaitSeconds"),
    ],
)
def test_schema_rejects(values: dict, message: str, tmp_path: Path) -> None:
    out = template(values, tmp_path, check=False)
    assert out.returncode != 0, f"accepted {values}"
    assert message in out.stderr, out.stderr
