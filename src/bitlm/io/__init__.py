"""Checkpoints in and out: Hugging Face (hf.py), name tables (names.py)."""
