"""The native runtime (kernels/bitnet.c) against the torch reference model, step for step."""

import contextlib
import mmap
import sys

import numpy as np
import pytest
import torch

import bitlm
from bitlm.errors import BitlmError
from helpers import make_tiny_model_dir, resident_pages, vm_flags

native = pytest.importorskip("bitlm.engine.native")
if not __import__("bitlm.kernels", fromlist=["available"]).available():
    pytest.skip("native kernels not built", allow_module_level=True)

SHAPES = {
    "relu2-gqa": dict(),
    "silu-mha-untied": dict(hidden_act="silu", num_key_value_heads=4, tie_word_embeddings=False),
    "ragged": dict(hidden_size=36, intermediate_size=58, num_attention_heads=6, num_key_value_heads=2),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request, tmp_path_factory):
    return bitlm.load(make_tiny_model_dir(tmp_path_factory.mktemp(request.param), None, **SHAPES[request.param]),
                      tokenizer=False)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def assert_equal_but_rare_flips(out, ref, tol=1e-5):
    """Equal to float rounding at (nearly) every position. A last-bit difference can move a value
    across an int8 rounding boundary and change that position by up to a few percent: allowed at
    one position, or one in ten, at most."""
    err = np.abs(out - ref).max(-1) / np.abs(ref).max()
    assert (err >= tol).sum() <= max(1, len(err) // 10) and err.max() < 0.05, err


def assert_close_over_a_long_sequence(out, ref, tol=1e-5):
    """As above, but a flip in an early position's key or value moves every later position a little
    (they all attend to it): the median position equal to float rounding, none off by more than a flip."""
    err = np.abs(out - ref).max(-1) / np.abs(ref).max()
    assert np.median(err) < tol and err.max() < 0.05, err


@pytest.mark.parametrize("n", [23, 150])  # 150: prefill and decode rows of a 256-key attention chunk
def test_prefill_and_decode_equal_the_reference(model, n):
    nm = native.NativeModel.from_model(model, head="f32", max_len=160, kv="f32")
    ids = torch.randint(0, model.config.vocab_size, (1, n))
    with torch.no_grad():
        ref = model(ids)[0].numpy()
    def check(out, want):
        if n < 64:
            assert rel(out, want) < 1e-5
        else:
            assert_close_over_a_long_sequence(out, want)

    check(nm.forward(ids[0].numpy(), n_out=n), ref)  # one prefill of every position
    nm.reset()
    first = 9 if n < 64 else 70  # prefill, then decode one at a time
    nm.forward(ids[0, :first].numpy(), n_out=0)
    steps = np.stack([nm.forward(ids[0, i:i + 1].numpy())[0] for i in range(first, n)])
    check(steps, ref[first:])
    assert nm.pos == n


def q8_0_values(x):
    """(..., head_dim) float32 -> its q8_0 values (formats/q8_0.py's numpy reference)."""
    from bitlm.formats import q8_0
    return torch.from_numpy(q8_0.dequantize(q8_0.quantize(x.numpy()), x.shape[-1]))


def q8_0_cache(config, max_len):
    """The torch model's KVCache with its keys and values stored as q8_0 and read back: with q8_0_queries,
    the reference for kv="q8_0"."""
    from bitlm.model import KVCache

    class Q8Cache(KVCache):
        def update(self, layer, k, v):
            return super().update(layer, q8_0_values(k), q8_0_values(v))

    return Q8Cache(config, max_len=max_len)


@contextlib.contextmanager
def q8_0_queries():
    """The torch model's attention with its queries rounded to q8_0 as well, as the native runtime's integer
    scores over q8_0 keys take them (llama.cpp's way): the scores are then float dots of the same values."""
    import torch.nn.functional as F
    sdpa = F.scaled_dot_product_attention

    def rounded(q, k, v, **kw):
        return sdpa(q8_0_values(q.contiguous()), k, v, **kw)

    F.scaled_dot_product_attention = rounded
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def test_q8_0_kv_store_bytes_equal_the_numpy_reference(model):
    """The C store quantizes each key and value row as formats/q8_0.quantize does, byte for byte: block 0's
    keys and values (the same floats whatever the cache type, computed before any attention) of a
    kv="f32" model, quantized in numpy, against a kv="q8_0" model's cache (head_dim 6 and 16: a padded
    block)."""
    from bitlm.formats import q8_0
    from bitlm import kernels
    ids = torch.randint(0, model.config.vocab_size, (40,)).numpy()
    arrays = native.arrays_from_model(model, "f32")
    f32 = native.NativeModel(model.config, arrays, max_len=64, kv="f32", path="scalar")
    f32.forward(ids, n_out=0)
    hd = model.config.head_dim
    for path in kernels.info()["paths"]:  # the scalar store, and the AVX-512 one in registers
        q8 = native.NativeModel(model.config, arrays, max_len=64, kv="q8_0", path=path)
        q8.forward(ids[:30], n_out=0)
        for i in range(30, 40):
            q8.forward(ids[i:i + 1])
        (k8, v8), (k32, v32) = q8.kv_rows(0), f32.kv_rows(0)
        assert k8.shape == (model.config.num_key_value_heads, q8.n.KV_BLOCK, q8_0.row_bytes(hd))
        assert k8.dtype == np.uint8
        want = q8_0.quantize(v32[:, :40])
        assert np.array_equal(v8[:, :40], want), path
        assert not v8[:, 40:].any()
        # keys in tiles of 16 (q8_0.tile_keys): positions 40 .. 47 are the last tile's empty lanes
        keys = np.zeros((want.shape[0], 48, want.shape[2]), np.uint8)
        keys[:, :40] = q8_0.quantize(k32[:, :40])
        assert np.array_equal(k8[:, :48], q8_0.tile_keys(keys)), path
        assert np.array_equal(q8_0.untile_keys(k8[:, :48])[:, :40], keys[:, :40])
        assert not k8[:, 48:].any()


@pytest.mark.parametrize("n", [40, 150])
def test_q8_0_kv_cache_equals_a_reference_that_quantizes_its_cache(model, n):
    """The torch model with its cached keys and values stored as q8_0 (the numpy reference) and read
    back: the same logits up to float rounding at most positions, for a prefill and decode steps after it.
    A last-bit difference can flip an int8 activation (a position off by ~1e-2), or a key's q8_0 code
    (every later position off a little): 6 positions in 400 over 10 seeds at this shape, against 1 with
    f16, so the bar is the median position and no position beyond a flip."""
    nm = native.NativeModel.from_model(model, head="f32", max_len=160, kv="q8_0")
    ids = torch.randint(0, model.config.vocab_size, (1, n))
    cache = q8_0_cache(model.config, 160)
    first = n // 2
    with torch.no_grad(), q8_0_queries():
        ref = np.concatenate([model(ids[:, :first], cache)[0].numpy()] +
                             [model(ids[:, i:i + 1], cache)[0].numpy() for i in range(first, n)])
    got = np.concatenate([nm.forward(ids[0, :first].numpy(), n_out=first)] +
                         [nm.forward(ids[0, i:i + 1].numpy()) for i in range(first, n)])
    assert_close_over_a_long_sequence(got, ref)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """2B4T's attention geometry in small: 4 q heads on one kv head of head_dim 64 (the AVX-512 loops'
    32-value blocks and 64-column tiles), 400 positions (past a 256-key attention chunk)."""
    return bitlm.load(make_tiny_model_dir(tmp_path_factory.mktemp("wide"), None, hidden_size=256,
                                          intermediate_size=344, num_attention_heads=4, num_key_value_heads=1,
                                          max_position_embeddings=400), tokenizer=False)


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_every_kernel_path_and_kv_type_past_an_attention_chunk(wide, kv):
    """300 positions (a prefill of 260, across the 256-key chunk, then decode steps) on every kernel path
    against the torch model whose cache holds the same f16 or q8_0 values: float rounding apart, and
    every path against the scalar reference likewise (the paths sum in different orders)."""
    from bitlm import kernels
    ids = torch.randint(0, wide.config.vocab_size, (1, 300))
    cache = q8_0_cache(wide.config, 300)
    if kv == "f16":
        from bitlm.model import KVCache

        class HalfCache(KVCache):
            def update(self, layer, k, v):
                return super().update(layer, k.half().float(), v.half().float())
        cache = HalfCache(wide.config, max_len=300)
    with torch.no_grad(), (q8_0_queries() if kv == "q8_0" else contextlib.nullcontext()):
        ref = np.concatenate([wide(ids[:, :260], cache)[0, -20:].numpy()] +
                             [wide(ids[:, i:i + 1], cache)[0].numpy() for i in range(260, 300)])
    arrays = native.arrays_from_model(wide, "f32")
    out = {}
    for path in kernels.info()["paths"]:
        nm = native.NativeModel(wide.config, arrays, max_len=300, kv=kv, path=path)
        out[path] = np.concatenate([nm.forward(ids[0, :260].numpy(), n_out=20)] +
                                   [nm.forward(ids[0, i:i + 1].numpy()) for i in range(260, 300)])
        assert_close_over_a_long_sequence(out[path], ref)
        assert_close_over_a_long_sequence(out[path], out["scalar"])


def test_rope_tables_filled_as_positions_are_reached(model):
    nm = native.NativeModel.from_model(model, head="f32", max_len=64, kv="f32")
    nm.rope_chunk = 5  # a fill per few positions, in the middle of prefills and decode steps
    ids = torch.randint(0, model.config.vocab_size, (1, 23))
    with torch.no_grad():
        ref = model(ids)[0].numpy()
    got = [nm.forward(ids[0, :12].numpy(), n_out=12)] + [nm.forward(ids[0, i:i + 1].numpy()) for i in range(12, 23)]
    assert rel(np.concatenate(got), ref) < 1e-5
    assert nm._rope_filled == 25 and not nm._rope[0][25:].any()  # the rest of the mapping untouched


def resident_bytes(a: np.ndarray) -> int:
    """Bytes of array a's memory that are resident (a starts a mapping: page-aligned)."""
    return len(resident_pages(a.ctypes.data, a.nbytes)) * mmap.PAGESIZE


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"),
                    reason="MADV_HUGEPAGE, mincore and /proc/self/smaps are Linux's")
def test_kv_cache_is_used_in_position_order_on_huge_pages(tmp_path):
    """The own cache holds positions in blocks of KV_BLOCK, all layers' rows of a block together, on a
    mapping that asks for 2 MB pages: a first token makes its block resident (and at most the rest of its
    huge page), not the cache (laid out by head, every head's first row would take a huge page)."""
    tiny = bitlm.load(make_tiny_model_dir(tmp_path, None, max_position_embeddings=1 << 16), tokenizer=False)
    nm = native.NativeModel.from_model(tiny, head="f32", max_len=1 << 16, kv="f32")
    block, huge = nm.kv_cache[0].nbytes, 2 << 20
    assert nm.kv_cache.nbytes > 4 * (block + huge)  # so that a block and the cache tell apart
    assert resident_bytes(nm.kv_cache) == 0
    nm.forward(np.array([3, 4, 5]))
    assert "hg" in vm_flags(nm.kv_cache.ctypes.data)
    assert 0 < resident_bytes(nm.kv_cache) <= block + huge
    k, v = nm.kv_rows(1)
    assert k[:, :3].any() and not k[:, 3:].any() and v[:, :3].any() and not v[:, 3:].any()


def test_fp16_kv_cache_equals_a_reference_that_rounds_its_cache(model):
    """The torch model with its cached keys and values rounded to float16 is the reference."""
    from bitlm.model import KVCache

    class HalfCache(KVCache):
        def update(self, layer, k, v):
            return super().update(layer, k.half().float(), v.half().float())

    nm = native.NativeModel.from_model(model, head="f32", max_len=64, kv="f16")
    assert nm.kv_cache.dtype == np.float16
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    cache = HalfCache(model.config, max_len=64)
    with torch.no_grad():
        ref_prefill = model(ids[:, :8], cache)[0].numpy()
        ref_steps = np.stack([model(ids[:, i:i + 1], cache)[0, -1].numpy() for i in range(8, 20)])
    assert_equal_but_rare_flips(nm.forward(ids[0, :8].numpy(), n_out=8), ref_prefill)
    steps = np.stack([nm.forward(ids[0, i:i + 1].numpy())[0] for i in range(8, 20)])
    assert_equal_but_rare_flips(steps, ref_steps)

    # a prefill of 100 positions, then decode steps to 150. A key or value that
    # rounds to the other float16 neighbour here than in torch (rare) moves every later position a
    # little, so the bar is: most positions equal to float rounding, none off by more than an int8 flip
    nm = native.NativeModel.from_model(model, head="f32", max_len=160, kv="f16")
    ids = torch.randint(0, model.config.vocab_size, (1, 150))
    cache = HalfCache(model.config, max_len=160)
    with torch.no_grad():
        ref_prefill = model(ids[:, :100], cache)[0].numpy()
        ref_steps = np.stack([model(ids[:, i:i + 1], cache)[0, -1].numpy() for i in range(100, 150)])
    steps = np.concatenate([nm.forward(ids[0, :100].numpy(), n_out=100)] +
                           [nm.forward(ids[0, i:i + 1].numpy()) for i in range(100, 150)])
    assert_close_over_a_long_sequence(steps, np.concatenate([ref_prefill, ref_steps]))


def test_hidden_states_equal_the_reference(model):
    nm = native.NativeModel.from_model(model, head="f32", max_len=32, kv="f32")
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        ref = model.hidden_states(ids)[0].numpy()
    assert rel(nm.hidden(ids[0].numpy()), ref) < 1e-5


@pytest.mark.parametrize("head,tol", [("bf16", 1e-2), ("q8", 3e-2), ("q6", 1e-1)])
def test_quantized_heads_stay_close(model, head, tol):
    nm = native.NativeModel.from_model(model, head=head, max_len=32, kv="f32")
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        ref = model(ids)[0].numpy()
    out = nm.forward(ids[0].numpy(), n_out=12)
    assert rel(out, ref) < tol
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_q6_head_equals_its_dequantized_rows(model):
    """The 6-bit head against the float head holding exactly the rows it stores (q * scale)."""
    from bitlm.formats import q6
    a = native.arrays_from_model(model, "f32")
    q, scale = q6.quantize(a["head"])
    a6 = {k: v for k, v in a.items() if k != "head"}
    a6.update(native.head_arrays(a["head"], "q6"))
    a["head"] = (q.astype(np.float32) * scale[:, None]).astype(np.float32)
    ids = np.arange(9) * 5 % model.config.vocab_size
    want = native.NativeModel(model.config, a, max_len=16, kv="f32").forward(ids, n_out=9)
    got = native.NativeModel(model.config, a6, max_len=16, kv="f32").forward(ids, n_out=9)
    # the only difference left is the int8 rounding of the final hidden state before the head
    assert rel(got, want) < 2e-2 and (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def test_q8_head_rows_hand_case():
    e = np.array([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-3.0, 3.0, 1.5]], dtype=np.float32)
    q, s, rowsum = native.quantize_head_rows(e)
    assert q.tolist() == [[127, -64, 32], [0, 0, 0], [-127, 127, 64]]  # 63.5 -> 64, 31.75 -> 32
    assert np.allclose(s, [1 / 127, 1.0, 3 / 127]) and rowsum.tolist() == [95, 0, 64]


def test_context_overflow_and_bad_token_are_clear_errors(model):
    nm = native.NativeModel.from_model(model, head="f32", max_len=8)
    with pytest.raises(BitlmError, match="exceeds the context length 8"):
        nm.forward(np.arange(9))
    with pytest.raises(BitlmError, match="token id out of range"):
        nm.forward([model.config.vocab_size])
    assert nm.pos == 0  # nothing was consumed


def test_micro_batches_give_the_same_logits(model):
    """A prompt run in micro-batches (bounded scratch memory) equals one batch, for any n_out."""
    ids = np.arange(29) * 11 % model.config.vocab_size
    whole = native.NativeModel.from_model(model, head="f32", max_len=64, kv="f32")
    want = whole.forward(ids, n_out=29)
    for ubatch, n_out in [(7, 29), (7, 10), (7, 1), (5, 0), (29, 3)]:
        nm = native.NativeModel.from_model(model, head="f32", max_len=64, kv="f32")
        nm.ubatch = ubatch
        got = nm.forward(ids, n_out=n_out)
        assert got.shape == (n_out, model.config.vocab_size) and nm.pos == 29
        if n_out:
            assert_equal_but_rare_flips(got, want[29 - n_out:])


def head_logits_from_hidden(h, arrays, head):
    """The int8 (q8) or 6-bit (q6) head's logits from final-norm hidden states h float32 [T, H], in numpy
    and torch: the int8 activations by quant.quantize_activations, the sums exactly in int64, then the
    C head's float32 rescale, acc * (row scale * (1 / s))."""
    from bitlm import quant
    from bitlm.formats import q6
    xq, s = quant.quantize_activations(torch.from_numpy(h))
    rows = arrays["head.q8"] if head == "q8" else q6.unpack(arrays["head.q6"], h.shape[1])
    acc = xq.numpy().astype(np.int64) @ rows.astype(np.int64).T
    inv = np.float32(1) / s.numpy()
    return acc.astype(np.float32) * (arrays["head.scale"][None, :] * inv)


@pytest.mark.parametrize("head", ["q8", "q6", "f32"])
def test_every_kernel_path_gives_the_scalar_paths_logits(model, head):
    """Each SIMD path (ternary products, int8/6-bit head, float loops) against the portable scalar path.
    Exact on every path: the integer sums, here those of the int8 and 6-bit head kernels (against their
    own hidden states; the ternary products in tests/kernels/test_gemm.py and tests/kernels/c/exact.c).
    May differ: float reduction order (norms, attention, the f32 head's dots), and a last-bit
    difference can move one activation across an int8 rounding boundary: the rare-flip allowance."""
    from bitlm import kernels
    ids = np.arange(11) * 7 % model.config.vocab_size
    arrays = native.arrays_from_model(model, head)
    want = native.NativeModel(model.config, arrays, max_len=16, kv="f32", path="scalar").forward(ids, n_out=11)
    for path in kernels.info()["paths"]:
        nm = native.NativeModel(model.config, arrays, max_len=16, kv="f32", path=path)
        got = nm.forward(ids, n_out=11)
        assert_equal_but_rare_flips(got, want)
        if head != "f32":
            nm.reset()
            assert np.array_equal(got, head_logits_from_hidden(nm.hidden(ids), arrays, head)), path


@pytest.mark.parametrize("head", ["q8", "f32"])
def test_t5_weights_give_the_i2v_logits_bit_for_bit(model, head):
    """The projections packed at 1.6 bits (formats/t5.py) instead of I2V: the same logits, bit for bit, on
    every kernel path, for a prompt of 20 tokens (the GEMM kernels; AMX for I2V from 16 rows) and the
    decode steps after it (the GEMV kernels): the integer sums are exact either way, the float ops equal."""
    from bitlm import kernels
    from bitlm.formats import i2v, t5
    ids = np.arange(20) * 7 % model.config.vocab_size
    a_i2v, a_t5 = native.arrays_from_model(model, head), native.arrays_from_model(model, head, "t5")
    shapes = model.config.projection_shapes()
    for name, (n, k) in shapes.items():  # the same codes, in the two layouts
        assert a_t5[f"0.{name}"].shape == t5.packed_shape(n, k)
        np.testing.assert_array_equal(t5.unpack(a_t5[f"0.{name}"], n, k), i2v.unpack(a_i2v[f"0.{name}"], n, k))
    for path in kernels.info()["paths"]:
        out = {}
        for w, arrays in (("i2v", a_i2v), ("t5", a_t5)):
            nm = native.NativeModel(model.config, arrays, max_len=32, kv="f16", path=path, weights=w)
            out[w] = [nm.forward(ids, n_out=20)] + [nm.forward([t], n_out=1) for t in (3, 5, 8, 13)]
        for a, b in zip(out["i2v"], out["t5"]):
            assert np.array_equal(a, b), path


def test_weight_format_mismatch_is_a_clear_error(model):
    from bitlm.formats import i2v, t5
    arrays = native.arrays_from_model(model, "q8", "t5")
    # the packed shapes tell the formats apart where ceil(K / 16) != ceil(K / 20): every test shape has one
    assert any(i2v.packed_shape(*s) != t5.packed_shape(*s) for s in model.config.projection_shapes().values())
    assert arrays.weights == "t5"  # the dict knows its format: a second model over it needs no argument
    ids = np.arange(9) % model.config.vocab_size
    first = native.NativeModel(model.config, arrays, max_len=16)
    assert first.weights == "t5"
    want = native.NativeModel(model.config, native.arrays_from_model(model, "q8"), max_len=16).forward(ids, n_out=9)
    assert np.array_equal(native.NativeModel(model.config, first.arrays, max_len=16).forward(ids, n_out=9), want)
    with pytest.raises(BitlmError, match="weights 'i2v' asked for arrays packed as 't5'"):
        native.NativeModel(model.config, arrays, max_len=16, weights="i2v")
    with pytest.raises(BitlmError, match="expected contiguous uint8"):  # a plain dict: the shapes tell
        native.NativeModel(model.config, dict(arrays), max_len=16, weights="i2v")
    with pytest.raises(BitlmError, match="weight format 'i3v' is not one of i2v, t5"):
        native.NativeModel(model.config, dict(arrays), max_len=16, weights="i3v")


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_head_arrays_made_in_chunks_equal_the_whole(dtype):
    """The converter makes the head rows a chunk at a time; the arrays equal those of the whole matrix
    quantized and packed in one go (q6 and q8 by their own functions, f32 and bf16 by conversion)."""
    from bitlm.engine.native import HEADS, bf16_to_f32, f32_to_bf16, head_arrays, quantize_head_rows
    from bitlm.formats import q6

    rows = np.random.default_rng(3).standard_normal((37, 100)).astype(np.float32)
    if dtype == "bf16":
        rows = f32_to_bf16(rows)
    full = rows if dtype == "f32" else bf16_to_f32(rows)
    q, scale = q6.quantize(full)
    q8, s8, rs8 = quantize_head_rows(full)
    whole = {"q6": {"head.q6": q6.pack(q), "head.scale": scale},
             "q8": {"head.q8": q8, "head.scale": s8, "head.rowsum": rs8},
             "f32": {"head": full},
             "bf16": {"head": rows if dtype == "bf16" else f32_to_bf16(rows)}}
    for fmt in HEADS:
        got = head_arrays(rows, fmt, chunk=5)  # 8 chunks, the last of 2 rows
        assert got.keys() == whole[fmt].keys()
        for k, v in whole[fmt].items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{fmt} {k}")
