"""DIFF monitor: λ, context RMS, attention sinks and activation outliers on a fixed probe batch.

Every `every_n_steps` optimizer steps (at the start of the step, so the numbers at step k describe the
weights after k updates; step 0 is the initialisation) the callback runs one forward pass of the model
on its probe batch, in eval mode without gradients, inside `model.diagnostics()` (eager attention that
records its internals) with a forward hook on every block. Each hook reduces its layer's records to a
handful of scalars as soon as the block finishes and frees them, so only one layer's attention maps
are alive at a time. Hooks exist only inside that window: other steps cost one modulo.

Shape legend (what `model.diagnostics()` records per layer)
    B probe rows   T probe tokens (= S keys)   h heads reaching o_proj   dv value width per head
    context [B,T,h,dv]   values [B,S,h_kv',dv]   logits [B,Hq,T,S]   probs / probs_2 / effective_probs [B,h',T,S]
    lambda_ [B,T,h] (diffv2: sigmoid(λ)) or a 0-d tensor (diffv1: λ)

Metrics (TensorBoard tag `diff/<name>/layer_<ii>` per layer and `diff/<name>` = mean over layers):
    lambda_mean/std/min/max   sigmoid(λ) over tokens and heads (diffv2); lambda_mean = λ (diffv1)
    context_rms_mean/p05      RMS over dv of each head's output before o_proj, per (token, head)
    context_rms_norm_mean/p05 the same divided by the RMS of the values of the KV head it reads
    below_floor_frac          fraction of (token, head) with normalised RMS < floor_margin / sqrt(n),
                              n = 1-based query position = number of visible keys
    sink_mass                 attention weight on the first key (effective map), mean over rows, heads
                              and query positions >= sink_warmup; sink_mass_a1 / sink_mass_a2: DIFF's maps
                              (document masking: the first key of each query's document, queries >= sink_warmup
                              tokens into it)
    max_hidden, max_logit     largest |hidden state| after the block; largest finite attention logit
                              (also `diff/max_hidden_peak`, `diff/max_logit_peak`: max over layers)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from diffv2_lit.callbacks.protocol import OncePerStep, fsdp1_wrapper, with_model
from diffv2_lit.model.documents import document_starts

PROBES = ("batch", "random")


def needs_every_rank(trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
    """Whether a forward outside the training step must run on every rank: where parameters are sharded
    (FSDP1's wrapper, FSDP2's DTensors) each forward gathers them with a collective. With whole parameters
    on every rank (DDP, one device) rank 0 can run it alone."""
    from torch.distributed.tensor import DTensor

    return fsdp1_wrapper(trainer) is not None or any(isinstance(p, DTensor) for p in pl_module.model.parameters())
PEAK_METRICS = ("max_hidden", "max_logit")


class DiffMonitor(L.Callback):
    """Logs what the DIFF V2 write-up says to watch, for every attention variant (so runs overlay).

    Args:
        every_n_steps: run at optimizer steps 0, N, 2N, ... (at the start of the step).
        probe: "batch" (default): the first rows of the first training batch this callback sees, i.e. real
            text; "random": uniform random token ids from a `seed`ed generator (identical across runs and
            ranks, but not text, so sinks and λ behave differently than on data).
        probe_batch_size: rows in the probe.
        probe_seq_len: tokens per row; None = the batch's length ("batch") or `max_seq_len` ("random").
            The eager attention maps cost B x Hq x T^2 floats per layer: shorten it for very long contexts.
        seed: generator seed of the "random" probe.
        sink_warmup: query positions below this are left out of the sink mass (early queries see only
            a few keys, so their weight on the first key is large for any model).
        floor_margin: a (token, head) counts as below the softmax floor when its normalised context RMS
            is < floor_margin / sqrt(n). 1.0 is the floor itself; the default 0.5 leaves room for the
            sampling noise of a d-dim average, so a plain softmax head reports ~0.
        histograms: also write a histogram of sigmoid(λ) per layer (DIFF V2) to TensorBoard loggers.
    """

    def __init__(self, every_n_steps: int = 100, probe: str = "batch", probe_batch_size: int = 2,
                 probe_seq_len: int | None = None, seed: int = 0, sink_warmup: int = 16, floor_margin: float = 0.5,
                 histograms: bool = True) -> None:
        super().__init__()
        for name, value, low in (("every_n_steps", every_n_steps, 1), ("probe_batch_size", probe_batch_size, 1),
                                 ("sink_warmup", sink_warmup, 0), ("probe_seq_len", probe_seq_len, 1)):
            if value is None and name == "probe_seq_len":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"DiffMonitor: {name}={value!r} must be an integer >= {low}.")
        if probe not in PROBES:
            raise ValueError(f"DiffMonitor: probe={probe!r} is unknown; choose one of {PROBES}.")
        if not 0 < floor_margin <= 1:
            raise ValueError(f"DiffMonitor: floor_margin={floor_margin!r} must be in (0, 1] (1 = the 1/sqrt(n) floor).")
        self.every_n_steps, self.probe, self.probe_batch_size = every_n_steps, probe, probe_batch_size
        self.probe_seq_len, self.seed, self.sink_warmup = probe_seq_len, seed, sink_warmup
        self.floor_margin, self.histograms = floor_margin, histograms
        self.probe_tokens: Tensor | None = None  # [B, T] long, kept on CPU and in checkpoints
        # [B, T] per-token document ids when the batches carry them (data.document_mask), else None
        self.probe_document_ids: Tensor | None = None
        self._sink_keys: Tensor | None = None  # [B, T]: each query's sink key during one measure()
        self._step = OncePerStep()

    @property
    def state_key(self) -> str:
        return "DiffMonitor"

    # ---- Lightning hooks ---------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Checked here, not in setup(): DecoderLM builds its model in configure_model(), after setup.
        model = getattr(pl_module, "model", None)
        if model is None or not hasattr(model, "diagnostics") or not hasattr(model, "layers"):
            raise TypeError(f"DiffMonitor needs `pl_module.model` to be a diffv2_lit Transformer (with "
                            f"`diagnostics()` and `layers`); {type(pl_module).__name__}.model is "
                            f"{type(model).__name__}.")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or not self._step.first(step):
            return
        if self.probe_tokens is None:
            self.probe_tokens = self.make_probe(batch, pl_module.model)
            self.probe_document_ids = self.make_probe_documents(batch, self.probe_tokens)
        if not trainer.is_global_zero and not needs_every_rank(trainer, pl_module):
            return  # whole parameters on rank 0 (DDP): the others would compute the same numbers for nothing
        # Under sharding every rank runs the forward (FSDP all-gathers parameters inside it); rank 0 logs.
        with trainer.precision_plugin.forward_context():
            documents = None if self.probe_document_ids is None else self.probe_document_ids.to(pl_module.device)
            tokens = self.probe_tokens.to(pl_module.device)
            scalars, histograms = with_model(trainer, pl_module,
                                             lambda model: self.measure(model, tokens, document_ids=documents))
        if trainer.is_global_zero:
            self._log(trainer, scalars, histograms)

    # ---- probe -------------------------------------------------------------------------------

    def make_probe(self, batch: Any, model: nn.Module) -> Tensor:
        config = model.config
        if self.probe == "random":
            length = self.probe_seq_len or config.max_seq_len
            generator = torch.Generator().manual_seed(self.seed)
            return torch.randint(0, config.vocab_size, (self.probe_batch_size, length), generator=generator)
        tokens = _input_ids(batch)
        length = min(self.probe_seq_len or tokens.shape[1], tokens.shape[1], config.max_seq_len)
        return tokens[: self.probe_batch_size, :length].detach().cpu().clone()

    def make_probe_documents(self, batch: Any, probe: Tensor) -> Tensor | None:
        """The document ids [B, T] of the probe rows: a batch's third tensor (data.document_mask), else None."""
        if self.probe != "batch" or not isinstance(batch, (tuple, list)) or len(batch) < 3:
            return None
        return batch[2][: probe.shape[0], : probe.shape[1]].detach().cpu().clone()

    # ---- measuring ---------------------------------------------------------------------------

    @torch.no_grad()
    def measure(self, model: nn.Module, tokens: Tensor, document_ids: Tensor | None = None
                ) -> tuple[dict[str, float], dict[str, Tensor]]:
        """One diagnostic forward of `model` on `tokens` [B, T]; returns (scalars by tag, λ values by tag).
        Under a strategy that wraps the module, call it through `protocol.with_model`. With `document_ids`
        [B, T] the forward is document-masked and each query's sink is its document's first token, not
        position 0."""
        was_training = model.training
        model.eval()
        per_layer: list[dict[str, Tensor]] = [{} for _ in model.layers]
        try:
            with model.diagnostics() as records:
                hooks = [block.register_forward_hook(self._layer_hook(records[i], per_layer[i]))
                         for i, block in enumerate(model.layers)]
                try:
                    # Eager, even when blocks are compiled in place (`block.compile()`): the diagnostics path
                    # records Python dicts and [B, Hq, T, S] maps. `torch.compiler.disable` around the call does
                    # not reach a block compiled in place (its own compiled call re-enters dynamo), and would
                    # compile the diagnostic graphs; the force_eager stance runs every compiled code as written.
                    with torch.compiler.set_stance("force_eager"):
                        if document_ids is None:
                            model(tokens)
                        else:
                            self._sink_keys = document_starts(document_ids)
                            model(tokens, document_ids=document_ids)
                finally:
                    self._sink_keys = None
                    for hook in hooks:
                        hook.remove()
        finally:
            model.train(was_training)
        return self._summarise(per_layer)

    def _layer_hook(self, record: dict, out: dict) -> Callable:
        def hook(block: nn.Module, args: Any, output: Tensor) -> None:
            out.update(layer_stats(record, output, self.sink_warmup, self.floor_margin, self._sink_keys))
            record.clear()  # free this layer's attention maps before the next block runs
        return hook

    def _summarise(self, per_layer: list[dict[str, Tensor]]) -> tuple[dict[str, float], dict[str, Tensor]]:
        scalars: dict[str, float] = {}
        histograms: dict[str, Tensor] = {}
        names = [k for k in per_layer[0] if k != "lambda_values"]
        # One device->host copy for everything instead of one sync per number.
        table = torch.stack([torch.stack([layer[k].float() for k in names]) for layer in per_layer]).cpu()
        for j, name in enumerate(names):
            column = table[:, j]
            for i, value in enumerate(column.tolist()):
                scalars[f"diff/{name}/layer_{i:02d}"] = value
            scalars[f"diff/{name}"] = column.mean().item()
            if name in PEAK_METRICS:
                scalars[f"diff/{name}_peak"] = column.max().item()
        for i, layer in enumerate(per_layer):
            if "lambda_values" in layer:
                histograms[f"diff/lambda_hist/layer_{i:02d}"] = layer["lambda_values"]
        return scalars, histograms

    def _log(self, trainer: L.Trainer, scalars: dict[str, float], histograms: dict[str, Tensor]) -> None:
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if self.histograms and isinstance(logger, TensorBoardLogger):
                for tag, values in histograms.items():
                    logger.experiment.add_histogram(tag, values, global_step=step)

    # ---- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # The probe is saved so the curves stay on the same tokens across a resume.
        return {"probe_tokens": self.probe_tokens, "probe_document_ids": self.probe_document_ids,
                "last_step": self._step.seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe_tokens = state_dict.get("probe_tokens")
        self.probe_document_ids = state_dict.get("probe_document_ids")
        self._step.seen = state_dict.get("last_step")


# ----------------------------------------------------------------------------------------------
# Per-layer reductions (all return 0-d tensors on the model's device; the caller syncs once)
# ----------------------------------------------------------------------------------------------


def layer_stats(record: dict[str, Tensor], hidden: Tensor, sink_warmup: int, floor_margin: float,
                sink_keys: Tensor | None = None) -> dict[str, Tensor]:
    stats = {**lambda_stats(record["lambda_"])} if "lambda_" in record else {}
    stats.update(context_stats(record["context"], record["values"], floor_margin))
    stats.update(sink_stats(record, sink_warmup, sink_keys))
    stats["max_hidden"] = hidden.detach().abs().amax().float()
    stats["max_logit"] = finite_max(record["logits"])
    return stats


def lambda_stats(lam: Tensor) -> dict[str, Tensor]:
    """DIFF V2: sigmoid(λ) [B,T,h] summarised (+ the values for a histogram); DIFF V1: the scalar λ."""
    lam = lam.float()
    if lam.dim() == 0:
        return {"lambda_mean": lam}
    return {"lambda_mean": lam.mean(), "lambda_std": lam.std(unbiased=False), "lambda_min": lam.amin(),
            "lambda_max": lam.amax(), "lambda_values": lam.flatten().cpu()}


def context_rms(context: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """(RMS over dv of each head's context [B,T,h], the same divided by its KV head's value RMS).

    Output head j reads KV head j // (h / h_kv') for every variant (contiguous GQA groups; a DIFF V2
    pair shares its KV head; a DIFF V1 head reads one 2d-wide value head)."""
    rms = context.float().pow(2).mean(-1).sqrt()
    value_rms = values.float().pow(2).mean(dim=(0, 1, 3)).sqrt()  # [h_kv']
    group = rms.shape[-1] // value_rms.shape[0]
    return rms, rms / value_rms.repeat_interleave(group).clamp_min(1e-12)


def context_stats(context: Tensor, values: Tensor, floor_margin: float) -> dict[str, Tensor]:
    rms, normalised = context_rms(context, values)
    n_visible = torch.arange(1, rms.shape[1] + 1, device=rms.device, dtype=torch.float32)
    floor = floor_margin / n_visible.sqrt()  # softmax over n keys of unit-RMS uncorrelated values: >= 1/sqrt(n)
    return {"context_rms_mean": rms.mean(), "context_rms_p05": quantile(rms, 0.05),
            "context_rms_norm_mean": normalised.mean(), "context_rms_norm_p05": quantile(normalised, 0.05),
            "below_floor_frac": (normalised < floor[None, :, None]).float().mean()}


def sink_mass(probs: Tensor, sink_warmup: int, sink_keys: Tensor | None = None) -> Tensor:
    """Mean attention weight on key 0 over rows, heads and query positions >= sink_warmup.

    With `sink_keys` [B, T] (document masking: each query's document start) the weight on that key instead,
    over the queries at least sink_warmup tokens into their document (0 if no query is that far in)."""
    if sink_keys is None:
        first = min(sink_warmup, probs.shape[2] - 1)
        return probs[:, :, first:, 0].float().mean()
    index = sink_keys[:, None, :, None].expand(-1, probs.shape[1], -1, 1)  # [B, heads, T, 1]
    on_sink = probs.gather(-1, index).squeeze(-1).float()  # [B, heads, T]
    offset = torch.arange(sink_keys.shape[1], device=sink_keys.device) - sink_keys
    counted = (offset >= sink_warmup).float()[:, None, :].expand_as(on_sink)
    return (on_sink * counted).sum() / counted.sum().clamp_min(1.0)


def sink_stats(record: dict[str, Tensor], sink_warmup: int, sink_keys: Tensor | None = None) -> dict[str, Tensor]:
    stats = {"sink_mass": sink_mass(record["effective_probs"], sink_warmup, sink_keys)}
    if "probs_2" in record:  # DIFF: each of the two maps as well
        stats["sink_mass_a1"] = sink_mass(record["probs"], sink_warmup, sink_keys)
        stats["sink_mass_a2"] = sink_mass(record["probs_2"], sink_warmup, sink_keys)
    return stats


def finite_max(x: Tensor) -> Tensor:
    x = x.float()
    return torch.where(torch.isfinite(x), x, torch.full_like(x, -math.inf)).amax()


def quantile(x: Tensor, q: float) -> Tensor:
    """Lower q-quantile via kthvalue (torch.quantile refuses inputs over 16M elements)."""
    flat = x.flatten()
    k = max(1, math.ceil(q * flat.numel()))
    return flat.kthvalue(k).values


def _input_ids(batch: Any) -> Tensor:
    """Token ids from a batch: a tensor, a tuple/list whose first item is the inputs, or a dict."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), Tensor):
        return batch["input_ids"]
    raise TypeError(f"DiffMonitor(probe='batch') cannot find token ids in a batch of type {type(batch).__name__}; "
                    f"use batches (input_ids, targets), a tensor, or a dict with 'input_ids', or probe='random'.")
