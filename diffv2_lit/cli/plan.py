"""`diffv2-lit plan`: what a `fit` with the same configuration would run, and whether it fits the GPUs.

    diffv2-lit plan --config recipes/6.7b-diffv2.yaml --config configs/hardware/8gpu-fsdp2.yaml
    diffv2-lit plan --config recipes/1.3b-diffv2.yaml --config configs/hardware/multinode.yaml \
        --trainer.accumulate_grad_batches 4 --gpu_memory_gib 74.5

Takes `fit`'s `--config` files and dotted overrides (parsed by the same LightningCLI parser, so a mistake is
the same one line), builds the model on the meta device only (nothing allocated, no GPU needed) and prints
the parameters, world size, micro-batch, accumulation, tokens per optimizer step, the validation cadence in
optimizer steps, the total tokens, and the estimated peak memory per GPU term by term
(diffv2_lit/training/memory.py), ending with `peak per GPU: <x> GiB`. Exit code 1, naming the term to change,
when the peak exceeds `--gpu_memory_gib` (default 74.5 GiB = 80 GB, an A100/H100 80 GB); 2 for a
configuration mistake.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass

from diffv2_lit.callbacks.validation import ValidationInOptimizerSteps, validation_every_n_steps
from diffv2_lit.cli.errors import report as report_error
from diffv2_lit.errors import DiffV2Error, UsageError
from diffv2_lit.model import ModelConfig, count_parameters, resolve_model_config
from diffv2_lit.model.config import ConfigError
from diffv2_lit.model.loss import liger_available
from diffv2_lit.training.memory import GIB, Layout, MemoryEstimate, estimate_memory

DEFAULT_GPU_MEMORY_GIB = 74.5  # 80 GB (80e9 bytes) in GiB
EXIT_TOO_LARGE = 1

USAGE = """usage: diffv2-lit plan --config FILE [--config FILE ...] [fit's --key value overrides] [--gpu_memory_gib GIB]

Prints what `diffv2-lit fit` with the same arguments would run and its estimated peak memory per GPU,
without building the model on a device. Exit 1 when the peak exceeds --gpu_memory_gib (default 74.5 =
80 GB), naming the term to change; `diffv2-lit fit --help` lists the keys."""

# (mixed or true) Lightning precision -> (master dtype, compute dtype) when no FSDP2 policy decides
PRECISIONS = {"32-true": ("float32", "float32"), "32": ("float32", "float32"), "64-true": ("float64", "float64"),
              "bf16-mixed": ("float32", "bfloat16"), "16-mixed": ("float32", "float16"),
              "bf16-true": ("bfloat16", "bfloat16"), "16-true": ("float16", "float16")}
STRATEGY_CLASSES = {"ModelParallelStrategy": "fsdp2", "FSDPStrategy": "fsdp1", "DDPStrategy": "ddp",
                    "SingleDeviceStrategy": "single"}
STRATEGY_NAMES = {"fsdp2": "FSDP2 (ModelParallelStrategy)", "fsdp1": "FSDP1 (FSDPStrategy)", "ddp": "DDP",
                  "single": "one device"}


@dataclass(frozen=True)
class Plan:
    model_config: ModelConfig
    n_parameters: int
    n_nodes: int
    devices_per_node: int
    layout: Layout
    loss_note: str
    max_steps: int | None
    validation_every: float | None
    validation_note: str

    @property
    def world_size(self) -> int:
        return self.n_nodes * self.devices_per_node

    @property
    def tokens_per_step(self) -> int:
        return self.world_size * self.layout.micro_batch * self.layout.seq_len * self.layout.accumulation

    @property
    def memory(self) -> MemoryEstimate:
        return estimate_memory(self.model_config, self.layout)


def plan_from_config(config) -> Plan:
    """The Plan of a parsed `fit` config (diffv2_lit.cli.fit.parse_config's Namespace)."""
    trainer, model, data = config.trainer, config.model, _init_args(config.data)
    parallel = model.parallel
    model_config = _model_config(model.architecture)
    n_nodes, devices = int(trainer.num_nodes or 1), _device_count(trainer.devices, trainer.accelerator)
    world_size = n_nodes * devices
    strategy = _strategy_kind(trainer.strategy, world_size)
    micro_batch, seq_len = _required(data, "batch_size"), _required(data, "seq_len")
    accumulation = _accumulation(config, micro_batch, world_size)
    master, compute = PRECISIONS.get(str(trainer.precision or "32-true"), ("float32", "float32"))
    reduce = None
    if strategy == "fsdp2":
        compute = parallel.fsdp_param_dtype or master
        reduce = parallel.fsdp_reduce_dtype
    loss_impl, loss_note = _loss_impl(model.loss_impl, trainer.accelerator)
    layout = Layout(
        micro_batch=micro_batch, seq_len=seq_len, n_gpus=_shard_count(trainer.strategy, world_size, parallel, devices), strategy=strategy,
        accumulation=accumulation, sync_every_micro_batch=bool(parallel.fsdp_sync_every_micro_batch),
        activation_checkpointing=parallel.activation_checkpointing, loss_impl=loss_impl,
        cpu_offload=bool(parallel.cpu_offload) and strategy == "fsdp2", master_dtype=master, compute_dtype=compute,
        reduce_dtype=reduce)
    in_steps = any(str(_class_path(c)).endswith(ValidationInOptimizerSteps.__name__)
                   for c in _as_list(trainer.callbacks))
    max_steps = trainer.max_steps if trainer.max_steps not in (None, -1) else None
    validation_every = validation_every_n_steps(trainer.val_check_interval, accumulation, in_steps)
    if trainer.limit_val_batches == 0:
        validation_every, validation_note = None, "off (trainer.limit_val_batches 0)"
    elif validation_every is None:
        validation_note = f"trainer.val_check_interval {trainer.val_check_interval!r} (Lightning's epoch/time form)"
    elif in_steps:
        validation_note = "ValidationInOptimizerSteps: val_check_interval counts optimizer steps"
    else:
        validation_note = (f"val_check_interval {trainer.val_check_interval} micro-batches / {accumulation} accumulation;"
                           " add ValidationInOptimizerSteps to count optimizer steps")
    return Plan(model_config=model_config, n_parameters=count_parameters(model_config)["total"], n_nodes=n_nodes,
                devices_per_node=devices, layout=layout, loss_note=loss_note, max_steps=max_steps,
                validation_every=validation_every, validation_note=validation_note)


# ---- reading the config -----------------------------------------------------------------------------


def _init_args(namespace):
    return getattr(namespace, "init_args", None) or namespace


def _required(data, key: str):
    value = getattr(data, key, None)
    if value is None:
        raise UsageError(f"data.init_args.{key} is not set: plan needs the micro-batch (batch_size) and seq_len "
                         "of the data module.")
    return int(value)


def _model_config(spec) -> ModelConfig:
    if hasattr(spec, "as_dict"):
        spec = spec.as_dict()
    elif dataclasses.is_dataclass(spec) and not isinstance(spec, ModelConfig):
        spec = dataclasses.asdict(spec)
    try:
        return resolve_model_config(spec)
    except ConfigError as err:
        from diffv2_lit.cli import usage

        raise usage.model_config_error(err) from None


def _device_count(devices, accelerator) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip() not in ("auto", "-1"):
        text = devices.strip().rstrip(",")
        return len(text.split(",")) if "," in devices else int(text)
    if isinstance(devices, int) and devices > 0:
        return devices
    # "auto" / -1: every device of the machine that runs fit, which plan cannot see from here
    raise UsageError(f"trainer.devices={devices!r}: plan needs the number of devices per node; set "
                     "--trainer.devices N (and --trainer.num_nodes M).")


def _class_path(value) -> str | None:
    if isinstance(value, str):
        return value
    path = getattr(value, "class_path", None)
    if path is None and isinstance(value, dict):
        path = value.get("class_path")
    if path is None and value is not None:
        path = f"{type(value).__module__}.{type(value).__name__}"
    return path


def _strategy_kind(strategy, world_size: int) -> str:
    if strategy is None or isinstance(strategy, str):
        name = (strategy or "auto").lower()
        if name in ("auto", "single_device"):
            return "ddp" if world_size > 1 else "single"
        if name.startswith("ddp"):
            return "ddp"
        if name.startswith("fsdp"):
            return "fsdp1"
        raise UsageError(f"trainer.strategy={strategy!r}: plan estimates ModelParallelStrategy (FSDP2), FSDPStrategy,"
                         " DDP and one device; use one of those or size this run by measuring it.")
    path = _class_path(strategy) or ""
    for name, kind in STRATEGY_CLASSES.items():
        if path.endswith(name):
            return kind
    raise UsageError(f"trainer.strategy {path}: plan estimates ModelParallelStrategy (FSDP2), FSDPStrategy, DDP "
                     "and one device.")


def _shard_count(strategy, world_size: int, parallel, devices_per_node: int) -> int:
    """FSDP2 shards over ModelParallelStrategy's data-parallel size (the world size when it is "auto"), or
    under hybrid sharding over `model.parallel.fsdp_shard_size` ranks (`node`: the devices of a node)."""
    hybrid = getattr(parallel, "fsdp_shard_size", None)
    if hybrid is not None:
        return devices_per_node if hybrid == "node" else int(hybrid)
    size = getattr(_init_args(strategy), "data_parallel_size", None) if not isinstance(strategy, str) else None
    return size if isinstance(size, int) and size > 0 else world_size


def _accumulation(config, micro_batch: int, world_size: int) -> int:
    configured = int(config.trainer.accumulate_grad_batches or 1)
    global_batch = getattr(config, "global_batch_size", None)
    if global_batch is None:
        return configured
    from diffv2_lit.cli.usage import accumulation_for

    return accumulation_for(global_batch, micro_batch, world_size, configured)


def _loss_impl(requested: str, accelerator) -> tuple[str, str]:
    """The implementation `fit` will use (model/loss.py's resolution of `auto`), and why."""
    if requested != "auto":
        return requested, f"loss_impl {requested}"
    on_gpu = str(accelerator or "auto") in ("gpu", "cuda", "auto")
    if on_gpu and liger_available():
        return "liger", "loss_impl auto -> liger (liger-kernel installed here)"
    reason = "liger-kernel not installed here" if on_gpu else "not on CUDA"
    return "plain", f"loss_impl auto -> plain ({reason})"


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


# ---- the report -----------------------------------------------------------------------------------


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB"


def _tokens(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{n:,.0f}"


def _term_notes(plan: Plan) -> dict[str, str]:
    layout, memory = plan.layout, plan.memory
    every = 1 if layout.activation_checkpointing is True else int(layout.activation_checkpointing or 0)
    states = f"{layout.master_dtype} parameters, gradients, AdamW moments"
    states += f", 1/{layout.n_gpus} each" if layout.sharded else ", whole on every GPU"
    if memory.host:
        states = f"on the host (cpu_offload): {_gib(memory.host)} per process"
    if layout.keeps_unsharded_gradients:
        accumulated = (f"every parameter's unsharded gradient kept over {layout.accumulation} micro-batches "
                       "(parallel.fsdp_sync_every_micro_batch false)")
    elif layout.strategy == "fsdp2" and layout.accumulation > 1:
        accumulated = "none: reduce-scattered every micro-batch (parallel.fsdp_sync_every_micro_batch true)"
    else:
        accumulated = "none" + (": no accumulation" if layout.accumulation == 1 else " (accumulated in place)")
    return {
        "states": states,
        "gathered parameters": f"{layout.compute_dtype} blocks in flight" if layout.sharded else
                               f"{layout.compute_dtype} copies of the weights" if memory.gathered else "none",
        "accumulated gradients": accumulated,
        "activations": f"{layout.micro_batch} x {layout.seq_len} tokens, " + (
            f"checkpointing every {'' if every == 1 else f'{every}-th '}block" if every else "no checkpointing"),
        "logits": plan.loss_note,
        "overhead": "CUDA context 1.5 GiB + 10% fragmentation",
    }


def report(plan: Plan) -> str:
    layout, config = plan.layout, plan.model_config
    lines = [
        f"parameters             {plan.n_parameters:,} ({config.attention}, {config.n_layers} layers x {config.dim})",
        f"world size             {plan.world_size} ({plan.n_nodes} node(s) x {plan.devices_per_node} device(s)),"
        f" {STRATEGY_NAMES[layout.strategy]}",
        f"micro-batch            {layout.micro_batch} sequences x {layout.seq_len} tokens per device",
        f"accumulation           {layout.accumulation} micro-batch(es) per optimizer step",
        f"tokens per step        {plan.tokens_per_step:,} = {plan.world_size} x {layout.micro_batch} x "
        f"{layout.seq_len} x {layout.accumulation}",
    ]
    if plan.validation_every is None:
        lines.append(f"validation             {plan.validation_note}")
    else:
        every = plan.validation_every
        shown = f"{every:.0f}" if float(every).is_integer() else f"{every:g}"
        lines.append(f"validation             every {shown} optimizer steps ({plan.validation_note})")
    if plan.max_steps:
        lines.append(f"total tokens           {_tokens(plan.max_steps * plan.tokens_per_step)} = {plan.max_steps:,} steps"
                     f" x {plan.tokens_per_step:,} ({plan.max_steps * plan.tokens_per_step / plan.n_parameters:.1f}"
                     " per parameter)")
    else:
        lines.append("total tokens           unbounded (trainer.max_steps not set)")
    memory, notes = plan.memory, _term_notes(plan)
    lines.append("memory per GPU (estimate: diffv2_lit/training/memory.py)")
    for term, nbytes in memory.terms().items():
        lines.append(f"  {term:<24}{nbytes / GIB:>7.1f} GiB   {notes[term]}")
    lines.append(f"peak per GPU: {memory.total / GIB:.1f} GiB")
    return "\n".join(lines)


def remedy(plan: Plan) -> tuple[str, str]:
    """(term, what to change) for the change that saves the most memory in this configuration."""
    layout, memory, config = plan.layout, plan.memory, plan.model_config

    def saving(**changes) -> float:
        return memory.total - estimate_memory(config, dataclasses.replace(layout, **changes)).total

    options = []
    if layout.keeps_unsharded_gradients:
        options.append((saving(sync_every_micro_batch=True), "accumulated gradients",
                        "--model.parallel.fsdp_sync_every_micro_batch true (reduce-scatter after every micro-batch)"))
    if layout.loss_impl == "plain":
        options.append((saving(loss_impl="chunked"), "logits",
                        "--model.loss_impl chunked (the full logits never exist; or liger with liger-kernel)"))
    if layout.activation_checkpointing is not True:
        options.append((saving(activation_checkpointing=True), "activations",
                        "--model.parallel.activation_checkpointing true (recompute each block in backward)"))
    if layout.micro_batch > 1:
        options.append((saving(micro_batch=layout.micro_batch // 2, accumulation=layout.accumulation * 2),
                        "activations" if memory.activations >= memory.logits else "logits",
                        f"--data.init_args.batch_size {layout.micro_batch // 2} --trainer.accumulate_grad_batches "
                        f"{layout.accumulation * 2} (the same tokens per step)"))
    if layout.strategy == "fsdp2" and not layout.cpu_offload:
        options.append((saving(cpu_offload=True), "states", "--model.parallel.cpu_offload true (states in host memory)"))
    if not options:
        return max(memory.terms(), key=memory.terms().get), "more GPUs or a smaller model"
    _, term, change = max(options, key=lambda option: option[0])
    return term, change


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    try:
        budget, args = _pop_gpu_memory(args)
        plan = plan_from_config(_parse(args))
    except DiffV2Error as err:
        return report_error("diffv2-lit plan", err)
    print(report(plan))
    peak = plan.memory.total / GIB
    if peak > budget:
        term, change = remedy(plan)
        print(f"diffv2-lit plan: peak per GPU {peak:.1f} GiB exceeds --gpu_memory_gib {budget:g}; change {term} "
              f"({plan.memory.terms()[term] / GIB:.1f} GiB): {change}", file=sys.stderr)
        return EXIT_TOO_LARGE
    return 0


def _pop_gpu_memory(args: list[str]) -> tuple[float, list[str]]:
    rest, budget = [], DEFAULT_GPU_MEMORY_GIB
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--gpu_memory_gib" or arg.startswith("--gpu_memory_gib="):
            value = arg.split("=", 1)[1] if "=" in arg else (args[index + 1] if index + 1 < len(args) else "")
            index += 1 if "=" in arg else 2
            try:
                budget = float(value)
            except ValueError:
                raise UsageError(f"--gpu_memory_gib {value!r} must be a number of GiB (80 GB = 74.5)") from None
            continue
        rest.append(arg)
        index += 1
    return budget, rest


def _parse(args: list[str]):
    """fit's parser (types, class paths, the YAML files' own errors), without building anything."""
    from diffv2_lit.cli import fit

    fit._check_yaml_files(args)
    seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_logger.level
    seed_logger.setLevel(logging.WARNING)  # "Seed set to ..." says nothing about a plan
    try:
        return fit.parse_config([], args)
    finally:
        seed_logger.setLevel(level)
