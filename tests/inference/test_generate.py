"""diffv2-lit generate: end to end through the console entry point, and its error messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from diffv2_lit.cli import generate as generate_cli
from diffv2_lit.inference import generate
from diffv2_lit.inference.export import export
from diffv2_lit.checkpoint.reading import load_for_inference
from diffv2_lit.checkpoint.safe_load import load_file
from diffv2_lit.checkpoint.layout import write_complete_marker

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LITDATA_DISABLE_VERSION_CHECK": "1"}
    return subprocess.run([sys.executable, "-m", "diffv2_lit", "generate", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def _greedy_text(model, prompt: str, n: int) -> str:
    ids = torch.tensor([list(prompt.encode())])
    new = model.generate(ids, n, temperature=0)[0, ids.shape[1]:].tolist()
    return bytes(t for t in new if t < 256).decode("utf-8", errors="replace")


def test_generate_cli_streams_greedy_continuation(make_checkpoint):
    ckpt, model = make_checkpoint("diffv2")
    result = _cli("--ckpt", str(ckpt), "--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0",
                  "--ignore-eos")
    assert result.returncode == 0, result.stderr
    expected = "To be" + _greedy_text(model, "To be", 12)
    assert result.stdout.rstrip("\ufffd") == expected.rstrip("\ufffd")  # a split last character is held back
    assert "12 new tokens" in result.stderr


def test_generate_cli_batch_from_export_folder(make_checkpoint, tmp_path):
    ckpt, model = make_checkpoint("diffv1")
    folder = export(ckpt, tmp_path / "hf")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ab\ncd\n\nlonger\n")  # two of length 2 share a batch; the blank line is skipped
    result = _cli("--ckpt", str(folder), "--prompt-file", str(prompts), "--max-new-tokens", "5",
                  "--temperature", "0", "--ignore-eos", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for index, prompt in enumerate(["ab", "cd", "longer"], start=1):
        assert f"=== prompt {index} ===\n{prompt}" in result.stdout
    assert "ab" + _greedy_text(model, "ab", 5).rstrip("\ufffd") in result.stdout


def test_sampling_is_reproducible_with_a_seed(make_checkpoint, capsys):
    ckpt, _ = make_checkpoint("baseline")
    args = ["--ckpt", str(ckpt), "--prompt", "x", "--max-new-tokens", "16", "--top-k", "50", "--top-p", "0.9",
            "--ignore-eos"]
    outputs = []
    for seed in ("1", "1", "2"):
        assert generate_cli.main([*args, "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "x" * 60, "--max-new-tokens", "10"], "is 60 tokens; with --max-new-tokens 10 that is 70"),
    (["--prompt", "hi", "--tokenizer", "no/such/tokenizer.json"], "tokenizer 'no/such/tokenizer.json' not found"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens=0"),
])
def test_request_errors(make_checkpoint, capsys, extra, message):
    ckpt, _ = make_checkpoint("diffv2")
    assert generate_cli.main(["--ckpt", str(ckpt), *extra]) == 2
    assert message in capsys.readouterr().err


def test_checkpoint_and_tokenizer_errors(make_checkpoint, tmp_path, capsys):
    ckpt, _ = make_checkpoint("diffv2", tokenizer=None)
    assert generate_cli.main(["--ckpt", str(ckpt), "--prompt", "hi"]) == 2
    assert "records no tokenizer" in capsys.readouterr().err

    small, _ = make_checkpoint("diffv2", vocab_size=200)  # fewer ids than the byte tokenizer's 259
    assert generate_cli.main(["--ckpt", str(small), "--prompt", "hi"]) == 2
    assert "not the tokenizer the model was trained with" in capsys.readouterr().err

    checkpoint = load_file(ckpt)
    checkpoint["hyper_parameters"]["model_config"]["dim"] = 32
    torch.save(checkpoint, tmp_path / "mismatch.ckpt")
    result = _cli("--ckpt", str(tmp_path / "mismatch.ckpt"), "--prompt", "hi", "--tokenizer", "byte")
    assert result.returncode == 1 and "do not match its model config" in result.stderr  # a damaged checkpoint
    assert "embed_tokens.weight: checkpoint (300, 64), config (300, 32)" in result.stderr


def test_text_stream_holds_back_split_characters():
    from diffv2_lit.data.tokenizer import ByteTokenizer

    stream = generate._TextStream(ByteTokenizer())
    pieces = [stream.push(byte) for byte in "é!".encode()]
    assert pieces == ["", "é", "!"]


class CountingTokenizer:
    """The byte tokenizer, counting the ids it is asked to decode (the streaming decoder's work)."""

    def __init__(self) -> None:
        from diffv2_lit.data.tokenizer import ByteTokenizer

        self.inner, self.decoded_ids = ByteTokenizer(), 0

    def decode(self, ids) -> str:
        self.decoded_ids += len(ids)
        return self.inner.decode(ids)


def test_text_stream_pieces_join_to_the_full_decode_with_bounded_work():
    """Random ids (invalid UTF-8, split characters and specials included): the pieces plus the flush are
    exactly one full decode of all ids, and the ids decoded per token stay a small constant (re-decoding the
    whole list every token would be n^2 / 2 = 2 million here)."""
    ids = torch.randint(0, 260, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    ids[100:104] = list("é€".encode())[:4]  # a 2-byte and the start of a 3-byte character, split across tokens
    tokenizer = CountingTokenizer()
    stream = generate._TextStream(tokenizer)
    text = "".join(stream.push(token) for token in ids) + stream.flush()
    assert text == tokenizer.inner.decode(ids)
    assert tokenizer.decoded_ids < 20 * len(ids)


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts tensor -> Python conversions (each one a device-to-host copy and a sync on a GPU)."""

    READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


def test_batch_generation_reads_the_device_once_per_32_tokens(capsys):
    """Several prompts print when their batch ends, so nothing needs the tokens on the host per step:
    64 tokens for 2 prompts take 64 / 32 "all ended?" reads and one read of the ids (before: one per token)."""
    from tests.inference.conftest import tiny_config, tiny_model

    from diffv2_lit.data.tokenizer import ByteTokenizer

    model, tokenizer = tiny_model(tiny_config(max_seq_len=128)), ByteTokenizer()
    args = generate_cli.build_parser().parse_args(["--ckpt", "unused", "--prompt", "", "--max-new-tokens", "64",
                                               "--temperature", "0"])
    prompts, encoded = ["ab", "cd"], [list(b"ab"), list(b"cd")]
    eos_id = model.config.vocab_size  # never sampled: both prompts run all 64 tokens
    reads = HostReads()
    with reads:
        n_tokens = generate._generate_group(model, tokenizer, prompts, encoded, [0, 1], args, None, eos_id)
    assert n_tokens == 128 and reads.count <= 64 // generate.EOS_CHECK_EVERY + 1
    out = capsys.readouterr().out
    expected = model.generate(torch.tensor(encoded), 64, temperature=0)[:, 2:].tolist()
    assert out == "".join(f"=== prompt {i + 1} ===\n{p}{tokenizer.decode(ids)}\n"
                          for i, (p, ids) in enumerate(zip(prompts, expected)))


def test_batch_generation_cuts_each_prompt_at_its_end_of_text(capsys):
    """A prompt that samples EOS prints what came before it; the count is the steps the batch ran."""
    from tests.inference.conftest import tiny_config, tiny_model

    from diffv2_lit.data.tokenizer import ByteTokenizer

    model = tiny_model(tiny_config())
    encoded = [list(b"ab"), list(b"cd")]
    greedy = model.generate(torch.tensor(encoded), 8, temperature=0)[:, 2:].tolist()
    eos_id = greedy[0][3]  # prompt 1 ends at its 4th token
    args = generate_cli.build_parser().parse_args(["--ckpt", "unused", "--prompt", "", "--max-new-tokens", "8",
                                               "--temperature", "0"])
    n_tokens = generate._generate_group(model, ByteTokenizer(), ["ab", "cd"], encoded, [0, 1], args, None, eos_id)
    out = capsys.readouterr().out
    first = greedy[0][:greedy[0].index(eos_id)]
    second = greedy[1][:greedy[1].index(eos_id)] if eos_id in greedy[1] else greedy[1]
    assert n_tokens == 16
    assert out == (f"=== prompt 1 ===\nab{ByteTokenizer().decode(first)}\n"
                   f"=== prompt 2 ===\ncd{ByteTokenizer().decode(second)}\n")


# ---- requests past the training length ------------------------------------------------------------


def _sharded(ckpt: Path, folder: Path) -> Path:
    """The checkpoint as Lightning's ModelParallelStrategy writes it: DCP shards + meta.pt (the rest)."""
    checkpoint = load_file(ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": checkpoint.pop("state_dict")}, checkpoint_id=str(folder), no_dist=True)
    torch.save(checkpoint, folder / "meta.pt")
    write_complete_marker(folder, global_step=checkpoint.get("global_step", 0))  # as its save does
    return folder


@pytest.mark.parametrize("layout", ["lightning", "sharded", "export"])
def test_warns_past_the_training_length_and_still_generates(make_checkpoint, tmp_path, capsys, layout):
    ckpt, _ = make_checkpoint("diffv2", seq_len=16)  # a context of 64 tokens, trained on 16
    path = {"lightning": lambda: ckpt, "sharded": lambda: _sharded(ckpt, tmp_path / "sharded"),
            "export": lambda: export(ckpt, tmp_path / "hf")}[layout]()
    capsys.readouterr()
    assert generate_cli.main(["--ckpt", str(path), "--prompt", "To be", "--max-new-tokens", "20", "--temperature", "0",
                          "--ignore-eos"]) == 0
    out = capsys.readouterr()
    warning = [line for line in out.err.splitlines() if "warning" in line]
    assert len(warning) == 1, out.err
    assert "prompt (5 tokens) + --max-new-tokens 20 = 25 tokens, more than the 16 the model was trained on" \
        in warning[0] and "--max-new-tokens 11 stays within it" in warning[0]
    assert out.out.startswith("To be") and "20 new tokens" in out.err  # served in full all the same


def test_no_warning_within_the_training_length_or_when_it_is_unknown(make_checkpoint, capsys):
    trained, _ = make_checkpoint("diffv2", seq_len=25)
    unknown, _ = make_checkpoint("diffv2")  # an older checkpoint: nothing recorded, nothing to say
    for ckpt in (trained, unknown):
        assert generate_cli.main(["--ckpt", str(ckpt), "--prompt", "To be", "--max-new-tokens", "20"]) == 0
        assert "warning" not in capsys.readouterr().err


def test_a_real_run_records_its_training_length(quickstart_twin_runs, tmp_path):
    """The quickstart recipe (TokenDataModule, cut to seq_len 32): its checkpoint and its export know it."""
    ckpt = quickstart_twin_runs / "version_0" / "checkpoints" / "last.ckpt"
    assert load_for_inference(ckpt).train_seq_len == 32
    assert load_for_inference(export(ckpt, tmp_path / "hf")).train_seq_len == 32


def test_refuses_a_tokenizer_other_than_the_training_one(tmp_path, capsys):
    """A BPE tokenizer.json with fewer ids than the model's vocabulary passed the vocabulary check and generated
    gibberish with exit 0 (issue 24.9): the checkpoint of a real fit records its tokenizer's sha256."""
    import hashlib

    import lightning as L

    from diffv2_lit.data.datamodule import TokenDataModule
    from diffv2_lit.data.prepare import prepare
    from diffv2_lit.data.tokenizer import train_bpe
    from diffv2_lit.training.module import DecoderLM
    from tests.data.conftest import make_docs, write_jsonl

    docs = make_docs(100)
    bpe = tmp_path / "bpe.json"
    train_bpe(docs, vocab_size=270, show_progress=False).save(str(bpe))
    data = tmp_path / "prepared"
    prepare([str(write_jsonl(tmp_path / "docs.jsonl", docs))], data, chunk_size=2048, val_fraction=0, num_workers=1,
            verbose=False, tokenizer=str(bpe))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    module = DecoderLM(architecture=dict(tiny_config_fields(), vocab_size=320), warmup_steps=0)
    trainer.fit(module, datamodule=TokenDataModule(data_dir=str(data), tokenizer=str(bpe), seq_len=32, batch_size=2,
                                                   val_tokens=0))
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    assert load_file(ckpt)["hyper_parameters"]["tokenizer_sha256"] == hashlib.sha256(bpe.read_bytes()).hexdigest()

    assert generate_cli.main(["--ckpt", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2"]) == 0  # the recorded one
    capsys.readouterr()
    assert generate_cli.main(["--ckpt", str(ckpt), "--prompt", "hi", "--tokenizer", "byte"]) == 2  # 259 ids <= 320
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("diffv2-lit generate: error: tokenizer 'byte' (sha256 ") and error.endswith(
        f"is not the one the model was trained with (sha256 {hashlib.sha256(bpe.read_bytes()).hexdigest()[:12]}, "
        f"recorded as {str(bpe)!r}): its ids would decode as other text; pass the training tokenizer with "
        "--tokenizer, or leave --tokenizer out to use the recorded one.")


def tiny_config_fields() -> dict:
    return dict(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden_dim=64, max_seq_len=64)
