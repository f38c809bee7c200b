"""Issue 25.6: a damaged or missing sharded checkpoint is one line naming what is damaged, for each tool.

A real sharded (FSDP2, ModelParallelStrategy) checkpoint from `diffv2-lit fit`, copied and damaged the way
files get damaged: random bytes over its `.metadata` (bytes that make pickle raise UnicodeDecodeError, as in
the issue, and others), its `meta.pt` or its shard, a part deleted, a path that does not exist. Each of
`diffv2-lit consolidate | generate | export` must print one line naming the damaged file, with no traceback,
and exit 1 (a runtime fault: corrupt checkpoint, docs/faults.md); a path that does not exist is a mistake
in the command (exit 2) and must say so, not call it "not a sharded checkpoint folder".
"""

import os
import random
import shutil

import pytest

from tests.faults.forked import fit  # real processes, forked after the imports (tests/zygote.py)
from tests.faults.helpers import diffv2_lit, output, run_dir, tool

MODEL = ("--model.architecture.vocab_size", "320")  # the byte tokenizer's ids fit, so generate can run
# One process is enough for a real sharded folder (shards, .metadata, meta.pt, complete.json): half the time of two.
FSDP2 = ("trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.ModelParallelStrategy\n"
         "    init_args: {data_parallel_size: 1, tensor_parallel_size: 1}\n"
         "model:\n  parallel:\n    fsdp_param_dtype: null\n    fsdp_reduce_dtype: null\n")
# pickle protocol 4, a 2-byte BINUNICODE string that is not UTF-8: pickle.load raises UnicodeDecodeError.
NOT_UTF8_PICKLE = b"\x80\x04X\x02\x00\x00\x00\xff\xfe"
TOOLS = ("consolidate", "generate", "export")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A real 3-step run: checkpoints/epoch=0-step=3.ckpt/ and last.ckpt/, both sharded folders."""
    tmp = tmp_path_factory.mktemp("sharded_run")
    (tmp / "fsdp2.yaml").write_text(FSDP2)
    result = fit(tmp, "--config", str(tmp / "fsdp2.yaml"), *MODEL, "--trainer.max_steps", "3")
    assert result.returncode == 0, output(result)[-3000:]
    checkpoints = run_dir(tmp, 0) / "checkpoints"
    for name in ("epoch=0-step=3.ckpt", "last.ckpt"):
        assert {".metadata", "meta.pt", "__0_0.distcp", "complete.json"} <= {p.name for p in (checkpoints / name).iterdir()}
    return checkpoints


def _args(command, checkpoint, tmp_path):
    return {"consolidate": ["consolidate", str(checkpoint), str(tmp_path / "merged.ckpt")],
            "generate": ["generate", "--ckpt", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "2",
                         "--tokenizer", "byte"],
            "export": ["export", "--ckpt", str(checkpoint), "--output", str(tmp_path / "exported")]}[command]


def _overwrite(path, head: bytes = b"", seed: int = 0, size: int | None = None) -> None:
    """Random bytes over the file, keeping its size (bit rot, a bad copy) unless `size` is given."""
    size = path.stat().st_size if size is None else size
    path.write_bytes(head + random.Random(seed).randbytes(size - len(head)))


def _one_line(result, exit_code: int, command: str) -> str:
    assert result.returncode == exit_code, output(result)[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith(f"diffv2-lit {command}: error: "), lines[0]
    return lines[0]


def test_the_undamaged_folder_works(sharded, tmp_path):
    """The control: the same commands on the folder as saved succeed."""
    result = tool(tmp_path, *_args("consolidate", sharded / "last.ckpt", tmp_path))
    assert result.returncode == 0 and (tmp_path / "merged.ckpt").stat().st_size > 0, output(result)


@pytest.mark.parametrize("command", TOOLS)
def test_random_bytes_in_the_index_name_it(sharded, tmp_path, command):
    """The issue's case: consolidate ended in a UnicodeDecodeError traceback. consolidate runs as the user's
    `diffv2-lit` process; generate and export through the same main() in this process (seconds faster)."""
    folder = tmp_path / "copy" / "epoch=0-step=3.ckpt"
    shutil.copytree(sharded, folder.parent)
    _overwrite(folder / ".metadata", head=NOT_UTF8_PICKLE)
    run = diffv2_lit if command == "consolidate" else tool
    line = _one_line(run(tmp_path, *_args(command, folder, tmp_path)), 1, command)
    assert f"{folder}/.metadata (the sharded checkpoint's index, torch.distributed.checkpoint's .metadata) is " \
           "damaged: it cannot be read as the index of the shards (UnicodeDecodeError: " in line
    # Its twin in the same folder is intact: the line says which one to use instead.
    assert line.endswith(f"or use another one, e.g. {folder.parent / 'last.ckpt'} (the newest complete one next to it).")
    assert not (tmp_path / "merged.ckpt").exists() and not (tmp_path / "exported").exists()


@pytest.mark.parametrize("damage, named", [
    ("index_other_bytes", "{f}/.metadata (the sharded checkpoint's index, torch.distributed.checkpoint's .metadata) "
                          "is damaged: it cannot be read as the index of the shards (UnpicklingError: "),
    ("index_cut_short", "{f}/.metadata (the sharded checkpoint's index, torch.distributed.checkpoint's .metadata) "
                        "is damaged: "),
    ("index_deleted", "sharded checkpoint {f} is damaged: its .metadata (the index of its shards, written after them) "
                      "is missing; copy"),
    ("meta_pt_deleted", "sharded checkpoint {f} is damaged: {f}/meta.pt (Lightning's hyper-parameters and loop state, "
                        "written beside the shards) is missing; copy"),
    ("meta_pt_bytes", "{f}/meta.pt (Lightning's hyper-parameters and loop state, written beside the shards) is "
                      "damaged: it cannot be read ("),
    ("shard_bytes", "sharded checkpoint {f} is damaged: its shard __0_0.distcp cannot be read ("),
])
def test_each_damaged_part_is_named_by_each_tool(sharded, tmp_path, damage, named):
    folder = tmp_path / "shared.ckpt"
    shutil.copytree(sharded / "last.ckpt", folder)
    if damage == "index_other_bytes":
        _overwrite(folder / ".metadata", seed=1)
    elif damage == "index_cut_short":
        metadata = folder / ".metadata"
        metadata.write_bytes(metadata.read_bytes()[: metadata.stat().st_size // 2])
    elif damage.endswith("_deleted"):
        os.remove(folder / (".metadata" if damage == "index_deleted" else "meta.pt"))
    else:
        _overwrite(folder / ("meta.pt" if damage == "meta_pt_bytes" else "__0_0.distcp"), seed=2)
    for command in TOOLS:
        line = _one_line(tool(tmp_path, *_args(command, folder, tmp_path)), 1, command)
        assert named.format(f=folder) in line, line
        assert "copy the checkpoint again from where it was saved" in line
    if damage == "index_cut_short":  # complete.json records the size the save wrote: the line says so
        assert f".metadata is {(folder / '.metadata').stat().st_size} bytes, but its save wrote" in line


@pytest.mark.parametrize("command", TOOLS)
def test_a_path_that_does_not_exist_says_so(tmp_path, command):
    missing = tmp_path / "runs" / "nope" / "last.ckpt"
    line = _one_line(tool(tmp_path, *_args(command, missing, tmp_path)), 2, command)
    assert "does not exist" in line and str(missing) in line
    assert "not a sharded checkpoint folder" not in line


@pytest.mark.parametrize("command", ("generate", "export"))
def test_a_truncated_single_file_checkpoint_is_a_runtime_fault(sharded, tmp_path, command):
    """A real single-file checkpoint (the consolidated folder), cut in half by an interrupted copy: exit 1 too."""
    merged = tmp_path / "merged.ckpt"
    assert tool(tmp_path, *_args("consolidate", sharded / "last.ckpt", tmp_path)).returncode == 0
    merged.write_bytes(merged.read_bytes()[: merged.stat().st_size // 2])
    line = _one_line(tool(tmp_path, *_args(command, merged, tmp_path)), 1, command)
    assert f"'{merged}' is not a readable PyTorch/Lightning checkpoint (" in line
    assert line.endswith("truncated, damaged or not a checkpoint; copy it again from where it was saved, or use another one.")
