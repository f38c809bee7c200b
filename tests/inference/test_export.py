"""diffv2-lit export: the folders load in real `transformers` models with our logits, generate, and import back."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import transformers  # noqa: E402  (the dev extra installs it: a missing one must fail, not skip)

from diffv2_lit.inference import export as export_module  # noqa: E402
from diffv2_lit.cli import export as export_cli  # noqa: E402
from diffv2_lit.inference.export import export  # noqa: E402
from diffv2_lit.checkpoint.reading import load_for_inference, load_state_dict_for_training  # noqa: E402

ATOL = 1e-5  # fp32


def _tokens(vocab: int, shape=(2, 16), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _load_hf(folder, attention: str, qk_norm: bool = False):
    if attention == "baseline" and qk_norm:  # Qwen3: Llama + per-head q_norm/k_norm before RoPE, no custom code
        return transformers.Qwen3ForCausalLM.from_pretrained(folder).eval()
    if attention == "baseline":  # plain Llama: no custom code anywhere
        return transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def _perturb_qk_norm_weights(ckpt, model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                param.uniform_(0.5, 2.0)
    saved = torch.load(ckpt, weights_only=False)
    saved["state_dict"] = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save(saved, ckpt)


def _check_cached_generation(hf_model, model, prompt: torch.Tensor) -> None:
    """HF generate (with its KV cache) picks the greedy token of our uncached forward at every step.

    Compared through logits, not token ids: on random tiny models two logits can tie to 1e-7 and
    either argmax is right.
    """
    out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
    step_logits = torch.stack(out.logits, dim=1)  # [B, new, V]
    new = out.sequences.shape[1] - prompt.shape[1]
    with torch.no_grad():
        reference = model(out.sequences)[:, prompt.shape[1] - 1:-1]
    torch.testing.assert_close(step_logits, reference, rtol=0, atol=1e-4)
    picked = step_logits.gather(-1, out.sequences[:, -new:, None])
    torch.testing.assert_close(picked.squeeze(-1), step_logits.max(-1).values)


@pytest.mark.parametrize("attention,tie,qk_norm", [
    ("baseline", False, False), ("baseline", True, False), ("diffv2", False, False), ("diffv2", True, False),
    ("diffv1", False, False), ("baseline", False, True), ("baseline", True, True), ("diffv2", False, True),
    ("diffv1", False, True)])
def test_exported_logits_generation_and_import_back(make_checkpoint, tmp_path, attention, tie, qk_norm):
    ckpt, model = make_checkpoint(attention, tie_embeddings=tie, qk_norm=qk_norm)
    if qk_norm:  # norm weights away from their init of 1, so a dropped or misplaced norm shows in the logits
        _perturb_qk_norm_weights(ckpt, model)
    folder = export(ckpt, tmp_path / "hf")
    hf_model = _load_hf(folder, attention, qk_norm)
    assert (type(hf_model).__name__ == "Qwen3ForCausalLM") == (attention == "baseline" and qk_norm)
    tokens = _tokens(model.config.vocab_size)
    with torch.no_grad():
        ours, theirs = model(tokens), hf_model(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)

    _check_cached_generation(hf_model, model, tokens[:, :6])

    back, config, spec, _ = load_for_inference(folder)  # import back: same config, same logits
    assert config == model.config and spec == "byte"
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), ours, rtol=0, atol=0)


def test_folder_contents(make_checkpoint, tmp_path):
    baseline = export(make_checkpoint("baseline")[0], tmp_path / "baseline")
    diff = export(make_checkpoint("diffv2")[0], tmp_path / "diffv2")
    assert not list(baseline.glob("*.py"))
    config = json.loads((baseline / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "modeling_diffv2.py", "configuration_diffv2.py"} <= {p.name for p in diff.iterdir()}
    config = json.loads((diff / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_diffv2.DiffV2LitForCausalLM"
    for name in export_module.MODELING_FILES:  # self-contained: loads where diffv2_lit is not installed
        assert not re.search(r"^\s*(from|import)\s+diffv2_lit", (diff / name).read_text(), re.MULTILINE)


def test_padded_batch_generation_matches_single_prompts(make_checkpoint, tmp_path):
    """Left padding (how generate and lm-eval batch prompts of different lengths) changes nothing."""
    ckpt, model = make_checkpoint("diffv1")
    hf_model = _load_hf(export(ckpt, tmp_path / "hf"), "diffv1")
    short, long = _tokens(model.config.vocab_size, (1, 4), seed=2), _tokens(model.config.vocab_size, (1, 7), seed=3)
    pad = torch.full((1, 3), 258)
    batch = torch.cat([torch.cat([pad, short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros_like(pad), torch.ones_like(short)], 1), torch.ones_like(long)])
    out = hf_model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=258)
    for row, prompt in ((0, short), (1, long)):  # each row's step logits = its own unpadded forward
        sequence = out.sequences[row:row + 1, batch.shape[1] - prompt.shape[1]:]
        with torch.no_grad():
            reference = model(sequence)[0, prompt.shape[1] - 1:-1]
        torch.testing.assert_close(torch.stack(out.logits, 1)[row], reference, rtol=0, atol=1e-4)


def test_byte_tokenizer_loads_in_transformers(make_checkpoint, tmp_path):
    folder = export(make_checkpoint("diffv2")[0], tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    text = "héllo, wörld"
    assert tokenizer(text)["input_ids"] == list(text.encode("utf-8"))
    assert tokenizer.decode(list(text.encode("utf-8"))) == text
    assert (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) == (256, 257, 258)
    config = json.loads((folder / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"]) == (256, 257)


def _bpe_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["to be or not to be"] * 20, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(path))
    return bpe


def test_bpe_tokenizer_travels_with_the_folder(make_checkpoint, tmp_path):
    _bpe_tokenizer(tmp_path / "tokenizer.json")
    ckpt, _ = make_checkpoint("diffv2", tokenizer=str(tmp_path / "tokenizer.json"))
    folder = export(ckpt, tmp_path / "hf")
    _, _, spec, _ = load_for_inference(folder)
    assert spec == str(folder / "tokenizer.json")
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == 0  # <|endoftext|> trained first


def test_a_folder_holding_a_tokenizer_is_a_tokenizer_for_export_and_generate(make_checkpoint, tmp_path, capsys):
    """One tokenizer loader (issue 21.4): what `data.tokenizer` and `prepare` accept, export and generate accept,
    here the folder an export wrote (inference used to refuse it)."""
    from diffv2_lit.cli import generate as generate_cli

    _bpe_tokenizer(tmp_path / "tokenizer.json")
    ckpt, _ = make_checkpoint("diffv2", tokenizer=str(tmp_path / "tokenizer.json"))
    first = export(ckpt, tmp_path / "hf")
    again = export(ckpt, tmp_path / "hf2", tokenizer_spec=str(first))  # the folder, not the file inside it
    assert (again / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    assert generate_cli.main(["--ckpt", str(ckpt), "--tokenizer", str(first), "--prompt", "to be",
                              "--max-new-tokens", "2"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_the_printed_tokenizer_call_runs_no_custom_code(make_checkpoint, tmp_path, capsys, tokenizer):
    """A DIFF V2 folder's tokenizer loads without custom code and without the interactive "run the custom
    code? [y/N]" prompt, by the call `export` prints: run as printed, in a fresh process whose stdin is
    closed (a prompt would read EOF and print its question)."""
    spec = "byte"
    if tokenizer == "bpe":
        _bpe_tokenizer(tmp_path / "tokenizer.json")
        spec = str(tmp_path / "tokenizer.json")
    ckpt, _ = make_checkpoint("diffv2", tokenizer=spec)
    assert export_cli.main(["--ckpt", str(ckpt), "--output", str(tmp_path / "hf")]) == 0
    call = re.search(r"^\s*(AutoTokenizer\.from_pretrained\(.*?\))", capsys.readouterr().out, re.MULTILINE).group(1)
    text = "to be, or not to be: héllo"
    script = (f"import json\nfrom transformers import AutoTokenizer\ntokenizer = {call}\n"
              f"print(json.dumps([type(tokenizer).__module__, tokenizer({text!r})['input_ids']]))")
    result = subprocess.run([sys.executable, "-c", script], stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[y/N]" not in result.stdout + result.stderr and "custom code" not in result.stdout + result.stderr
    module, ids = json.loads(result.stdout.splitlines()[-1])
    assert module.startswith("transformers.")  # a class of transformers itself, not the folder's code
    if tokenizer == "byte":
        assert ids == list(text.encode("utf-8"))
    else:
        from tokenizers import Tokenizer

        assert ids == Tokenizer.from_file(spec).encode(text).ids
    for name in ("tokenizer_config.json", "config.json"):  # nothing points the tokenizer at custom code
        auto_map = json.loads((tmp_path / "hf" / name).read_text()).get("auto_map", {})
        assert "AutoTokenizer" not in auto_map


def test_export_cli_and_training_import(make_checkpoint, tmp_path, capsys):
    ckpt, model = make_checkpoint("diffv2")
    out = tmp_path / "hf"
    assert export_cli.main(["--ckpt", str(ckpt), "--output", str(out), "--dtype", "bfloat16"]) == 0
    assert export_cli.main(["--ckpt", str(ckpt), "--output", str(out)]) == 2  # not empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    config_dict, state_dict = load_state_dict_for_training(out)
    assert config_dict == {**model.config.__dict__}
    assert state_dict.keys() == model.state_dict().keys()
    assert state_dict["embed_tokens.weight"].dtype == torch.bfloat16
