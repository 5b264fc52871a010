"""bench/autoscale_sim.py: its fixed interface, and that it runs the operator's own decisions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SIM = REPO / "bench" / "autoscale_sim.py"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
DEV = "black-forest-labs/FLUX.1-dev"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SIM), *args], capture_output=True, text=True, timeout=300)


def trace(tmp_path: Path, rows: list[tuple]) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(
        "t_seconds,model,steps,width,height\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    )
    return path


def test_json_output_has_every_policy_and_field(tmp_path):
    rows = [(0, SCHNELL, 4, 1024, 1024), (1, SCHNELL, 4, 1024, 1024), (400, DEV, 28, 1024, 1024)]
    out = run("--trace", str(trace(tmp_path, rows)), "--gpus", "1", "--cold-start-seconds", "20", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result["policies"]) == {"remotegpu", "keda", "knative"}
    for name, r in result["policies"].items():
        for key in (
            "idle_gpu_seconds",
            "p50_wait_seconds",
            "p95_wait_seconds",
            "p99_wait_seconds",
            "cold_starts",
        ):
            assert isinstance(r[key], int | float), (name, key)
        assert r["jobs"] == 3
        # Every job started from zero replicas, so waited for a worker to load (20 s).
        assert r["cold_starts"] >= 2 and r["p50_wait_seconds"] >= 20, (name, r)
    # KEDA wakes a sleeping model only at its 30 s poll; the others at once.
    p = result["policies"]
    assert p["remotegpu"]["p50_wait_seconds"] < p["keda"]["p50_wait_seconds"]


def test_the_text_output_prints_the_goal_ratios(tmp_path):
    rows = [(t, SCHNELL, 4, 1024, 1024) for t in range(0, 60, 3)]
    out = run("--trace", str(trace(tmp_path, rows)), "--gpus", "2", "--cold-start-seconds", "10")
    assert out.returncode == 0, out.stderr
    assert "remotegpu / keda: idle GPU-seconds x" in out.stdout
    assert "remotegpu / knative: idle GPU-seconds x" in out.stdout
    assert out.stdout.count("goal ") == 2


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("t,model\n0,x\n", "the header must be t_seconds,model,steps,width,height"),
        ("t_seconds,model,steps,width,height\n0,nope/model,4,512,512\n", "unknown model 'nope/model'"),
    ],
)
def test_bad_traces_get_a_clear_error(tmp_path, content, error):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    out = run("--trace", str(path), "--gpus", "1")
    assert out.returncode != 0 and error in out.stderr


def test_the_simulator_runs_the_operators_decision_code(tmp_path, monkeypatch):
    # A change to remotegpu_operator.scaling changes the simulated policy: no copy.
    sys.path.insert(0, str(REPO / "bench"))
    import autoscale_sim
    from remotegpu_operator import scaling

    rows = [(0, SCHNELL, 4, 1024, 1024), (100, SCHNELL, 4, 1024, 1024)]
    path = trace(tmp_path, rows)
    normal = autoscale_sim.simulate(path, 1, 10.0)["policies"]["remotegpu"]
    calls = []
    real = scaling.decide

    def spy(obs, now):
        calls.append(obs.current)
        return real(obs, now)

    monkeypatch.setattr(scaling, "decide", spy)
    again = autoscale_sim.simulate(path, 1, 10.0)["policies"]["remotegpu"]
    assert calls and again == normal


def test_the_bursty_reference_trace_meets_the_goals():
    # The diurnal trace (24 h, minutes to simulate) is left to the bench run itself.
    sys.path.insert(0, str(REPO / "bench"))
    import autoscale_sim

    result = autoscale_sim.simulate(REPO / "bench" / "traces" / "bursty.csv", 4, None)
    assert all(autoscale_sim.goals(result).values()), result
