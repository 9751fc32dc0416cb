"""Measuring models: perplexity over a text (ppl), the lm-evaluation-harness adapter (harness) and the
papers' efficiency table on this machine (report).

Every module here runs on the native runtime without torch, except where it says so (the torch
runtime, the harness's torch-backed reference, the bf16 twin of `report`)."""
