"""`SampleText`: a generated sample every N optimizer steps (TensorBoard `samples/text`) and at the end.

Uses the module protocol (callbacks/protocol.py): `pl_module.model` (the Transformer, for `generate`),
`pl_module.model_config`, and `pl_module.hparams["tokenizer"]` (the data's tokenizer spec, if recorded).
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from diffv2_lit.callbacks.diff_monitor import needs_every_rank
from diffv2_lit.callbacks.protocol import OncePerStep, decode_mode, with_model
from diffv2_lit.inference.decoding import shared_decoder


def decode_tokens(ids: list[int], tokenizer: str | None) -> str:
    """Token ids -> text: the data's tokenizer if it can be loaded, else the byte tokenizer (ids < 256)."""
    if tokenizer and tokenizer != "byte":
        try:
            from diffv2_lit.data.tokenizer import load_tokenizer

            return load_tokenizer(tokenizer).decode(ids)
        except Exception:
            pass
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def encode_prompt(prompt: str, tokenizer: str | None) -> list[int]:
    if tokenizer and tokenizer != "byte":
        try:
            from diffv2_lit.data.tokenizer import load_tokenizer

            return load_tokenizer(tokenizer).encode(prompt)
        except Exception:
            pass
    return list(prompt.encode("utf-8"))


class SampleText(L.Callback):
    """Every `every_n_steps` optimizer steps, generate text (KV-cache `generate`) and log it to
    TensorBoard under `samples/text`; with `print_at_end`, also print one sample when fit ends.

    Under FSDP all ranks generate (every forward needs every rank); with whole parameters on every rank
    (DDP) only rank 0 does. Only rank 0 logs and prints.
    Sampling uses its own seeded generator so it never disturbs the training RNG streams.
    """

    def __init__(self, every_n_steps: int = 500, prompt: str = "\n", max_new_tokens: int = 200,
                 temperature: float = 0.8, top_k: int | None = 50, seed: int = 1234,
                 print_at_end: bool = False) -> None:
        if every_n_steps < 1 or max_new_tokens < 1:
            raise ValueError("every_n_steps and max_new_tokens must be >= 1.")
        if not prompt:
            raise ValueError("prompt must not be empty (the model needs at least one token to start from).")
        self.every_n_steps, self.prompt, self.max_new_tokens = every_n_steps, prompt, max_new_tokens
        self.temperature, self.top_k, self.seed, self.print_at_end = temperature, top_k, seed, print_at_end
        self._step = OncePerStep()
        self._decode: str | None = None  # None: choose per run (decode_mode); "eager" after a failed capture

    def sample(self, pl_module: L.LightningModule, trainer: L.Trainer | None = None) -> str:
        tokenizer = pl_module.hparams.get("tokenizer", "byte")
        prompt_ids = torch.tensor([encode_prompt(self.prompt, tokenizer)], device=pl_module.device)
        new_tokens = max(1, min(self.max_new_tokens, pl_module.model_config.max_seq_len - prompt_ids.shape[1]))
        was_training = pl_module.training
        pl_module.eval()
        # No autocast needed: the KV cache takes the dtype the model computes in (bf16 under FSDP2's
        # MixedPrecisionPolicy, fp32 with fp32 weights), so queries and cached keys always agree.
        try:
            out = self._generate(pl_module, trainer, prompt_ids, new_tokens)
        finally:
            pl_module.train(was_training)
        return decode_tokens(out[0].tolist(), tokenizer)

    def _generate(self, pl_module: L.LightningModule, trainer: L.Trainer | None, prompt_ids, new_tokens: int):
        """A captured decode step where it can be (one unsharded CUDA model), else eager. A sample is a
        side show: if capturing fails, say so once and decode eagerly from then on, but keep training."""
        decode = self._decode or (decode_mode(trainer, pl_module) if trainer is not None else "eager")
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        kwargs = dict(temperature=self.temperature, top_k=self.top_k, generator=generator)

        def generate(mode: str):
            return with_model(trainer, pl_module, lambda model: model.generate(
                prompt_ids, new_tokens, decode=shared_decoder(model, mode), **kwargs))

        try:
            return generate(decode)
        except Exception as err:
            if decode == "eager":
                raise
            rank_zero_warn(f"SampleText: decoding with decode={decode!r} failed ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); decoding eagerly from now on.")
            self._decode = "eager"
            generator.manual_seed(self.seed)
            return generate("eager")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step.seen = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._step.first(trainer.global_step) or trainer.global_step % self.every_n_steps:
            return
        if not trainer.is_global_zero and not needs_every_rank(trainer, pl_module):
            return
        text = self.sample(pl_module, trainer)
        self._log_text(trainer, text)

    @rank_zero_only
    def _log_text(self, trainer: L.Trainer, text: str) -> None:
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                # Markdown in TensorBoard: indent by four spaces so newlines and spacing survive.
                logger.experiment.add_text("samples/text", "    " + text.replace("\n", "\n    "),
                                           trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.print_at_end or not (trainer.is_global_zero or needs_every_rank(trainer, pl_module)):
            return
        text = self.sample(pl_module, trainer)
        if trainer.is_global_zero:
            print(f"\n---- sample after {trainer.global_step} steps (prompt {self.prompt!r}) ----\n{text}\n----")
