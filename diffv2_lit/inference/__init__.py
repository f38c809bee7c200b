"""Inference and interop: `diffv2-lit generate`, `diffv2-lit export` (Hugging Face format), and the one
checkpoint loader they share (`loading.load_model`)."""
