"""diffv2-lit: Differential Transformer V2 decoders (and their baselines) trained with Lightning."""

__version__ = "0.1.0"
