"""Data pipeline: tokenizers, `diffv2-lit prepare` (LitData token chunks) and `TokenDataModule`.

Modules are imported directly (`from diffv2_lit.data.datamodule import TokenDataModule`) so that
`diffv2-lit prepare` does not pay for importing Lightning.
"""
