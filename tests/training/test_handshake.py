"""The data-model handshake runs on every path: the CLI (tests/faults/test_config_errors.py) and a plain
`Trainer.fit` from Python (here), with the real data modules."""

import pytest

from diffv2_lit.data.datamodule import TokenDataModule
from diffv2_lit.errors import UsageError
from diffv2_lit.model import ModelConfig
from diffv2_lit.training.handshake import check_data_fits_model
from tests.training.helpers import tiny_data, tiny_module, tiny_trainer


def test_a_model_smaller_than_the_datas_vocabulary_is_refused_naming_the_key():
    data = TokenDataModule()  # the byte tokenizer: 259 ids
    assert check_data_fits_model(ModelConfig(vocab_size=320), data) == "byte"
    with pytest.raises(UsageError, match=r"vocab_size=256 is smaller than the data's tokenizer vocabulary \(259 ids\)"
                                         r".*model\.architecture\.vocab_size to at least 259"):
        check_data_fits_model(ModelConfig(vocab_size=256), data)


def test_sequences_longer_than_the_model_is_built_for_are_refused():
    with pytest.raises(UsageError, match=r"data.seq_len=600 is above the model's max_seq_len=512 "
                                         r"\(model\.architecture\.max_seq_len\)"):
        check_data_fits_model(ModelConfig(), TokenDataModule(seq_len=600))


@pytest.mark.parametrize("data, message", [
    (tiny_data(vocab_size=300), "vocab_size=64 is smaller"),
    (tiny_data(seq_len=100), "data.seq_len=100 is above the model's max_seq_len=64"),
])
def test_trainer_fit_from_python_runs_the_handshake(data, message):
    with pytest.raises(UsageError, match=message):
        tiny_trainer(max_steps=1).fit(tiny_module(), data)
