"""The import graph of src/pwemoe: no cycles, and no module imports a layer above its own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "pwemoe"

# Bottom to top. A module may import its own layer or lower ones (run-time imports, including
# those inside functions; `if TYPE_CHECKING:` blocks are annotations only and are skipped).
# A dotted name places one submodule of a package (its longest listed prefix wins).
LAYERS = [
    ["core", "architectures", "files", "pareto", "devices", "intervals"],
    ["models", "objectives", "lora", "lora.adapter", "targets", "routing", "lmeval"],
    ["upcycle", "lora.upcycle", "lora.export", "config", "checkpoint", "recompute", "export"],
    ["tasks", "modalities", "baselines", "merges", "configfile"],
    ["workbench", "results", "training", "evaluation", "generation", "logprobs", "lmeval_scoring"],
    ["runs", "mergekit_export", "report"],
    ["recipes", "selection"],
    ["serve"],
    ["demo"],
    ["cli"],
]


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    for n in range(len(parts), 0, -1):  # the longest listed prefix
        prefix = ".".join(parts[:n])
        for i, names in enumerate(LAYERS):
            if prefix in names:
                return i
    return None


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    mod = _module(path)
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # `from . import x`
                    out |= {".".join(base + [a.name]) for a in node.names}
                else:
                    out.add(target)
            elif node.module and node.module.startswith("pwemoe"):
                out.add(node.module.removeprefix("pwemoe").lstrip("."))
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("pwemoe").lstrip(".") for a in node.names if a.name.startswith("pwemoe")}
    return {m for m in out if m}  # '' is the root package (its __version__)


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in SRC.rglob("*.py") if _module(p)}


def test_every_module_has_a_layer():
    missing = sorted(m for m in _graph() if _layer(m) is None)
    assert not missing, f"add these modules to LAYERS: {missing}"


def test_no_upward_imports():
    bad = [(m, t) for m, ts in _graph().items() for t in ts if (_layer(t) or 0) > (_layer(m) or 0)]
    assert not bad, f"modules importing a layer above their own: {bad}"


def test_no_import_cycles():
    g = _graph()

    def resolve(t: str) -> str | None:  # 'tasks.data.x' may name a module or an attribute of one
        while t and t not in g:
            t = t.rpartition(".")[0]
        return t or None

    # every edge counts, a submodule's import of its own package too: with the package's __init__ re-exporting
    # that submodule, such an import is a cycle
    edges = {m: {r for t in ts if (r := resolve(t)) and r != m} for m, ts in g.items()}
    color: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        color[m] = 1
        stack.append(m)
        for t in edges.get(m, ()):
            if color.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in color:
                visit(t)
        stack.pop()
        color[m] = 2

    for m in sorted(edges):
        if m not in color:
            visit(m)
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_contributing_table_is_the_layers():
    """CONTRIBUTING.md's layer table places every module where LAYERS does, and every name in LAYERS is a module."""
    text = (SRC.parents[1] / "CONTRIBUTING.md").read_text()
    rows = re.findall(r"^\| (\d+) \| ([^|]*) \|", text, re.M)
    table = {
        int(n): {m.removesuffix("/").removesuffix(".py").replace("/", ".") for m in re.findall(r"`([^`]+)`", ms)}
        for n, ms in rows
    }
    assert table == {i: set(names) for i, names in enumerate(LAYERS)}
    modules = set(_graph())
    assert not [n for names in LAYERS for n in names if n not in modules], "LAYERS names a module that does not exist"
