"""bitlm: BitNet b1.58 ternary ("1.58-bit") language models: train, run and serve them."""

from .config import BitNetConfig, preset
from .engine.generate import ChatSession, generate, generate_text, stream_text
from .errors import BitlmError
from .io.hf import load, save_pretrained
from .model import BitNetForCausalLM, KVCache

__version__ = "0.1.0"

__all__ = ["BitNetConfig", "BitNetForCausalLM", "BitlmError", "ChatSession", "KVCache", "generate", "generate_text",
           "load", "preset", "save_pretrained", "stream_text", "__version__"]
