"""The chart README's values table, from values.yaml's `# --` comments (helm-docs style).

.venv/bin/python -m tests.chart.values_doc   # rewrites the table in charts/remotegpu/README.md
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import yaml

from tests.chart.helm import CHART

BEGIN, END = "<!-- values:begin -->", "<!-- values:end -->"
KEY = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$")


def documented_keys() -> list[tuple[str, str]]:
    """(dotted path, description) for every key with a `# --` comment, in file order."""
    out: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []
    doc: list[str] | None = None
    for line in (CHART / "values.yaml").read_text().splitlines():
        s = line.strip()
        if s.startswith("# --"):
            doc = [s[4:].strip()]
            continue
        if s.startswith("#") and doc is not None:
            doc.append(s[1:].strip())
            continue
        m = KEY.match(line)
        if not m or s.startswith("- "):
            doc = None if not s.startswith("- ") else doc
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        if doc is not None:
            out.append((".".join(k for _, k in stack), " ".join(doc)))
        doc = None
    return out


def default_of(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return node


def table() -> str:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    rows = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for path, desc in documented_keys():
        value = default_of(values, path)
        kind = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}.get(
            type(value), type(value).__name__
        )
        default = json.dumps(value, separators=(",", ":")).replace("|", "\\|")
        text = desc.replace("|", "\\|")
        rows.append(f"| {path} | {kind} | `{default}` | {text} |")
    return "\n".join(rows)


def render_readme(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    path = CHART / "README.md"
    path.write_text(render_readme(path.read_text()))
    print(f"wrote the values table of {path}", file=sys.stderr)
