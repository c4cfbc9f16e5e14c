"""The structure issue 17 asks for, pinned: no import cycle among act_core's modules, no family identity
checks outside ``act_core.families``, a family-neutral pipeline mixin."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "src" / "act_core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, everywhere: bool = False) -> set[str]:
    """act_core modules imported at module level (or ``everywhere``: inside functions too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree) if everywhere else tree.body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("act_core"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("act_core"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
    return found


def _graph(everywhere: bool = False) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in _top_level_imports(path, everywhere) if m in modules and m != name}
        for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_act_core_has_no_import_cycle():
    """Not at import time, and not through the imports functions make later either (the factory used to
    import the FLUX mixin, which imported the pipeline module back)."""
    for everywhere in (False, True):
        graph = _graph(everywhere)
        assert len(graph) > 20  # the walk found the package
        cycle = _cycle(graph)
        assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_family_identity_checks_outside_the_families_package():
    pattern = re.compile(r"is (not )?(SDXL|FLUX|SD3|CHROMA)\b|hasattr\([^)]*double_blocks|family\.name ==")
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for root in (REPO / "src", REPO / "nodes")
        for path in root.rglob("*.py")
        if "families" not in path.parts
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, "\n".join(offenders)


def test_the_pipeline_mixin_imports_no_family():
    """It may name the ModelFamily type; it imports no family's module (sdxl, flux, ...)."""
    imports = _top_level_imports(PACKAGE / "diffusers" / "pipeline.py")
    family_modules = {m for m in imports if m in _graph() and m.startswith("act_core.families.")}
    assert not family_modules, family_modules
