"""The import direction: the shared base at the bottom, the components on it, the command,
the embedded assembly and the client on top. Nothing imports upwards."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = "remotegpu_base"
COMPONENTS = {
    "remotegpu_gateway": REPO / "gateway" / "remotegpu_gateway",
    "remotegpu_worker": REPO / "inference-worker" / "remotegpu_worker",
    "remotegpu_operator": REPO / "operator" / "remotegpu_operator",
}
TOP = "remotegpu"


def imported(folder: Path) -> dict[str, set[str]]:
    """Top-level packages each module imports (function-level imports included)."""
    out = {}
    for path in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = names
    return out


def test_the_base_imports_no_component_and_not_the_top() -> None:
    above = {TOP, *COMPONENTS}
    bad = {m: sorted(n & above) for m, n in imported(REPO / "base" / BASE).items() if n & above}
    assert not bad, f"the shared base imports upwards: {bad}"


def test_components_import_the_base_never_the_top_nor_each_other() -> None:
    for name, folder in COMPONENTS.items():
        others = {TOP, *COMPONENTS} - {name}
        bad = {m: sorted(n & others) for m, n in imported(folder).items() if n & others}
        assert not bad, f"{name} imports across or upwards: {bad}"
    uses_base = [m for folder in COMPONENTS.values() for m, n in imported(folder).items() if BASE in n]
    assert uses_base, "the components are expected to share the base"
