"""The Triton kernels (bitlm.gpu.kernels) against independent references, run by Triton's interpreter on
the CPU (no GPU here; on a GPU machine, TRITON_INTERPRET=0 runs the same tests on the GPU).

References: the int32 sums against numpy int64 products of the codes unpacked by formats/hf_packed.unpack
(exactly: atol 0); the activation quantization against bitlm.quant bit for bit; layers and a whole
model against PackedBitLinear (the CPU packed path), bit for bit: both compute the exact integer sums, then
the same IEEE float32 operations in the same order, acc * (weight_scale / s), and the kernels are launched
without fma contraction, so no rounding differs and the tolerance is 0.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

# in CI (CI=true, or .ci/run's BITLM_REQUIRE_TRITON) the kernels must be tested: no skip there
REQUIRED = os.environ.get("CI", "").lower() == "true" or bool(os.environ.get("BITLM_REQUIRE_TRITON"))


def skip_module(reason: str) -> None:
    if REQUIRED:
        raise ImportError(f"{reason}; CI must test the Triton kernels (pip install -e '.[dev]' installs them)")
    pytest.skip(reason, allow_module_level=True)


if importlib.util.find_spec("triton") is None:
    skip_module("triton is not installed (pip install 'bitlm[gpu]'): the Triton kernels are not tested")

# Before the kernels are first imported: triton.jit reads it when it wraps them. It stays set for the rest
# of this process; nothing else in the suite uses Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

if os.environ["TRITON_INTERPRET"] == "1" and tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9):
    # seen with 3.2 and 3.5 and numpy 2.4: a loop bound passed to a kernel is a 1-element array there
    skip_module(f"Triton {triton.__version__}'s interpreter cannot loop over a kernel argument with this numpy; "
                "pip install 'triton>=3.9'")

import bitlm  # noqa: E402
from bitlm import quant  # noqa: E402
from bitlm.bitlinear import PackedBitLinear  # noqa: E402
from bitlm.formats import hf_packed  # noqa: E402
from bitlm.gpu import kernels  # noqa: E402
from bitlm.gpu.linear import TritonBitLinear  # noqa: E402

DEVICE = torch.device("cpu" if kernels.interpreted() else "cuda")

# (M, K, N): ragged sizes (N % 4 != 0 leaves the last stripe short; K, M off every block size)
RAGGED = [(1, 1, 1), (1, 5, 3), (2, 37, 13), (1, 300, 129), (3, 513, 70), (17, 100, 50), (5, 1030, 258)]


def random_layer(n_out: int, n_in: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """(codes int8 [N, K], packed uint8 [ceil(N/4), K] on DEVICE)."""
    w = np.random.default_rng(seed).integers(-1, 2, (n_out, n_in), dtype=np.int8)
    return w, torch.from_numpy(hf_packed.pack(w)).to(DEVICE)


def int_reference(xq: torch.Tensor, w: np.ndarray) -> np.ndarray:
    return xq.cpu().numpy().astype(np.int64) @ w.astype(np.int64).T


def scale(v: float = 0.37) -> torch.Tensor:
    return torch.tensor([v], dtype=torch.float32, device=DEVICE)


# ---- activation quantization ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rows_is_bitlm_quant_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 1030, generator=g) * torch.tensor([1e-3, 0.1, 1, 3, 50, 1e4])[:, None]).to(dtype)
    x[1, :] = 0  # all zero: the 1e-5 floor of the absmax
    x[2, 500] = -7.5  # one outlier sets the scale of its row
    xq, s = kernels.quantize_rows(x.to(DEVICE))
    ref_q, ref_s = quant.quantize_activations(x)
    assert torch.equal(s.cpu(), ref_s[:, 0]) and torch.equal(xq.cpu(), ref_q)


def test_quantize_rows_rounds_ties_to_even():
    # amax 127/64 gives s = 64 exactly, so (k + 0.5) / 64 are exact ties: torch.round takes the even side
    k = torch.arange(-126, 126, dtype=torch.float32)
    x = torch.cat([(k + 0.5) / 64, torch.tensor([127.0 / 64])])[None]
    xq, s = kernels.quantize_rows(x.to(DEVICE))
    assert float(s) == 64.0
    assert torch.equal(xq.cpu()[0, :-1].float(), torch.round(k + 0.5))  # half to even: 0.5 -> 0, 1.5 -> 2
    assert xq.cpu()[0, :-1].tolist()[:4] == [-126, -124, -124, -122]


# ---- the integer sums, exactly -------------------------------------------------------------------
@pytest.mark.parametrize("M,K,N", RAGGED)
@pytest.mark.parametrize("blocks", ["interpreter", "gpu"])
def test_gemv_sums_are_exact(M, K, N, blocks):
    w, packed = random_layer(N, K, seed=K + N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M * K)) * 2
    b = kernels.INTERPRETER_BLOCKS["gemv"] if blocks == "interpreter" else kernels.GPU_BLOCKS["gemv"]
    acc = kernels.gemv(x.to(DEVICE), packed, scale(), N, raw=True, blocks=b)
    xq, _ = quant.quantize_activations(x)  # the kernel quantizes x itself
    assert acc.dtype == torch.int32
    np.testing.assert_array_equal(acc.cpu().numpy(), int_reference(xq, w))


@pytest.mark.parametrize("M,K,N", RAGGED)
@pytest.mark.parametrize("blocks", ["interpreter", "gpu"])
def test_gemm_sums_are_exact(M, K, N, blocks):
    w, packed = random_layer(N, K, seed=K * N)
    xq = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=torch.Generator().manual_seed(K))
    s = torch.rand(M, generator=torch.Generator().manual_seed(M)) + 0.5
    b = kernels.INTERPRETER_BLOCKS["gemm"] if blocks == "interpreter" else kernels.GPU_BLOCKS["gemm"]
    acc = kernels.gemm(xq.to(DEVICE), s.to(DEVICE), packed, scale(), N, raw=True, blocks=b)
    np.testing.assert_array_equal(acc.cpu().numpy(), int_reference(xq, w))


def test_strided_inputs():
    # a column slice (rows not contiguous along K) and a transposed weight view give the same sums
    w, packed = random_layer(13, 40, seed=5)
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(5))[:, ::2]
    xq, s = quant.quantize_activations(x)
    want = int_reference(xq, w)
    np.testing.assert_array_equal(kernels.gemv(x.to(DEVICE), packed, scale(), 13, raw=True).cpu().numpy(), want)
    got = kernels.gemm(xq.t().contiguous().t().to(DEVICE), s[:, 0].to(DEVICE), packed.t().contiguous().t(),
                       scale(), 13, raw=True)
    np.testing.assert_array_equal(got.cpu().numpy(), want)


def test_extreme_sums_do_not_overflow():
    # every weight +1 or -1 and every activation -128: |sum| = 128 K, the largest possible
    K, N = 6912, 8
    w = np.where(np.arange(N)[:, None] % 2 == 0, 1, -1).astype(np.int8) * np.ones((1, K), np.int8)
    packed = torch.from_numpy(hf_packed.pack(w)).to(DEVICE)
    xq = torch.full((2, K), -128, dtype=torch.int8)
    acc = kernels.gemm(xq.to(DEVICE), torch.ones(2, device=DEVICE), packed, scale(), N, raw=True)
    assert acc.cpu()[0].tolist() == [-128 * K, 128 * K] * 4
    x = torch.full((1, K), -1.0)  # quantizes to -127 everywhere
    assert kernels.gemv(x.to(DEVICE), packed, scale(), N, raw=True).cpu()[0].tolist() == [-127 * K, 127 * K] * 4


# the 2B4T projections (hidden 2560, intermediate 6912): few cases, the interpreter is slow
@pytest.mark.parametrize("kind,M,K,N", [("gemv", 1, 2560, 3840), ("gemv", 1, 6912, 2560),
                                        ("gemm", 3, 2560, 13824)])
def test_2b4t_shapes_exact(kind, M, K, N):
    w, packed = random_layer(N, K, seed=N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(N))
    xq, s = quant.quantize_activations(x)
    if kind == "gemv":
        acc = kernels.gemv(x.to(DEVICE), packed, scale(), N, raw=True)
    else:
        acc = kernels.gemm(xq.to(DEVICE), s[:, 0].to(DEVICE), packed, scale(), N, raw=True)
    np.testing.assert_array_equal(acc.cpu().numpy(), int_reference(xq, w))


# ---- the epilogue, layers and a whole model against the CPU packed path ---------------------------
@pytest.mark.parametrize("M", [1, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_equals_packed_bitlinear(M, dtype):
    w, _ = random_layer(70, 300, seed=3)
    ref = PackedBitLinear.from_codes(torch.from_numpy(w), 0.0123).to(dtype)
    ref.weight_scale.data = ref.weight_scale.float()
    layer = TritonBitLinear.from_packed(ref).to(DEVICE)
    x = (torch.randn(2, M, 300, generator=torch.Generator().manual_seed(M)) * 4).to(dtype)
    y = layer(x.to(DEVICE))
    assert y.dtype == dtype and y.shape == (2, M, 70)
    assert torch.equal(y.cpu(), ref(x))  # tolerance 0: see the module's docstring


def test_tiny_model_logits_through_triton_equal_the_cpu_packed_path(tiny_model_dir):
    ref = bitlm.load(tiny_model_dir)
    tri = bitlm.load(tiny_model_dir, kernel="triton", device=DEVICE.type)
    assert sum(isinstance(m, TritonBitLinear) for m in tri.modules()) == 7 * ref.config.num_hidden_layers
    ids = torch.tensor([[0, 5, 17, 300, 42, 9, 100]])
    with torch.inference_mode():
        # prefill (the gemm: M = 7) then three decode steps (the fused gemv: M = 1)
        c_ref, c_tri = ref.new_cache(), tri.new_cache()
        outs = [(ref(ids, c_ref), tri(ids.to(DEVICE), c_tri))]
        for t in (3, 250, 7):
            step = torch.tensor([[t]])
            outs.append((ref(step, c_ref), tri(step.to(DEVICE), c_tri)))
    for a, b in outs:
        assert torch.equal(a, b.cpu())  # bit for bit: same integer sums, same float32 epilogue
    assert not torch.equal(outs[1][0], outs[2][0])  # the steps are different positions, not one output


def test_greedy_generation_is_the_same(tiny_model_dir):
    ref = bitlm.load(tiny_model_dir)
    tri = bitlm.load(tiny_model_dir, kernel="triton", device=DEVICE.type)
    kw = dict(max_new_tokens=8, temperature=0, ignore_eos=True)
    assert tri.generate("To be, or not", **kw) == ref.generate("To be, or not", **kw)


def test_bench_runs_the_triton_model():
    # bench --device cuda's model and measurement, through the kernels (interpreted here)
    from bitlm.engine import bench
    model = bench.random_torch_model("tiny", DEVICE, kernel="triton")
    assert getattr(model, "kernel", None) == "triton"
    records = bench.run_torch(model, 4, 0, 1) + bench.run_torch(model, 0, 2, 1)
    assert [r["backend"] for r in records] == [f"triton ({DEVICE.type})"] * 2


def test_server_engine_through_triton_equals_the_cpu_packed_path(tiny_model_dir):
    # `bitlm serve --device cuda`'s engine (serve/torch_engine.py) on the Triton model: two sequences side
    # by side, a prompt chunk beside decode rows, the same logits as the engine on the CPU packed model
    from bitlm.serve.torch_engine import TorchEngine
    ref = TorchEngine(bitlm.load(tiny_model_dir), max_seqs=2)
    tri = TorchEngine(bitlm.load(tiny_model_dir, kernel="triton", device=DEVICE.type), max_seqs=2)
    a, b = (ref.add_sequence(), ref.add_sequence()), (tri.add_sequence(), tri.add_sequence())
    for x, y in ([[0, 5, 17, 300], [9]], [[42], [100, 7, 3]], [[250], [8]]):
        work_ref, work_tri = [(a[0], x), (a[1], y)], [(b[0], x), (b[1], y)]
        for r, t in zip(ref.step(work_ref), tri.step(work_tri)):
            np.testing.assert_array_equal(t, r)
    assert [tri.seq_len(s) for s in b] == [6, 5] and tri.used_blocks == 2
