"""Exactness of the native ternary kernels: every path against the scalar reference and against an
independent one (torch int64 matmul of the ternary weights), on ragged shapes and every tail case."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from bitlm import kernels, quant
from bitlm.formats import hf_packed, i2v, t5

if not kernels.available():
    if os.environ.get("BITLM_REQUIRE_NATIVE") == "1":
        raise RuntimeError(f"native kernels required but not loaded: {kernels.info()['error']}")
    pytest.skip(f"native kernels not built: {kernels.info()['error']}", allow_module_level=True)


def _path(name):
    if name not in kernels.info()["paths"]:
        pytest.skip(f"{name} not supported by this CPU")
    return name


# the paths of this machine's architecture; those its CPU lacks are skipped (NEON is checked on x86
# by test_c_harness.py under qemu)
ARCH_PATHS = ["scalar", "neon"] if platform.machine().lower() in ("aarch64", "arm64") else \
    [p for p in kernels.PATHS if p != "neon"]


@pytest.fixture(params=ARCH_PATHS)
def path(request):
    return _path(request.param)


@pytest.fixture(params=kernels.WEIGHT_FORMATS)
def fmt(request):
    return request.param


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    kernels.set_num_threads(request.param)
    yield request.param
    kernels.set_num_threads(0)


def _case(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    return w, x


def _reference(x, w):
    return x.long() @ w.long().t()


# M: 1 (decode), odd, one and more AVX-512 tiles of 8, AVX2 tiles of 4, AMX tiles of 16 plus tails.
# N: inside one 16-row block, exact blocks, one past, the 4-block GEMV groups plus tails.
# K: below, at and past one 16-column block.
SHAPES = [
    (1, 1, 1), (1, 15, 17), (1, 16, 16), (1, 17, 15), (1, 33, 100), (1, 64, 64), (1, 65, 31),
    (1, 100, 333), (1, 129, 48), (1, 640, 2560), (3, 1, 5), (3, 48, 31), (5, 17, 16), (7, 63, 49),
    (8, 32, 32), (9, 20, 17), (12, 50, 64), (17, 81, 47), (20, 16, 100), (33, 65, 129),
    # AMX from 20 rows (I2V; T5 from 16): whole and partial 32-row pairs of tiles, 64-column tiles, odd row blocks
    (16, 16, 64), (32, 32, 128), (31, 48, 65), (50, 33, 600), (64, 100, 200), (97, 16, 1000),
]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_exact(path, fmt, m, n, k):
    w, x = _case(m, n, k, seed=m * 10007 + n * 101 + k)
    packed = kernels.pack(w, fmt)
    ref = _reference(x, w)
    y = kernels.gemm(x, packed, path=path)
    assert y.dtype == torch.int32 and y.shape == (m, n)
    assert torch.equal(y.long(), ref)
    assert torch.equal(y, kernels.gemm(x, packed, path="scalar"))


@pytest.mark.parametrize("m", range(1, 21))
def test_gemm_every_m(path, fmt, threads, m):
    # every M of a decode step of up to 20 sequences: the GEMV (1), the small-M streams (4 row blocks
    # side by side at 2 and 3, pairs of 8-row tiles up to 19), AMX from 20 (T5 16). N = 7 row blocks (one
    # group of 4, a pair, a single; the last partial), K past the 24-block prefetch distance.
    n, k = 6 * 16 + 9, 30 * 16 + 7
    w, x = _case(m, n, k, seed=1000 + m)
    y = kernels.gemm(x, kernels.pack(w, fmt), path=path)
    assert torch.equal(y.long(), _reference(x, w))


@pytest.mark.parametrize("seed", range(12))
def test_gemm_random_shapes(path, fmt, threads, seed):
    rng = np.random.default_rng(seed)
    m = int(rng.choice([1, 1, 2, 3, 5, 8, 11, 16, 19, 40]))
    n, k = int(rng.integers(1, 700)), int(rng.integers(1, 1200))
    w, x = _case(m, n, k, seed=seed)
    y = kernels.gemm(x, kernels.pack(w, fmt), path=path)
    assert torch.equal(y.long(), _reference(x, w))


@pytest.mark.parametrize("m", [1, 5, 17])
@pytest.mark.parametrize("xval,wval", [(-128, 1), (-128, -1), (127, 1), (127, -1)])
def test_extreme_activations(path, fmt, m, xval, wval):
    n, k = 37, 6912  # the 2B4T down_proj input width
    x = torch.full((m, k), xval, dtype=torch.int8)
    w = torch.full((n, k), wval, dtype=torch.int8)
    y = kernels.gemm(x, kernels.pack(w, fmt), path=path)
    assert (y == xval * wval * k).all()  # hand-computed: every product is xval * wval


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_long_rows_do_not_overflow(path, fmt, m):
    # K past the 65536 columns after which the AVX-512 GEMV folds its scaled accumulators (T5: 10240, for
    # the GEMV and the 2- and 3-row kernels made the GEMV's way, which take groups of 4 row blocks: 128
    # rows = 8 row blocks, a group for each of 2 threads)
    k = 2 * 65536 + 48
    x = torch.full((m, k), -128, dtype=torch.int8)
    w = torch.ones((128, k), dtype=torch.int8)
    w[1::3] = -1
    w[2::3, ::2] = 0
    y = kernels.gemm(x, kernels.pack(w, fmt), path=path)
    want = [[-128 * k, 128 * k, -128 * (k // 2)][n % 3] for n in range(128)]
    assert y.tolist() == [want] * m


def test_threads_give_identical_results(path):
    w, x = _case(1, 2560, 2560, seed=7)
    packed = kernels.pack(w)
    kernels.set_num_threads(1)
    y1 = kernels.gemm(x, packed, path=path)
    kernels.set_num_threads(2)
    y2 = kernels.gemm(x, packed, path=path)
    kernels.set_num_threads(0)
    assert torch.equal(y1, y2)
    assert torch.equal(y1.long(), _reference(x, w))


def test_cat_stacks_outputs(path):
    w, x = _case(3, 16 + 32 + 5, 70, seed=9)
    parts = [kernels.pack(w[:16]), kernels.pack(w[16:48]), kernels.pack(w[48:])]
    fused = kernels.PackedTernary.cat(parts)
    assert (fused.n, fused.k) == (53, 70)
    assert torch.equal(kernels.gemm(x, fused, path=path).long(), _reference(x, w))
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.PackedTernary.cat([parts[2], parts[0]])


def test_strided_rows_xsum_and_out(path, fmt):
    w, xw = _case(6, 70, 150, seed=3)
    x = xw[:, :100]  # rows with a stride of 150: no copy of the activations
    w = w[:, :100].contiguous()
    packed = kernels.pack(w, fmt)
    xsum = x.sum(dim=1, dtype=torch.int32)
    out = torch.full((6, 70), 12345, dtype=torch.int32)
    y = kernels.gemm(x, packed, xsum=xsum, out=out, path=path)
    assert y is out
    assert torch.equal(out.long(), _reference(x, w))


def test_from_hf_packed_matches_hf_weights(path):
    out_features, k = 90, 77  # out not a multiple of 4 or 16
    g = torch.Generator().manual_seed(5)
    w = torch.randint(-1, 2, (out_features, k), generator=g, dtype=torch.int8)
    hf = torch.from_numpy(hf_packed.pack(w.numpy()))
    packed = kernels.from_hf_packed(hf, out_features)
    x = torch.randint(-128, 128, (4, k), generator=g, dtype=torch.int8)
    assert torch.equal(packed.codes(), w)
    assert torch.equal(kernels.gemm(x, packed, path=path).long(), _reference(x, w))


@pytest.mark.parametrize("out_features,k", [(1, 1), (5, 17), (16, 16), (17, 31), (90, 77), (640, 2560), (33, 4100)])
def test_native_hf_conversion_equals_numpy_reference(out_features, k):
    w = np.random.default_rng(out_features * k).integers(-1, 2, (out_features, k), dtype=np.int8)
    packed = kernels.from_hf_packed(torch.from_numpy(hf_packed.pack(w)), out_features)
    np.testing.assert_array_equal(packed.data.numpy(), i2v.pack(w))  # the numpy reference, byte for byte
    t5_bytes = kernels.from_hf_packed_array(hf_packed.pack(w), out_features, "t5")
    np.testing.assert_array_equal(t5_bytes, t5.pack(w))  # the T5 converter in C, against formats/t5.py


@pytest.mark.parametrize("m,k", [(1, 1), (1, 17), (3, 2563), (2, 6912), (5, 15)])
@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e4])
def test_quantize_matches_quant_module(path, m, k, scale):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * scale
    xq, s, xsum = kernels.quantize(x, path=path)
    rq, rs = quant.quantize_activations(x)
    assert torch.equal(xq, rq)
    assert torch.equal(s, rs)  # bit for bit, the same float32 operations
    assert torch.equal(xsum, rq.sum(dim=-1, dtype=torch.int32))


def test_quantize_rounds_half_to_even(path):
    # max |x| = 127 gives s = 1, so x * s lands exactly on the halves
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, -127.0] + [0.0] * 9])
    xq, _, xsum = kernels.quantize(x, path=path)
    assert xq[0, :8].tolist() == [127, 2, 4, -2, 0, 0, 2, -127]
    assert xsum.item() == 6


def test_quantize_zero_row(path):
    xq, s, xsum = kernels.quantize(torch.zeros(2, 40), path=path)
    assert (xq == 0).all() and xsum.tolist() == [0, 0]
    assert torch.equal(s, quant.quantize_activations(torch.zeros(2, 40))[1])


def test_torch_fallback_is_exact(monkeypatch):
    w, x = _case(5, 40, 50, seed=11)  # gemm's x; linear's is float below
    packed = kernels.pack(w)
    monkeypatch.setattr(kernels, "_native", None)
    assert not kernels.available()
    assert torch.equal(kernels.gemm(x, packed).long(), _reference(x, w))
    xf = torch.randn(3, 50)
    xq, s, xsum = kernels.quantize(xf)
    assert torch.equal(xq, quant.quantize_activations(xf)[0]) and torch.equal(xsum, xq.sum(-1, dtype=torch.int32))
    hf = torch.from_numpy(hf_packed.pack(w.numpy()))
    assert torch.equal(kernels.from_hf_packed(hf, 40).data, packed.data)
    y = kernels.linear(xf, packed, 0.5)
    xq, s = quant.quantize_activations(xf)
    assert torch.equal(y, (xq.float() @ w.float().t()) * (torch.tensor([0.5]) / s))
    t5 = kernels.pack(w, "t5")
    assert torch.equal(kernels.gemm(x, t5).long(), _reference(x, w))
    assert torch.equal(kernels.linear(xf, t5, 0.5), y)


def test_info_and_threads():
    info = kernels.info()
    assert info["available"] and info["path"] in info["paths"] and "scalar" in info["paths"]
    assert kernels.set_num_threads(2) == 2 and kernels.info()["threads"] == 2
    assert kernels.set_num_threads(1) == 1
    assert kernels.summary().startswith(f"native kernels: {info['path']} ") and "1 threads" in kernels.summary()
    kernels.set_num_threads(0)


def test_bad_arguments():
    packed = kernels.pack(torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="columns"):
        kernels.gemm(torch.zeros(1, 9, dtype=torch.int8), packed)
    with pytest.raises(TypeError, match="int8"):
        kernels.gemm(torch.zeros(1, 8), packed)
    with pytest.raises(ValueError, match="ternary"):
        kernels.pack(torch.full((2, 2), 2, dtype=torch.int8))


def test_env_var_forces_path():
    code = "from bitlm import kernels; print(kernels.info()['path'])"
    env = dict(os.environ, BITLM_KERNEL="scalar")
    src = os.path.join(os.path.dirname(kernels.__file__), "..", "..")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


@pytest.mark.parametrize("shape,out_features",
                         [((1, 2560), 640), ((2, 3, 100), 33), ((7, 48), 16), ((1, 17), 5), ((40, 100), 33),
                          ((48, 2560), 700)])  # the last in many parts, each dequantizing its own rows
def test_linear_equals_packed_bitlinear(path, fmt, shape, out_features):
    from bitlm.bitlinear import PackedBitLinear
    from bitlm.quant import quantize_weights

    g = torch.Generator().manual_seed(out_features)
    codes, scale = quantize_weights(torch.randn(out_features, shape[-1], generator=g))
    layer = PackedBitLinear.from_codes(codes, scale)
    x = torch.randn(*shape, generator=g) * 3
    ref = layer(x)  # the pure-torch reference forward, float32
    packed = kernels.from_hf_packed(layer.weight, out_features)
    if fmt != "i2v":
        packed = kernels.pack(packed.codes(), fmt)
    y = kernels.linear(x, packed, layer.weight_scale, path=path)
    assert y.shape == ref.shape
    assert torch.equal(y, ref)  # bit for bit: same int sums, same float32 rescale


def test_concurrent_callers_share_the_pool():
    # several Python threads (the GIL is released in the kernels) calling at once: the pool
    # serialises tasks; every result must still be exact
    import threading

    kernels.set_num_threads(2)
    cases = [_case(m, 300 + 16 * i, 500, seed=i) for i, m in enumerate([1, 3, 1, 20, 1, 7])]
    refs = [_reference(x, w) for w, x in cases]
    packed = [kernels.pack(w) for w, _ in cases]
    bad = []

    def worker(i):
        for _ in range(20):
            if not torch.equal(kernels.gemm(cases[i][1], packed[i]).long(), refs[i]):
                bad.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kernels.set_num_threads(0)
    assert not bad


def test_pool_survives_fork():
    # the pool's workers do not exist in a forked child: it must start its own, not hang
    import multiprocessing as mp

    kernels.set_num_threads(2)
    w, x = _case(1, 640, 2560, seed=4)
    packed = kernels.pack(w)
    kernels.gemm(x, packed)  # workers running in the parent
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        y = pool.apply_async(kernels.gemm, (x, packed)).get(timeout=60)
    assert torch.equal(y.long(), _reference(x, w))


@pytest.mark.parametrize("m", range(1, 21))
def test_q6_gemv_every_m(path, m):
    """Every M of a decode step of up to 20 sequences: tiles of 4 activation rows x 4 head rows, a
    partial last tile, 7 head rows (a group of 4 and 3 single rows), a partial last 64-column group."""
    from bitlm.formats import q6

    v, h = 7, 9 * 64 + 17
    rng = np.random.default_rng(7000 + m)
    q = rng.integers(-31, 32, size=(v, h), dtype=np.int8)
    x = torch.from_numpy(rng.integers(-128, 128, size=(m, h), dtype=np.int8))
    y = kernels.q6_gemv(x, torch.from_numpy(q6.pack(q)), h, path=path)
    assert torch.equal(y.long(), x.long() @ torch.from_numpy(q).long().t())


def test_q6_gemv_long_rows_at_the_extremes(path):
    """40000 columns of q = +31 (code 63) against x = -128: sums the AVX2 kernel's int32 lanes could not
    hold without being emptied every 256 groups (hand-computed results)."""
    from bitlm.formats import q6

    h = 40_000
    q = np.full((2, h), 31, dtype=np.int8)
    q[1] = -31
    packed = torch.from_numpy(q6.pack(q))
    y = kernels.q6_gemv(torch.full((1, h), -128, dtype=torch.int8), packed, h, path=path)
    assert y.tolist() == [[-128 * 31 * h, 128 * 31 * h]]


@pytest.mark.parametrize("m,v,h", [(1, 1, 1), (1, 5, 64), (1, 17, 100), (2, 33, 2560), (3, 9, 129), (1, 300, 640),
                                   (1, 1001, 300)])  # the last in several parts (2 threads), each in quarters
def test_q6_gemv_exact(path, threads, m, v, h):
    from bitlm.formats import q6

    rng = np.random.default_rng(m * 1000 + v + h)
    q = rng.integers(-31, 32, size=(v, h), dtype=np.int8)
    x = torch.from_numpy(rng.integers(-128, 128, size=(m, h), dtype=np.int8))
    packed = torch.from_numpy(q6.pack(q))
    y = kernels.q6_gemv(x, packed, h, path=path)
    assert torch.equal(y.long(), x.long() @ torch.from_numpy(q).long().t())
    ext = torch.full((1, h), -128, dtype=torch.int8)
    assert torch.equal(kernels.q6_gemv(ext, packed, h, path=path).long(), ext.long() @ torch.from_numpy(q).long().t())
