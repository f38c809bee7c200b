"""A ModelParallelStrategy whose sizes do not multiply to the world size: one line, exit 2, before any rank
starts (Lightning raises it on every rank once they run, issue 19.15)."""

from tests.faults.forked import fit  # a real process, forked after the imports (tests/zygote.py)
from tests.faults.helpers import output


def test_data_parallel_size_other_than_the_world_size_is_one_line(tmp_path):
    result = fit(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ModelParallelStrategy",
                 "--trainer.strategy.init_args.data_parallel_size", "4",
                 "--trainer.strategy.init_args.tensor_parallel_size", "1")
    assert result.returncode == 2, output(result)[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == ("diffv2-lit fit: error: trainer.strategy.init_args: data_parallel_size=4 x tensor_parallel_size=1 "
                         "must equal the world size 2 (trainer.devices x trainer.num_nodes); for FSDP2 over every GPU set "
                         "--trainer.strategy.init_args.data_parallel_size 2.")
    assert "Traceback" not in output(result)
    assert not (tmp_path / "runs").exists()
