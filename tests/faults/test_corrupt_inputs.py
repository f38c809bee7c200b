"""Damaged inputs against real runs: checkpoints (truncated, garbage, another model), a truncated data
chunk, and an out-of-memory failure on the first step. Each ends with the exact message and exit code."""

import shutil

from diffv2_lit.data.prepare import prepare
from tests.faults.forked import fit  # real processes, forked after the imports (tests/zygote.py)
from tests.faults.helpers import output, run_dir, scalars, tool

EXIT_FAULT = 1


def _copy_checkpoints(baseline, tmp_path, names):
    """A run folder holding some of the baseline's checkpoints (modification times kept)."""
    folder = run_dir(tmp_path, 0) / "checkpoints"
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy2(baseline["checkpoints"] / name, folder / name)
    return folder


def test_truncated_last_checkpoint_falls_back_to_the_newest_complete_one(tmp_path, baseline):
    folder = _copy_checkpoints(baseline, tmp_path, ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"])
    data = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])  # as a crash half-way through a copy would

    result = fit(tmp_path, "--ckpt_path", "last", "--trainer.max_steps", "9", "--model.max_steps", "12")
    assert result.returncode == 0, output(result)[-3000:]
    relative = folder.relative_to(tmp_path)  # the run's paths are relative to its working folder
    assert f"--ckpt_path last: skipping {relative / 'last.ckpt'}: the file is truncated" in output(result)
    assert f"resuming from {relative / 'epoch=0-step=6.ckpt'}" in result.stdout
    resumed = scalars(run_dir(tmp_path, 1), "train/loss")
    assert resumed == {step: baseline["losses"][step] for step in (6, 7, 8)}


def test_explicit_corrupt_checkpoint_names_the_file_and_the_one_to_use(tmp_path, baseline):
    folder = _copy_checkpoints(baseline, tmp_path, ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt"])
    (folder / "last.ckpt").write_bytes(b"\x80\x04garbage, not a checkpoint")

    result = fit(tmp_path, "--ckpt_path", str(folder / "last.ckpt"))
    assert result.returncode == EXIT_FAULT
    assert result.stderr.strip().splitlines()[-1] == (
        f"diffv2-lit fit: error: cannot resume from checkpoint {folder / 'last.ckpt'}: the file is truncated or not "
        f"a torch.save archive (no zip central directory). The newest complete checkpoint next to it is "
        f"{folder / 'epoch=0-step=6.ckpt'}: pass it as --ckpt_path (or --ckpt_path last, which skips incomplete "
        "checkpoints).")
    assert "Traceback" not in result.stderr


def test_resume_refuses_another_attention_variant(tmp_path, baseline):
    checkpoint = baseline["checkpoints"] / "epoch=0-step=6.ckpt"
    result = fit(tmp_path, "--ckpt_path", str(checkpoint), "--model.architecture.attention", "baseline")
    assert result.returncode == EXIT_FAULT
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"diffv2-lit fit: error: cannot resume from {checkpoint}: the checkpoint's model "
                              "does not match this run's: model.architecture.attention: checkpoint 'diffv2', this run "
                              "'baseline'.")
    assert "--model.architecture.attention diffv2" in message and "Traceback" not in result.stderr


def test_resume_refuses_another_shape_and_warns_about_a_changed_tokenizer(tmp_path, baseline):
    checkpoint = baseline["checkpoints"] / "epoch=0-step=6.ckpt"
    result = fit(tmp_path, "--ckpt_path", str(checkpoint), "--model.architecture.n_layers", "3")
    assert result.returncode == EXIT_FAULT
    assert "model.architecture.n_layers: checkpoint 2, this run 3" in result.stderr

    result = fit(tmp_path, "--ckpt_path", str(checkpoint), "--data.init_args.tokenizer", "other.json",
                 "--trainer.max_steps", "7", "--model.max_steps", "12")
    assert result.returncode == 0, output(result)[-3000:]
    assert "resuming with tokenizer 'other.json', but the checkpoint was trained with 'byte'" in output(result)


def test_truncated_data_chunk_names_the_file(tmp_path):
    source = tmp_path / "text.txt"
    source.write_text("".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(400)))
    folder = tmp_path / "prepared"
    prepare([str(source)], folder, chunk_size=2048, val_fraction=0.1, num_workers=1, verbose=False)
    chunk = sorted((folder / "train").glob("*.bin"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])
    fragment = tmp_path / "data.yaml"
    fragment.write_text("data:\n  class_path: diffv2_lit.data.datamodule.TokenDataModule\n"
                        f"  init_args: {{data_dir: '{folder}', seq_len: 32, batch_size: 4, num_workers: 0}}\n"
                        "model:\n  architecture: {vocab_size: 320}\n")

    result = fit(tmp_path, "--config", str(fragment))
    assert result.returncode == EXIT_FAULT
    assert f"diffv2-lit fit: error: chunk file {chunk} is corrupt or truncated: 100 bytes on disk" in result.stderr
    assert f"re-run `diffv2-lit prepare --output {folder} --overwrite`" in result.stderr
    assert "Traceback" not in result.stderr


def test_out_of_memory_on_the_first_step_suggests_the_knobs(tmp_path):
    result = fit(tmp_path, "--global_batch_size", "8", "--trainer.callbacks+=tests.faults.inject.RaiseMemoryError")
    assert result.returncode == EXIT_FAULT
    assert "global batch 8 = 4 per device x 1 device(s) x 2 accumulation step(s)" in result.stdout
    assert ("diffv2-lit fit: error: out of memory: MemoryError: injected: could not allocate 17179869184 bytes"
            in result.stderr)
    for knob in ("--data.init_args.batch_size N", "--global_batch_size G", "--model.parallel.activation_checkpointing true",
                 "--model.parallel.cpu_offload true", "--data.init_args.seq_len N"):
        assert knob in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_tokenizer_file_is_one_line_naming_it_for_fit_and_generate(tmp_path, baseline):
    """Issue 25.7: fit named neither the file nor data.tokenizer; generate ended in a 25-line traceback."""
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')  # cut off mid-file
    reason = (f"tokenizer {bad} is not a valid Hugging Face tokenizer.json (EOF while parsing a value at line 1 column "
              "28); pass 'byte' or an intact tokenizer.json (e.g. one written by `diffv2-lit train-tokenizer`)")
    fragment = tmp_path / "data.yaml"
    fragment.write_text("data:\n  class_path: diffv2_lit.data.datamodule.TokenDataModule\n"
                        f"  init_args: {{tokenizer: '{bad}'}}\n")
    result = fit(tmp_path, "--config", str(fragment))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"diffv2-lit fit: error: data.tokenizer: {reason}"
    assert "Traceback" not in result.stderr

    generated = tool(tmp_path, "generate", "--ckpt", str(baseline["checkpoints"] / "last.ckpt"), "--tokenizer",
                     str(bad), "--prompt", "to be")
    assert generated.returncode == 2
    assert generated.stderr.strip().splitlines() == [f"diffv2-lit generate: error: {reason}"]
