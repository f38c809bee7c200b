"""Training: `DecoderLM` (the LightningModule), its optimizer and schedule, the step's statistics, and the
parallelism applied from outside (activation checkpointing, compile, FSDP2). Callbacks are in `callbacks/`, the
CLI in `cli/`."""
