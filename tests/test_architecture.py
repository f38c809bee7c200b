"""The layers of docs/architecture.md, checked: no module imports a layer above its own (function-level
imports included), so the package has no import cycles between its parts."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "diffv2_lit"

# What each part may import (besides itself), lowest layer first; see docs/architecture.md.
ALLOWED = {
    "errors": set(),
    "gradients": set(),
    "model": {"errors"},
    "data": {"errors"},
    "checkpoint": {"model", "errors"},
    "callbacks": {"model", "data", "checkpoint", "gradients", "inference", "errors"},
    "training": {"model", "checkpoint", "gradients", "errors"},
    "inference": {"model", "checkpoint", "data", "errors"},
    "compare": {"model", "errors"},
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


# ---- no import circle between modules, inside a part included -------------------------------------


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (function-level imports included; `from pkg import name`
    counts as importing `pkg.name` when that is a module, else `pkg`)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {owner(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: every path that leads from a module back to itself, found by depth-first search."""
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_no_module_imports_itself_through_a_circle():
    assert not circles(import_graph()), "\n".join(" -> ".join(c) for c in circles(import_graph()))


def test_the_circle_check_sees_a_circle_inside_a_folder(tmp_path):
    package = tmp_path / "diffv2_lit"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("")
    (package / "data" / "folder.py").write_text("from diffv2_lit.data.prepare import METADATA_FILE\n")
    (package / "data" / "prepare.py").write_text("def f():\n    from diffv2_lit.data import folder\n")
    assert circles(import_graph(package)) == [
        ["diffv2_lit.data.folder", "diffv2_lit.data.prepare", "diffv2_lit.data.folder"]]


def test_benchmarks_do_not_import_tests():
    """The benchmarks ship in the repository for users to run; the tests may use them, not the reverse."""
    scripts = sorted((PACKAGE.parent / "benchmarks").glob("*.py"))
    imports = [f"{s.name}:{line}" for s in scripts for part, line in imported_top_level(s) if part == "tests"]
    assert scripts and not imports, imports


def imported_top_level(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add((node.module.split(".")[0], node.lineno))
        elif isinstance(node, ast.Import):
            found |= {(a.name.split(".")[0], node.lineno) for a in node.names}
    return found
