"""Inference and interop: generating text with the KV cache (`generate.py`) and the Hugging Face export with its
self-contained modeling code (`export.py`, `hf_modeling/`). Both read models through
`diffv2_lit.checkpoint.reading.load_for_inference`; their command lines are in `cli/`."""
