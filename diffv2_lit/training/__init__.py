"""Training: the LightningModule, parallelism, callbacks and the `diffv2-lit fit` CLI."""
