"""The Triton kernels compiled for a real GPU target, without a GPU: Triton compiles ahead of time for
sm_80 (A100) and assembles the PTX with the ptxas its wheel ships. This checks what the interpreter
cannot: that the kernels compile with the launchers' GPU block sizes and dtypes, that ptxas spills no
register, that the quantization's x * s + c was not contracted into an fma (it would round once instead of
twice and break the bit-for-bit match with torch), that the divisions are IEEE (div.rn), and that the
GEMM multiplies int8 on the tensor cores (mma ... s32.s8.s8.s32).

Run as a script (python tests/gpu/test_triton_compile.py) it prints the report as JSON; the test runs it in
a subprocess because the kernels must be compiled, not interpreted (TRITON_INTERPRET unset).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CAPABILITY = 80  # sm_90 PTX needs a newer ptxas than some Triton wheels ship; sm_80 assembles everywhere


def report() -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bitlm.gpu import kernels as K
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    common = {"K": "i32", "R": "i32", "N": "i32", "stride_x": "i32", "stride_y": "i32"}
    (gv_r, gv_k), (gm_m, gm_r, gm_k) = K.GPU_BLOCKS["gemv"], K.GPU_BLOCKS["gemm"]
    cases = {  # name: (kernel, signature, constexprs, warps)
        "quantize bf16": (K._quantize_kernel, {"x_ptr": "*bf16", "xq_ptr": "*i8", "s_ptr": "*fp32", "K": "i32",
                                               "stride_x": "i32", "stride_q": "i32"},
                          {"BLOCK_K": K.GPU_BLOCKS["quantize"]}, K.GPU_WARPS["quantize"]),
        "gemv bf16": (K._gemv_kernel, {"x_ptr": "*bf16", "w_ptr": "*u8", "scale_ptr": "*fp32", "y_ptr": "*i16",
                                       **common},
                      {"BLOCK_R": gv_r, "BLOCK_K": gv_k, "OUT": K.OUT_BF16_BITS}, K.GPU_WARPS["gemv"]),
        "gemv f32": (K._gemv_kernel, {"x_ptr": "*fp32", "w_ptr": "*u8", "scale_ptr": "*fp32", "y_ptr": "*fp32",
                                      **common},
                     {"BLOCK_R": gv_r, "BLOCK_K": gv_k, "OUT": K.OUT_CAST}, K.GPU_WARPS["gemv"]),
        "gemm bf16": (K._gemm_kernel, {"xq_ptr": "*i8", "s_ptr": "*fp32", "w_ptr": "*u8", "scale_ptr": "*fp32",
                                       "y_ptr": "*i16", "M": "i32", "K": "i32", "R": "i32", "N": "i32",
                                       "stride_q": "i32", "stride_y": "i32"},
                      {"BLOCK_M": gm_m, "BLOCK_R": gm_r, "BLOCK_K": gm_k, "OUT": K.OUT_BF16_BITS},
                      K.GPU_WARPS["gemm"]),
        "gemm bf16 M<=16": (K._gemm_kernel, {"xq_ptr": "*i8", "s_ptr": "*fp32", "w_ptr": "*u8", "scale_ptr": "*fp32",
                                             "y_ptr": "*i16", "M": "i32", "K": "i32", "R": "i32", "N": "i32",
                                             "stride_q": "i32", "stride_y": "i32"},
                            {"BLOCK_M": 16, "BLOCK_R": gm_r, "BLOCK_K": gm_k, "OUT": K.OUT_BF16_BITS},
                            K.GPU_WARPS["gemm"]),
    }
    out = {}
    for name, (fn, sig, const, warps) in cases.items():
        sig = {**sig, **{k: "constexpr" for k in const}}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
        ck = triton.compile(src, target=GPUTarget("cuda", CAPABILITY, 32),
                            options={"enable_fp_fusion": False, "num_warps": warps})
        ptx = ck.asm["ptx"]
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bitlm-{os.getpid()}.ptx"
        path.write_text(ptx)
        p = subprocess.run([str(ptxas), "-v", "--gpu-name", f"sm_{CAPABILITY}", str(path), "-o", os.devnull],
                           capture_output=True, text=True)
        path.unlink()
        regs = re.search(r"Used (\d+) registers", p.stderr)
        spills = re.search(r"(\d+) bytes spill stores", p.stderr)
        out[name] = {"ptxas_ok": p.returncode == 0, "registers": int(regs.group(1)) if regs else None,
                     "spill_bytes": int(spills.group(1)) if spills else None,
                     "fma": len(re.findall(r"\bfma\.", ptx)), "div_rn": len(re.findall(r"\bdiv\.rn\.f32", ptx)),
                     "int8_mma": len(re.findall(r"mma\.sync\.aligned\.\S*s32\.s8\.s8\.s32", ptx))}
    return out


def test_kernels_compile_for_sm80_as_intended():
    pytest.importorskip("triton", reason="triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
    p = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    for name, r in rep.items():
        assert r["ptxas_ok"] and r["spill_bytes"] == 0, (name, r)
        assert r["fma"] == 0, (name, "fp contraction: x * s + c must round twice, as torch does")
    assert rep["quantize bf16"]["div_rn"] == 1  # 1 / amax
    assert all(rep[k]["div_rn"] == 2 for k in ("gemv bf16", "gemv f32"))  # 1 / amax, weight_scale / s
    assert rep["gemm bf16"]["int8_mma"] > 0 and rep["gemm bf16 M<=16"]["int8_mma"] > 0
    assert rep["gemv bf16"]["int8_mma"] == 0  # the GEMV widens to int32 sums instead


if __name__ == "__main__":
    print(json.dumps(report()))
