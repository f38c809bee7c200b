"""float8 training of the big matmuls through torchao (`model.float8`), applied from outside the model.

    model.float8: false | true (= tensorwise) | tensorwise | rowwise

Converted: every block's attention projections (q/k/v/o) and SwiGLU (gate/up/down), the matmuls that
hold nearly all of a large model's FLOPs. Kept in the compute dtype: DIFF V2's `lambda_proj` (a [h, D]
gate whose sigmoid reads small differences), the embeddings and the output layer (the loss's logits),
as torchtitan does. torchao's float8 matmuls need both dimensions to be multiples of 16; a layer that
is not is kept as it is.

`torchao.float8.Float8Linear` keeps the `weight` parameter in its dtype (fp32 master weights) and
casts inputs, weights and gradients to float8 per matmul, so state dicts, checkpoints and exports are
those of the unconverted model: a float8 run's checkpoint loads into a bf16 or fp32 model, and back.

Under FSDP2 with tensorwise scaling the weights are all-gathered in float8 (half the bytes of bf16);
the scales are then computed for all weights in one all-reduce after each optimizer step
(`precompute_scales`). Rowwise scaling all-gathers in the parameter dtype.

On the GPU float8 matmuls need compute capability 8.9 or newer (H100, H200, L4, RTX 4090); on the CPU
torchao emulates them (slow: for tests of the wiring only).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

RECIPES = ("tensorwise", "rowwise")
CONVERTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def recipe_name(float8: bool | str) -> str | None:
    """`model.float8` as a recipe name (None: off)."""
    if float8 is False or float8 is None:
        return None
    return "tensorwise" if float8 is True else float8


def float8_problem(float8: bool | str, device: torch.device) -> str | None:
    """Why `model.float8` cannot run here, naming what to change; None when it can."""
    recipe = recipe_name(float8)
    if recipe is None:
        return None
    if recipe not in RECIPES:
        return f"model.float8={float8!r} is not one of: false, true, {', '.join(RECIPES)}"
    if importlib.util.find_spec("torchao") is None:
        return "model.float8 needs torchao: pip install 'diffv2-lit[float8]' (or set model.float8 false)"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return (f"model.float8 needs a GPU of compute capability 8.9 or newer (H100, H200, L4); this run's {name} is "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}: set model.float8 false")
    return None


def converts(module: nn.Module, name: str) -> bool:
    """Whether `name` (a fully qualified module name) is a linear layer that float8 training converts."""
    return (isinstance(module, nn.Linear) and name.rpartition(".")[2] in CONVERTED and name.startswith("layers.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_float8(model: nn.Module, float8: bool | str, sharded: bool) -> None:
    """Swap the converted layers for torchao's `Float8Linear`, in place (before compile and sharding)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    recipe = recipe_name(float8)
    if recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=sharded)
    else:
        config = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(model, config=config, module_filter_fn=converts)


def all_gathers_in_float8(model: nn.Module) -> bool:
    return any(getattr(getattr(m, "config", None), "enable_fsdp_float8_all_gather", False) for m in model.modules())


def precompute_scales(model: nn.Module) -> None:
    """After an optimizer step under FSDP2 float8 all-gather: every weight's scale in one all-reduce (else
    each layer would reduce its own amax during the next forward)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
