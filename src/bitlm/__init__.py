"""bitlm: BitNet b1.58 ternary ("1.58-bit") language models: train, run and serve them.

The names below load on first use, so `import bitlm` (and the native runtime, `bitlm bench`) does not
pull in torch until something that needs it is touched. torch is an extra (`pip install 'bitlm[torch]'`):
without it, a name that needs it raises a BitlmError saying so.
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
        try:
            module = import_module(_LAZY[name], __name__)
        except ModuleNotFoundError as e:  # torch is an extra: pip install 'bitlm[torch]'
            if (e.name or "").split(".")[0] != "torch":
                raise
            raise BitlmError(f"bitlm.{name} needs PyTorch, which is not installed: pip install 'bitlm[torch]' "
                             "(the native runtime, bitlm.load_native, runs without it)") from None
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bitlm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["BitNetConfig", "BitlmError", "__version__", "preset", *_LAZY]
