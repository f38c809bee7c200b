"""The memory estimate's activation term against what autograd really keeps for backward.

One decoder block in bf16 (FSDP2's compute dtype; its RMSNorms upcast to fp32) runs a forward under
`saved_tensors_hooks`, which sees every tensor saved for backward; each storage is counted once, and the
weights (FSDP2 frees their gathered copies after forward and gathers them again for backward) are left out.
The sum is the block's activation memory, to compare with `block_activation_bytes`."""

import pytest
import torch

from diffv2_lit.model import ModelConfig
from diffv2_lit.training.memory import Layout, _activation_bytes, block_activation_bytes
from diffv2_lit.model.rope import rope_cos_sin
from diffv2_lit.model.transformer import Block

SEQ_LEN = 256


def saved_bytes(module: torch.nn.Module, *inputs, leave_out=()) -> int:
    weights = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *leave_out)}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(storages.values())


def _block_inputs(config: ModelConfig, batch: int):
    x = torch.randn(batch, SEQ_LEN, config.dim, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(SEQ_LEN), config.head_dim, config.rope_theta, torch.bfloat16)
    return x, cos, sin


@pytest.mark.parametrize("attention", ["baseline", "diffv2"])
def test_one_block_keeps_what_the_estimate_says(attention):
    config = ModelConfig(dim=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_hidden_dim=768, attention=attention,
                         attn_backend="sdpa")
    block = Block(config, layer_idx=0).to(torch.bfloat16)
    block.init_weights(config.init_std, config.init_std)
    measured = saved_bytes(block, *_block_inputs(config, batch=2))
    estimate = block_activation_bytes(config, micro_batch=2, seq_len=SEQ_LEN, compute_bytes=2)
    # The estimate leaves out only tensors of a few bytes per token and head (the attention's logsumexp,
    # RMSNorm's 1/rms, DIFF V2's sigmoid(lambda), the rotary tables).
    assert estimate <= measured <= 1.05 * estimate


def test_activation_checkpointing_keeps_the_block_inputs():
    """With every block checkpointed, a block keeps only its input (plus one block recomputed in backward)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    config = ModelConfig(dim=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_hidden_dim=768, attn_backend="sdpa")
    block = checkpoint_wrapper(Block(config, layer_idx=0).to(torch.bfloat16), preserve_rng_state=False)
    x, cos, sin = _block_inputs(config, batch=2)
    measured = saved_bytes(block, x, cos, sin)
    layout = Layout(micro_batch=2, seq_len=SEQ_LEN, activation_checkpointing=True)
    per_block_input = 2 * 2 * SEQ_LEN * config.dim
    rotary = cos.untyped_storage().nbytes() + sin.untyped_storage().nbytes()  # one pair for the whole model
    assert measured == per_block_input + rotary
    full = block_activation_bytes(config, 2, SEQ_LEN, 2)
    assert _activation_bytes(config, layout, 2) == config.n_layers * per_block_input + full


@pytest.mark.parametrize("impl", ["plain", "chunked"])
def test_the_loss_keeps_what_the_logits_term_starts_from(impl):
    """What the output layer + loss keep from forward to backward: `plain` the fp32 log-softmax of all the
    logits (4 bytes each; its backward then adds two more fp32 [N, V] tensors: 12 in the estimate),
    `chunked` only the bf16 gradients of the hidden states and of the output weight."""
    from diffv2_lit.model.loss import linear_cross_entropy
    from diffv2_lit.training.memory import _logits_bytes

    tokens, dim, vocab = 512, 64, 1000
    hidden = torch.randn(tokens, dim, dtype=torch.bfloat16, requires_grad=True)
    head = torch.nn.Linear(dim, vocab, bias=False).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (tokens,))

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, h):
            return linear_cross_entropy(h, self.head.weight, targets, impl)

    kept = saved_bytes(Head(), hidden, leave_out=(hidden, targets))  # the inputs are not the loss's own memory
    config = ModelConfig(dim=dim, vocab_size=vocab)
    estimate = _logits_bytes(config, Layout(micro_batch=1, seq_len=tokens, loss_impl=impl), compute_bytes=2)
    if impl == "plain":
        assert 0 <= kept - 4 * tokens * vocab <= 16  # and the 0-d total weight of the NLL loss
        assert estimate == 12 * tokens * vocab
    else:
        assert kept == 2 * tokens * dim + 2 * vocab * dim and estimate >= 2 * kept
