"""The full weights a tiny DecoderLM holds when training starts (Lightning re-launches this script once per
rank), and how often each rank opened `--source` (`--model.init_from`).

    python tests/training/start_weights_run.py --out result --strategy auto|ddp|fsdp2 [--devices 2]
        [--source model.ckpt --architecture "{...}"] [--perturb-rng]

`--perturb-rng` gives every rank its own RNG state before the model is built (as a data cache prepared on
one rank only used to), so one initialisation for all ranks must not depend on it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from tests.training.helpers import TINY_MODEL, tiny_data, tiny_trainer  # noqa: E402
from diffv2_lit.training.module import DecoderLM  # noqa: E402


class Opens:
    """Counts this process's opens of one path (an audit hook: whatever code opens it)."""

    def __init__(self, path: str) -> None:
        self.path, self.count = os.path.realpath(path), 0
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            if os.path.realpath(os.fsdecode(args[0])) == self.path:
                self.count += 1


class PerturbRng(L.Callback):
    def setup(self, trainer, pl_module, stage) -> None:
        torch.manual_seed(100 + trainer.global_rank)


class SaveWeights(L.Callback):
    def __init__(self, out: str, opens: Opens | None) -> None:
        self.out, self.opens = out, opens

    def on_train_start(self, trainer, pl_module) -> None:
        full = {name: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for name, v in pl_module.model.state_dict().items()}
        torch.save({"opens": self.opens.count if self.opens else 0, "weights": full if trainer.is_global_zero else None},
                   f"{self.out}.rank{trainer.global_rank}")
        trainer.should_stop = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source")
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", choices=["auto", "ddp", "fsdp2"], required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--architecture", default=repr(TINY_MODEL))  # a Python literal dict
    parser.add_argument("--perturb-rng", action="store_true")
    args = parser.parse_args()
    opens = Opens(args.source) if args.source else None
    L.seed_everything(0)
    strategy = args.strategy
    if strategy == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    callbacks = ([PerturbRng()] if args.perturb_rng else []) + [SaveWeights(args.out, opens)]
    trainer = tiny_trainer(max_steps=1, devices=args.devices, strategy=strategy, callbacks=callbacks)
    module = DecoderLM(architecture=eval(args.architecture), init_from=args.source, max_steps=10,
                       parallel={"fsdp_param_dtype": None, "fsdp_reduce_dtype": None}, warmup_steps=2)
    vocab = module.model_config.vocab_size
    trainer.fit(module, tiny_data(vocab_size=vocab, seq_len=16))


if __name__ == "__main__":
    main()
