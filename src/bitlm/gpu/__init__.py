"""The GPU path: packed ternary weights stay packed in GPU memory and are multiplied by Triton kernels.

    kernels.py   Triton kernels on the Hugging Face packed layout (W1.58 x int8 activations, int32 sums)
                 and their launchers; imports triton
    linear.py    TritonBitLinear (a PackedBitLinear whose forward calls the kernels) and use_triton(model)

This module imports neither torch nor triton at import time: it resolves `device=` and `kernel=` and says,
in one line, what is missing. `bitlm.load(path, device="cuda")` and `--device cuda` come through here.

The kernels also run on the CPU under Triton's interpreter (TRITON_INTERPRET=1 set before they are
imported; slow, numpy underneath): `bitlm.load(path, kernel="triton")` with the model on the CPU is how the
tests run the whole model through them on a machine without a GPU.
"""

from __future__ import annotations

from ..errors import BitlmError

KERNELS = ("auto", "torch", "triton")
INSTALL_HINT = "pip install 'bitlm[gpu]'"


def triton_available() -> bool:
    """Triton imports (installed and not broken)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_device(device, label: str = "device"):
    """`device` ("cpu", "cuda", "cuda:N" or a torch.device) as a torch.device, or a one-line BitlmError
    when it names no device or CUDA is not available. `label` names the option in messages."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BitlmError(f"{label} {device}: not a device; use cpu or cuda (cuda:N for GPU N)") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise BitlmError(f"{label} {device}: bitlm runs on cpu or cuda, not {dev.type}")
    if not torch.cuda.is_available():
        raise BitlmError(f"{label} {device}: CUDA is not available (torch.cuda.is_available() is False); "
                         "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use the CPU "
                         "(the default)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BitlmError(f"{label} {device}: there are only {torch.cuda.device_count()} CUDA devices")
    return dev


def resolve_kernel(dev, kernel: str = "auto", linear: str = "packed", label: str = "device") -> str:
    """The products' implementation for a model on `dev`: "triton" (gpu/kernels.py) or "torch"
    (PackedBitLinear's unpack-to-float path). auto: triton on a GPU, torch on the CPU."""
    if kernel not in KERNELS:
        raise BitlmError(f"kernel={kernel!r}: expected one of {', '.join(KERNELS)}")
    if kernel == "auto":
        kernel = "triton" if dev.type == "cuda" and linear == "packed" else "torch"
    if kernel == "torch":
        return kernel
    if linear != "packed":
        raise BitlmError(f"kernel='triton' multiplies packed weights; linear={linear!r} has none "
                         "(use linear='packed', or kernel='torch')")
    if not triton_available():
        where = f"{label} {dev}" if dev.type == "cuda" else "kernel='triton'"
        raise BitlmError(f"{where}: Triton is not installed; {INSTALL_HINT}")
    from . import kernels
    if dev.type == "cpu" and not kernels.interpreted():
        raise BitlmError("kernel='triton' on the CPU runs only under Triton's interpreter: set "
                         "TRITON_INTERPRET=1 before bitlm imports its kernels (slow; for tests), or use a GPU")
    return kernel
