"""Rendering the chart with the cached helm binary (no cluster needed)."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from cluster.localcluster import bin_dir, pinned

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "remotegpu"
PROM_NAME = re.compile(r"\bremotegpu_[A-Za-z0-9_:]+")


@functools.cache
def helm_bin() -> Path:
    return bin_dir() / "helm"


@functools.cache
def prometheus_bin() -> Path:
    """The tests' Prometheus, built by cluster/build.sh with Kubernetes service discovery
    (Debian's package leaves it out)."""
    return bin_dir() / f"prometheus-{pinned('PROMETHEUS')}"


@functools.cache
def promtool_bin() -> Path:
    return bin_dir() / f"promtool-{pinned('PROMETHEUS')}"


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(helm_bin()), *args], text=True, capture_output=True)
    if check and out.returncode:
        raise AssertionError(f"helm {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def values_args(values: dict[str, Any] | None, tmp: Path | None = None) -> list[str]:
    if not values:
        return []
    assert tmp is not None
    path = tmp / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["-f", str(path)]


def template(
    values: dict[str, Any] | None = None,
    tmp: Path | None = None,
    release: str = "remotegpu",
    namespace: str = "imaging",
    check: bool = True,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    return run_helm(
        "template", release, str(CHART), "--namespace", namespace,
        *values_args(values, tmp), *extra, check=check,
    )  # fmt: skip


def render(values: dict[str, Any] | None = None, tmp: Path | None = None, **kw: Any) -> list[dict[str, Any]]:
    """The rendered manifests as objects (empty documents dropped)."""
    return [d for d in yaml.safe_load_all(template(values, tmp, **kw).stdout) if d]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objs, kind, name)
    assert len(found) == 1, (
        f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    )
    return found[0]


def alert_rules(tmp_path: Path, namespace: str = "imaging") -> dict:
    """The `groups:` of the rendered PrometheusRule: a Prometheus rule file."""
    objs = render({"metrics": {"prometheusRule": {"enabled": True}}}, tmp_path, namespace=namespace)
    return one(objs, "PrometheusRule")["spec"]


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((CHART / "dashboards").glob("*.json"))}


def dashboard_exprs() -> list[str]:
    """Every PromQL expression in the dashboards: panel targets and template variable queries."""
    out: list[str] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for p in items:
            out.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            panels(p.get("panels", []))

    for d in dashboards().values():
        panels(d["panels"])
        for v in d.get("templating", {}).get("list", []):
            if v.get("type") == "query":
                q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                out.append(q)
    return out


def alert_exprs(rules: dict) -> list[str]:
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def metric_names(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in PROM_NAME.findall(e)}
