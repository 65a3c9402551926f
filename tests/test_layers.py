"""The package layout is a layering: no module imports from a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pipeline"

# Lowest first; a module may import its own layer and those below it.
LAYERS = [
    ("pipeline.spec", "pipeline.faults", "pipeline.filters"),
    ("pipeline.io", "pipeline.report"),  # the report reads committed output, imports spec only
    ("pipeline.output",),
    ("pipeline.monitoring",),  # metrics for the stages; the night's record, gate and notice
    ("pipeline.stages",),
    ("pipeline.job",),
    ("pipeline.cli", "pipeline.eval", "pipeline.k8s"),
]


def _layer(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every `pipeline.*` module a file imports, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
            found.append((node.lineno, base))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if m.startswith("pipeline.")]


MODULES = sorted(
    p for p in ROOT.rglob("*.py") if p.name != "__main__.py" and p != ROOT / "__init__.py"
)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_import_from_a_higher_layer(path: Path) -> None:
    own = _layer(_module_name(path))
    assert own is not None, f"{path} is in no layer: add its package to LAYERS"
    upward = [
        f"line {line}: {target}"
        for line, target in _imports(path)
        if (rank := _layer(target)) is not None and rank > own
    ]
    assert not upward, f"{_module_name(path)} imports from a higher layer: {upward}"


def test_every_package_says_what_it_holds_and_may_import() -> None:
    for init in ROOT.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "may import" in doc.lower(), f"{init}: say what the package may import"
