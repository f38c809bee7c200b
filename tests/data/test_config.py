"""TokenDataModule's typed __init__ is what LightningCLI reads: a YAML `data:` section must parse."""

import yaml
from jsonargparse import ArgumentParser

from diffv2_lit.data.datamodule import TokenDataModule

MIX_YAML = """
data:
  class_path: diffv2_lit.data.datamodule.TokenDataModule
  init_args:
    mix:
      - {path: data/web, weight: 0.7}
      - {path: data/code, weight: 0.3}
    seq_len: 128
    batch_size: 4
    num_workers: 0
    val_tokens: 4096
    pack: false
"""


def test_yaml_data_section_parses_and_instantiates():
    parser = ArgumentParser()
    parser.add_subclass_arguments(TokenDataModule, "data")
    cfg = parser.parse_object(yaml.safe_load(MIX_YAML))
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, TokenDataModule)
    assert dm.sources == ["data/web", "data/code"] and dm.weights == [0.7, 0.3]
    assert (dm.seq_len, dm.batch_size, dm.pack, dm.vocab_size) == (128, 4, False, 259)
