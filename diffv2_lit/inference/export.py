"""A checkpoint -> a Hugging Face folder (`export`; the command `diffv2-lit export` is cli/export.py).

Baseline models become a plain `LlamaForCausalLM` folder (no custom code). DIFF V2 / V1 folders hold the
same files plus `configuration_diffv2.py` / `modeling_diffv2.py` (self-contained, registered through
`auto_map`), loaded with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. Their
tokenizer is a standard `PreTrainedTokenizerFast` and needs no custom code, but transformers 5's
AutoTokenizer reads config.json first and, finding custom code named there, asks whether to run it
unless told: `AutoTokenizer.from_pretrained(DIR, trust_remote_code=False)` loads it without asking.

Folder: config.json, generation_config.json, model.safetensors, tokenizer.json + tokenizer_config.json +
special_tokens_map.json (when the tokenizer is known), and the modeling files for DIFF models.
`diffv2_lit.checkpoint.reading.load_for_inference(DIR)` reads the folder back (`--model.init_from DIR` continues
training from it).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from diffv2_lit.checkpoint import hf_format
from diffv2_lit.checkpoint.reading import load_for_inference
from diffv2_lit.data.tokenizer import BYTE_SPECIAL_TOKENS, load_tokenizer
from diffv2_lit.errors import UsageError

MODELING_DIR = Path(__file__).parent / "hf_modeling"
MODELING_FILES = ("configuration_diffv2.py", "modeling_diffv2.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Special tokens looked up by name in any tokenizer.json (the byte tokenizer and `train-tokenizer`'s BPE).
SPECIAL_TOKEN_ROLES = {"eos_token": "<|endoftext|>", "bos_token": "<|bos|>", "pad_token": "<|pad|>"}


def load_instructions(folder: Path) -> list[str]:
    """How to load the folder in transformers: the lines `diffv2-lit export` prints after exporting."""
    config = json.loads((folder / "config.json").read_text())
    custom = "auto_map" in config
    lines = ["load it in transformers:"]
    if custom:
        lines.append(f"  AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)"
                     "  # runs the folder's modeling_diffv2.py")
    else:
        lines.append(f"  {config['architectures'][0]}.from_pretrained({str(folder)!r})  # no custom code")
    if (folder / "tokenizer_config.json").is_file():
        # The tokenizer is standard; for a DIFF folder, saying False keeps AutoTokenizer from asking about
        # the model's code (transformers 5 reads config.json before the tokenizer files).
        extra = ", trust_remote_code=False" if custom else ""
        lines.append(f"  AutoTokenizer.from_pretrained({str(folder)!r}{extra})  # a standard tokenizer, no custom code")
    return lines


def export(ckpt, output, tokenizer_spec: str | None = None, dtype: torch.dtype | None = None,
           overwrite: bool = False) -> Path:
    """Write the folder; returns its path."""
    model, config, stored_spec, train_seq_len = load_for_inference(ckpt, dtype=dtype)
    tokenizer_spec = tokenizer_spec or stored_spec
    folder = _prepare_folder(Path(output), overwrite)
    weight_dtype = next(model.parameters()).dtype
    _write_weights(model, folder)
    special_ids = _write_tokenizer(tokenizer_spec, folder, config.max_seq_len)
    if tokenizer_spec is None:
        print("diffv2-lit export: warning: no tokenizer recorded in the checkpoint and none given (--tokenizer); "
              "the folder has no tokenizer files.", file=sys.stderr)
    # The export folder carries its own BPE tokenizer.json; the byte tokenizer needs no file.
    recorded_spec = "byte" if tokenizer_spec == "byte" else ("tokenizer.json" if tokenizer_spec else None)
    _write_json(folder / "config.json",
                hf_format.hf_config(config, weight_dtype, special_ids, recorded_spec, train_seq_len))
    _write_json(folder / "generation_config.json", _generation_config(special_ids))
    if config.attention != "baseline":
        for name in MODELING_FILES:
            shutil.copyfile(MODELING_DIR / name, folder / name)
    return folder


def _prepare_folder(folder: Path, overwrite: bool) -> Path:
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise UsageError(f"output folder {str(folder)!r} is not empty; pass --overwrite to replace its files.")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_weights(model, folder: Path) -> None:
    from safetensors.torch import save_file

    # contiguous clones: safetensors refuses views and tensors that share storage
    tensors = {key: value.detach().contiguous().clone() for key, value in model.state_dict().items()}
    save_file(hf_format.to_hf_keys(tensors), str(folder / "model.safetensors"), metadata={"format": "pt"})


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n")


def _generation_config(special_ids: dict) -> dict:
    return {"do_sample": True, "temperature": 1.0, **{k: v for k, v in special_ids.items() if v is not None}}


# ---- tokenizer files ------------------------------------------------------------------------------


def _write_tokenizer(spec: str | None, folder: Path, max_seq_len: int) -> dict:
    """Write tokenizer.json (+ HF config files); returns {bos,eos,pad}_token_id for config.json."""
    if spec is None:
        return {}
    from tokenizers import Tokenizer

    loaded = load_tokenizer(spec)  # the one loader: 'byte', a tokenizer.json, or a folder holding one
    if spec == "byte":
        byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    else:
        shutil.copyfile(loaded.path, folder / "tokenizer.json")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    roles = {role: token for role, token in SPECIAL_TOKEN_ROLES.items() if tokenizer.token_to_id(token) is not None}
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_seq_len,
        "add_bos_token": False,  # training documents are not BOS-prefixed; the tokenizer adds nothing
        "clean_up_tokenization_spaces": False,
        **roles,
    })
    _write_json(folder / "special_tokens_map.json", roles)
    return {f"{role}_id": tokenizer.token_to_id(token) for role, token in roles.items()}


def byte_level_tokenizer():
    """The byte tokenizer as a `tokenizers` Tokenizer: id = byte value (0..255), then the 3 special tokens.

    A BPE with no merges over GPT-2's byte-to-unicode alphabet, so `transformers` loads it as a plain
    PreTrainedTokenizerFast: encode(text) gives the UTF-8 bytes, decode gives the text back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(sorted(BYTE_SPECIAL_TOKENS, key=BYTE_SPECIAL_TOKENS.get))  # ids 256, 257, 258
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (what ByteLevel works on)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars
