import os

# Some LitData versions query the package index whenever a dataset is built; tests run offline.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """A DIFFV2_LIT_CACHE holding the built-in corpus (byte tokenizer), prepared once per test process for the
    runs that only read it. Tests of the first-use preparation itself (tests/data/test_builtin.py, the full-disk
    tests) give their runs an empty cache of their own."""
    from diffv2_lit.data.datamodule import ensure_builtin

    cache = tmp_path_factory.mktemp("builtin_cache")
    saved = os.environ.get("DIFFV2_LIT_CACHE")
    os.environ["DIFFV2_LIT_CACHE"] = str(cache)
    try:
        ensure_builtin("builtin:shakespeare", "byte")
    finally:
        if saved is None:
            del os.environ["DIFFV2_LIT_CACHE"]
        else:
            os.environ["DIFFV2_LIT_CACHE"] = saved
    return cache


@pytest.fixture(scope="session")
def quickstart_twin_runs(tmp_path_factory):
    """runs/quickstart as a newcomer leaves it, from the real recipes cut to a 2-layer model and 6 steps of
    4 x 32 tokens (in process, about 10 s): the DIFF V2 run (version_0) and its baseline twin (version_1),
    which share the logger folder; the DIFF V2 run restarted from its step-3 checkpoint (version_2: the
    same settings and seed, a second piece of the same run); an empty folder and one whose event file
    holds nothing but the logger's hp_metric (runs that failed early). Returns runs/quickstart."""
    from pathlib import Path

    import yaml
    from torch.utils.tensorboard import SummaryWriter

    from diffv2_lit.cli.fit import run_lightning_cli

    root = tmp_path_factory.mktemp("quickstart")
    recipes = Path(__file__).resolve().parent.parent / "recipes"
    for recipe in ("quickstart", "quickstart-baseline"):
        config = yaml.safe_load((recipes / f"{recipe}.yaml").read_text())
        config["trainer"].update(max_steps=6, val_check_interval=3, log_every_n_steps=1, enable_progress_bar=False)
        config["model"]["architecture"].update(n_layers=2, dim=64, n_heads=2, n_kv_heads=1, head_dim=32, max_seq_len=64)
        config["model"]["warmup_steps"] = 2
        config["data"]["init_args"].update(seq_len=32, batch_size=4, val_tokens=256)
        for callback in config["trainer"]["callbacks"]:
            name, args = callback["class_path"].rsplit(".", 1)[-1], callback.setdefault("init_args", {})
            args.update({"ModelCheckpoint": {"every_n_train_steps": 3, "save_top_k": -1},
                         "ThroughputMFU": {"log_every_n_steps": 1}, "DiffMonitor": {"every_n_steps": 2},
                         "SampleText": {"every_n_steps": 6, "max_new_tokens": 4}}.get(name, {}))
        (root / f"{recipe}.yaml").write_text(yaml.safe_dump(config))
    fits = [["--config", "quickstart.yaml"], ["--config", "quickstart-baseline.yaml"],
            ["--config", "quickstart.yaml", "--ckpt_path", "runs/quickstart/version_0/checkpoints/epoch=0-step=3.ckpt"]]
    cwd, cache = os.getcwd(), os.environ.get("DIFFV2_LIT_CACHE")
    os.chdir(root)
    os.environ["DIFFV2_LIT_CACHE"] = str(root / "cache")
    try:
        for args in fits:
            run_lightning_cli(["fit", *args])
    finally:
        os.chdir(cwd)
        if cache is None:
            del os.environ["DIFFV2_LIT_CACHE"]
        else:
            os.environ["DIFFV2_LIT_CACHE"] = cache
    runs = root / "runs" / "quickstart"
    (runs / "version_3").mkdir()
    writer = SummaryWriter(str(runs / "version_4"))
    writer.add_scalar("hp_metric", -1, 0)
    writer.close()
    return runs
