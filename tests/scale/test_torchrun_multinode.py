"""Two "nodes" of one process each on localhost, started the way a multi-node job starts them (one
`torchrun --nnodes 2 --node_rank N` per node, one rendezvous), with the CPU twin of
configs/hardware/multinode.yaml: FSDP2 across both nodes. The losses equal one process at the same global
batch (issue 19, "Rehearse scale on this machine")."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.faults.forked import fit
from tests.faults.helpers import MAX_STEPS, TINY, env, output, run_dir, scalars

ROOT = Path(__file__).parents[2]
FP32 = ("--model.parallel.fsdp_param_dtype", "null", "--model.parallel.fsdp_reduce_dtype", "null")  # compare with the fp32 process


def cpu_twin_of_multinode(path: Path) -> Path:
    """configs/hardware/multinode.yaml for 2 nodes x 1 CPU process: same strategy, sizes for 2 ranks."""
    fragment = yaml.safe_load((ROOT / "configs" / "hardware" / "multinode.yaml").read_text())
    trainer = fragment["trainer"]
    trainer.update(accelerator="cpu", devices=1, num_nodes=2)
    trainer["strategy"]["init_args"].update(data_parallel_size=2, tensor_parallel_size=1)
    path.write_text(yaml.safe_dump(fragment))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_equal_one_process_at_the_same_global_batch(tmp_path):
    single_dir, nodes_dir = tmp_path / "single", tmp_path / "nodes"
    single_dir.mkdir()
    nodes_dir.mkdir()
    single = fit(single_dir)  # `diffv2-lit fit --config TINY`, forked after the imports (tests/zygote.py)
    assert single.returncode == 0, output(single)[-3000:]

    twin = cpu_twin_of_multinode(tmp_path / "multinode-cpu.yaml")
    port = _free_port()
    launchers = []
    for node in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                   "-m", "diffv2_lit", "fit", "--config", str(TINY), "--config", str(twin),
                   "--data.init_args.batch_size", "2", *FP32]  # 2 nodes x 2 = the single process's 4
        log = open(nodes_dir / f"node{node}.log", "w")
        launchers.append(subprocess.Popen(command, cwd=nodes_dir, env=env(nodes_dir), stdout=log,
                                          stderr=subprocess.STDOUT))
    codes = [launcher.wait(timeout=300) for launcher in launchers]
    assert codes == [0, 0], (nodes_dir / "node0.log").read_text()[-3000:]

    expected = scalars(run_dir(single_dir, 0), "train/loss")
    got = scalars(run_dir(nodes_dir, 0), "train/loss")
    assert sorted(got) == sorted(expected) == list(range(MAX_STEPS))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step
    assert os.path.isdir(run_dir(nodes_dir, 0) / "checkpoints" / "last.ckpt")  # one sharded folder for both nodes
