"""Self-contained Hugging Face model code copied into exported DIFF folders (see export.py).

A package so that setuptools ships the two files with diffv2_lit; they are never imported from here
by the project itself (transformers loads the copies in an export folder with trust_remote_code=True).
"""
