"""Training: `DecoderLM` (the LightningModule), its optimizer and schedule, the step's statistics, and the
parallelism applied from outside (activation checkpointing, compile, FSDP2), and the memory per GPU that layout
takes (`memory.py`, which `diffv2-lit plan` prints). Callbacks are in `callbacks/`, the
CLI in `cli/`."""
