"""The model package is plain PyTorch: parallelism and training are applied from outside."""

import ast
from pathlib import Path

import diffv2_lit.model

MODEL_DIR = Path(diffv2_lit.model.__file__).parent
FORBIDDEN = ("lightning", "pytorch_lightning", "torch.distributed")


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_lightning_or_torch_distributed_under_the_model_package():
    offenders = {
        f"{path.name}: {name}"
        for path in MODEL_DIR.glob("*.py")
        for name in _imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert len(list(MODEL_DIR.glob("*.py"))) >= 6
    assert not offenders
