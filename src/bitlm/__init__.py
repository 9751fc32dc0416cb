"""bitlm: BitNet b1.58 ternary ("1.58-bit") language models: train, run and serve them.

The names below load on first use, so `import bitlm` (and the native runtime, `bitlm bench`) does not
pull in torch until something that needs it is touched.
"""

from importlib import import_module

from .config import BitNetConfig, preset
from .errors import BitlmError

__version__ = "0.1.0"

_LAZY = {
    "load": ".io.hf", "save_pretrained": ".io.hf",
    "BitNetForCausalLM": ".model", "KVCache": ".model",
    "ChatSession": ".engine.generate", "generate": ".engine.generate", "generate_text": ".engine.generate",
    "stream_text": ".engine.generate",
    "load_native": ".io.native",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bitlm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["BitNetConfig", "BitlmError", "__version__", "preset", *_LAZY]
