import json

from diffv2_lit.cli.train_tokenizer import main as train_main
from diffv2_lit.data.tokenizer import ByteTokenizer, load_tokenizer
from tests.data.conftest import make_docs, write_jsonl


def test_byte_tokenizer_layout_and_round_trip():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (259, 256, 257, 258)
    text = "Wherefore art thou, Romeo? ¿Qué? 日本"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([72, 105, 256, 257]) == "Hi"
    assert tok.decode([72, 256, 105], skip_special_tokens=False) == "H<|endoftext|>i"
    assert tok.identity() == ByteTokenizer().identity() and len(tok.identity()["hash"]) == 64


def test_train_tokenizer_writes_bpe_with_eos(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(200))
    out = tmp_path / "tok" / "tokenizer.json"
    assert train_main(["--input", str(src), "--output", str(out), "--vocab-size", "300"]) == 0
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 300 and tok.decode([tok.eos_id], skip_special_tokens=False) == "<|endoftext|>"
    text = "doc 7: thou art más naïve"
    assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) < len(text.encode())
    assert json.loads(out.read_text())["model"]["type"] == "BPE"
    # The hash is of the file: it changes with the tokenizer, not with where it lies.
    assert load_tokenizer(str(tmp_path / "tok")).identity()["hash"] == tok.identity()["hash"]
    assert train_main(["--input", str(src), "--output", str(out)]) == 2  # refuses to overwrite
