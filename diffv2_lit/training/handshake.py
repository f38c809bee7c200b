"""The one handshake between the data and the model, on every path: `DecoderLM.configure_model` runs it
(so `Trainer.fit` from Python gets it), and the CLI runs the same function before training starts (so a
mistake ends before a run folder exists).

What a data module offers (all optional; a module without them is not checked):

    datamodule.seq_len      tokens per training sequence
    datamodule.vocab_size   ids its tokenizer can produce
    datamodule.tokenizer    its tokenizer spec ("byte" or a tokenizer.json path), recorded in checkpoints
"""

from __future__ import annotations

from diffv2_lit.errors import UsageError
from diffv2_lit.model import ModelConfig
from diffv2_lit.model.config import CONFIG_PATH


def check_data_fits_model(model_config: ModelConfig, datamodule) -> str | None:
    """Raise UsageError (naming the keys) if the data cannot feed this model; return the tokenizer spec."""
    if datamodule is None:
        return None
    seq_len = getattr(datamodule, "seq_len", None)
    if seq_len is not None and seq_len > model_config.max_seq_len:
        raise UsageError(
            f"data.seq_len={seq_len} is above the model's max_seq_len={model_config.max_seq_len} "
            f"({CONFIG_PATH}.max_seq_len): lower data.seq_len, or raise {CONFIG_PATH}.max_seq_len to at least {seq_len}."
        )
    data_vocab = getattr(datamodule, "vocab_size", None)
    if data_vocab is not None and model_config.vocab_size < data_vocab:
        raise UsageError(
            f"the model's vocab_size={model_config.vocab_size} is smaller than the data's tokenizer vocabulary "
            f"({data_vocab} ids): tokens past {model_config.vocab_size - 1} would index out of the embedding. "
            f"Set {CONFIG_PATH}.vocab_size to at least {data_vocab} (a multiple of 64 is fastest)."
        )
    tokenizer = getattr(datamodule, "tokenizer", None)
    return tokenizer if isinstance(tokenizer, str) else None

