"""The layers of docs/architecture.md, checked: no module imports a layer above its own (function-level
imports included), so the package has no import cycles between its parts."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "diffv2_lit"

# What each part may import (besides itself), lowest layer first; see docs/architecture.md.
ALLOWED = {
    "errors": set(),
    "gradients": set(),
    "model": set(),
    "data": {"errors"},
    "checkpoint": {"model", "errors"},
    "callbacks": {"model", "data", "checkpoint", "gradients", "errors"},
    "training": {"model", "checkpoint", "gradients", "errors"},
    "inference": {"model", "checkpoint", "data", "errors"},
    "compare": {"model"},
    "cli": {"errors", "gradients", "model", "data", "checkpoint", "callbacks", "training", "inference", "compare"},
    "__main__": {"cli"},
    "__init__": set(),
}


def part_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_parts(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "diffv2_lit" \
                else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "diffv2_lit" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


def test_no_layer_imports_one_above_it():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        for imported, line in imported_parts(path):
            if imported != part and imported not in ALLOWED[part]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({part}) imports diffv2_lit.{imported}")
    assert not violations, "\n".join(violations)


def test_every_part_has_a_rule():
    parts = {part_of(p) for p in PACKAGE.rglob("*.py")}
    assert parts <= set(ALLOWED), parts - set(ALLOWED)


def test_the_check_sees_a_violation(tmp_path):
    """The checker itself: an upward import is reported (so the test above cannot pass by seeing nothing)."""
    module = tmp_path / "upward.py"
    module.write_text("def f():\n    from diffv2_lit.training.module import DecoderLM\n")
    assert imported_parts(module) == {("training", 2)}
