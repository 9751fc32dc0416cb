"""Running a model: tokenizer and chat template, sampling, prefill/decode steps, generation, streaming."""
