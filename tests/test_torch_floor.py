"""pyproject's torch floor is a version that has every torch API the package calls (issue 19.10: `torch>=2.5`
installed a torch without `torch.nn.utils.get_total_norm`, which the gradient norm needs)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]

# API (as the source spells it) -> the torch release that introduced it, from PyTorch's release notes.
INTRODUCED_IN = {
    "get_total_norm": (2, 6),                       # torch.nn.utils.get_total_norm / clip_grads_with_norm_
    "clip_grads_with_norm_": (2, 6),
    # FSDP2 under its public name (2.4-2.5: torch.distributed._composable.fsdp)
    "from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard": (2, 6),
    "enable_gqa": (2, 5),                           # scaled_dot_product_attention(enable_gqa=...)
    "get_autocast_dtype": (2, 4),
}


def _torch_floor() -> tuple[int, int]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_spec,) = [d for d in dependencies if re.match(r"torch\b", d)]
    major, minor = re.fullmatch(r"torch>=(\d+)\.(\d+)(?:\.\d+)?", torch_spec).groups()
    return int(major), int(minor)


def test_torch_floor_has_every_api_the_package_uses():
    source = "\n".join(p.read_text() for p in (ROOT / "diffv2_lit").rglob("*.py")
                       if "hf_modeling" not in p.parts)  # the exported HF code checks torch's version itself
    used = {api: version for api, version in INTRODUCED_IN.items() if api in source}
    assert "get_total_norm" in used  # the API the old floor lacked is still what the gradient norm calls
    needed = max(used.values())
    assert _torch_floor() >= needed, (
        f"pyproject says torch>={'.'.join(map(str, _torch_floor()))}, but the package uses "
        f"{[api for api, v in used.items() if v == needed]} (torch {'.'.join(map(str, needed))})")
