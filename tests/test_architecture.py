"""The house rules of ARCHITECTURE.md, checked on the source: floors and their arrows, model families reached only
through the seam (models.family, models.registry), no import circle (imports inside functions included), no module
over 400 lines, no class over 150, no top-level script imported by the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "phi3v"
SCRIPTS = {path.stem for path in REPO.glob("*.py")}
# what each floor may import, besides itself (ARCHITECTURE.md); the top-level modules of phi3v/ are commands
MAY_IMPORT = {
    "common": set(),
    "models": {"common"},
    "data": {"models", "common"},
    "eval": {"data", "common"},
    "serve": {"models", "common"},
    "train": {"serve", "eval", "data", "models", "common"},
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Our modules that `name` imports, anywhere in it (`from phi3v.x import f` counts as phi3v.x, or phi3v.x.f
    where that is a module)."""
    known, found = modules(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in known}
    return {target for target in found if target.split(".")[0] in {"phi3v", *SCRIPTS}} - {name}


def floor(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in MAY_IMPORT) else None


def test_arrows_point_down_and_no_script_is_imported():
    wrong = []
    for name, path in modules().items():
        for target in imports(name, path):
            if target.split(".")[0] in SCRIPTS:
                wrong.append(f"{name} imports the script {target}")
            elif floor(name) and floor(target) and floor(target) != floor(name) \
                    and floor(target) not in MAY_IMPORT[floor(name)]:
                wrong.append(f"{name} ({floor(name)}) imports {target} ({floor(target)})")
            elif floor(name) not in (None, "models") and target.startswith("phi3v.models.") \
                    and target not in ("phi3v.models.family", "phi3v.models.registry"):
                wrong.append(f"{name} reaches into a model family ({target}) instead of the seam")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    graph = {name: {t for t in imports(name, path) if t in modules()} for name, path in modules().items()}
    circles = []

    def visit(node, trail):
        if node in trail:
            circles.append(" -> ".join(trail[trail.index(node):] + [node]))
            return
        if node in done:
            return
        for target in sorted(graph[node]):
            visit(target, trail + [node])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        visit(start, [])
    # a package imports its submodules only as `from phi3v.x import y`; phi3v/__init__ re-exports, nothing imports it
    assert not circles, "\n".join(circles)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_sizes(path):
    source = path.read_text()
    assert len(source.splitlines()) <= 400, f"{path} has {len(source.splitlines())} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= 150, f"{path}: class {node.name} is over 150 lines"
