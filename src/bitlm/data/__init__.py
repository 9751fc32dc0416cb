"""Data shipped inside the package: the default model, a small BitNet b1.58 trained on Shakespeare."""

from pathlib import Path

from ..errors import BitlmError


def bundled_model_dir() -> Path:
    """The bundled model's directory (Hugging Face packed format, with its tokenizer)."""
    d = Path(__file__).parent / "shakespeare"
    if not (d / "config.json").is_file():
        raise BitlmError(f"{d}: the bundled model is missing from this install; pass -m MODEL (a model "
                         "directory or a Hugging Face repo id such as microsoft/bitnet-b1.58-2B-4T)")
    return d
