"""bitlm's native file: torch-free safetensors I/O, conversion, memory-mapped loading, the cache key."""


import numpy as np
import pytest
import torch

import bitlm
from bitlm.errors import BitlmError
from bitlm.io import st

pytestmark = pytest.mark.skipif(not __import__("bitlm.kernels", fromlist=["x"]).available(),
                                reason="native kernels not built")


def test_st_round_trip_with_bf16_and_lazy(tmp_path):
    from safetensors.torch import load_file
    x = torch.randn(3, 5)
    bits = x.bfloat16().view(torch.int16).numpy().view(np.uint16)
    st.write(tmp_path / "a.safetensors", {
        "f": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": ("BF16", bits),
        "lazy": st.Lazy((4,), np.int32, lambda: np.array([1, -2, 3, -4], np.int32)),
    }, {"k": "v"})
    arrays, meta = st.open_arrays(tmp_path / "a.safetensors")
    assert meta == {"k": "v"} and arrays["lazy"].tolist() == [1, -2, 3, -4]
    assert all(a.ctypes.data % 64 == 0 for a in arrays.values())  # aligned for SIMD loads
    ref = load_file(tmp_path / "a.safetensors")  # the reference reader agrees, bf16 included
    assert torch.equal(ref["b"], x.bfloat16()) and torch.equal(ref["f"], torch.arange(6.0).reshape(2, 3))


def test_st_truncated_file_is_a_clear_error(tmp_path):
    st.write(tmp_path / "a.safetensors", {"f": np.zeros(1000, np.float32)}, {})
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "a.safetensors").write_bytes(data[:-100])
    with pytest.raises(BitlmError, match="truncated"):
        st.open_arrays(tmp_path / "a.safetensors")


@pytest.mark.parametrize("header", [
    {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},   # 3 floats in 8 bytes
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},   # offsets reversed
    {"a": {"dtype": "F32", "shape": [2]}},                            # no offsets
    [1, 2, 3],                                                        # not an object
])
def test_st_malformed_header_is_a_clear_error(tmp_path, header):
    import json
    import struct
    raw = json.dumps(header).encode()
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(BitlmError, match="a.safetensors: .*(malformed|not a safetensors file)"):
        st.open_arrays(tmp_path / "a.safetensors")


def test_convert_then_map_equals_the_torch_model(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BITLM_CACHE", str(tmp_path / "cache"))
    nm = bitlm.load_native(tiny_model_dir, head="f32", kv="f32", mmap=True)
    assert isinstance(nm.arrays["0.self_attn.q_proj"], np.memmap)  # mapped, not read
    ref = bitlm.load(tiny_model_dir)
    ids = torch.randint(0, ref.config.vocab_size, (1, 15))
    with torch.no_grad():
        want = ref(ids)[0].numpy()
    got = nm.forward(ids[0].numpy(), n_out=15)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    assert nm.tokenizer.encode("To be") == ref.tokenizer.encode("To be")
    files = list((tmp_path / "cache" / "native").glob("*.safetensors"))  # (and a hidden lock file)
    assert len(files) == 1 and nm.source["converted"]
    again = bitlm.load_native(tiny_model_dir, head="f32")  # cached: no second file
    assert list((tmp_path / "cache" / "native").glob("*.safetensors")) == files and not again.source["converted"]


@pytest.mark.parametrize("variant", ["f32", "bf16", "untied", "bitlinear", "f32-file-bf16-model"])
def test_packed_checkpoint_converts_without_torch_to_the_same_file(tmp_path, variant):
    """convert_packed (numpy, from the mapped checkpoint) against convert_via_torch (bitlm's torch model):
    the same bytes, for every head format; bf16 checkpoints round the norms and scales as the model does,
    and the older "bitlinear" class stores reciprocal scales."""
    import filecmp
    import json

    from helpers import make_tiny_model_dir

    from bitlm.io.native import convert_packed, convert_via_torch
    from safetensors.torch import load_file, save_file
    kw = {"bf16": {"torch_dtype": "bfloat16"}, "untied": {"tie_word_embeddings": False}}.get(variant, {})
    d = make_tiny_model_dir(tmp_path / "m", seed=7, **kw)
    cfg = json.loads((d / "config.json").read_text())
    if variant == "bitlinear":
        cfg["quantization_config"]["linear_class"] = "bitlinear"
    if variant == "f32-file-bf16-model":  # float32 tensors, random norms, loaded as bf16: all rounded
        cfg["torch_dtype"] = "bfloat16"
        t = load_file(d / "model.safetensors")
        g = torch.Generator().manual_seed(1)
        for k in t:
            if k.endswith("norm.weight"):
                t[k] = 1 + 0.3 * torch.randn(t[k].shape, generator=g)
        save_file(t, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    for head in ("q8", "q6", "f32", "bf16"):
        a, b = tmp_path / f"{head}-numpy.safetensors", tmp_path / f"{head}-torch.safetensors"
        convert_packed(d, a, head)
        convert_via_torch(d, b, head)
        assert filecmp.cmp(a, b, shallow=False), (variant, head)


def test_file_span_finds_the_bytes_of_a_mapped_tensor(tmp_path):
    import os
    e = np.arange(40, dtype=np.uint16).reshape(8, 5)
    st.write(tmp_path / "a.safetensors", {"first": np.ones(3, np.float32), "embed": ("BF16", e)}, {})
    arrays, _ = st.open_arrays(tmp_path / "a.safetensors")
    name, offset = st.file_span(arrays["embed"])
    with open(name, "rb") as f:
        assert np.frombuffer(os.pread(f.fileno(), e.nbytes, offset), np.uint16).tolist() == e.ravel().tolist()
    assert st.file_span(np.array(arrays["embed"])) is None  # a copy is not file-backed


def test_embedding_rows_read_from_the_file_equal_the_mapped_rows(tiny_model_dir, tmp_path, monkeypatch):
    """A mapped model reads embedding rows with pread (they stay out of the resident set); the same
    arrays copied into memory read them from the pointer. Same numbers, to the bit."""
    from bitlm.engine.native import NativeModel
    monkeypatch.setenv("BITLM_CACHE", str(tmp_path / "cache"))
    nm = bitlm.load_native(tiny_model_dir, head="q8")
    assert nm._embed_file is not None
    mem = NativeModel(nm.config, {k: np.array(v) for k, v in nm.arrays.items()})
    assert mem._embed_file is None
    ids = np.random.default_rng(0).integers(0, nm.config.vocab_size, 21)
    assert np.array_equal(nm.forward(ids, n_out=21), mem.forward(ids, n_out=21))
    assert np.array_equal(nm.forward(ids[:1]), mem.forward(ids[:1]))


def test_cache_key_follows_the_checkpoint(tiny_model_dir, tmp_path):
    """One cache file per checkpoint directory and head; what the checkpoint held is recorded inside
    (tests/io/test_native_cache.py rebuilds a file whose checkpoint changed)."""
    import shutil
    from bitlm.io.native import cache_path, source_identity
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    a, ident = cache_path(d, "q8"), source_identity(d, "q8")
    assert cache_path(d, "f32") != a and cache_path(tmp_path / "m2", "q8") != a
    bitlm.load(d).save_pretrained(d)  # rewritten weights: the same file name, another identity
    assert cache_path(d, "q8") == a and source_identity(d, "q8") != ident


def test_foreign_file_is_refused(tmp_path):
    from bitlm.io.native import open_native
    st.write(tmp_path / "x.safetensors", {"a": np.zeros(2, np.float32)}, {"format": "pt"})
    with pytest.raises(BitlmError, match="not a bitlm native file"):
        open_native(tmp_path / "x.safetensors")


def test_native_generation_equals_the_torch_model(tiny_model_dir, tmp_path, monkeypatch):
    from bitlm.engine.generate import ChatSession, generate_text
    from bitlm.engine.native import NativeLM
    monkeypatch.setenv("BITLM_CACHE", str(tmp_path / "cache"))
    ref = bitlm.load(tiny_model_dir)
    lm = NativeLM(bitlm.load_native(tiny_model_dir, head="f32", kv="f32"))
    for prompt in ("To be", "Shall I compare thee"):
        assert generate_text(lm, prompt, max_new_tokens=25, temperature=0) == \
            generate_text(ref, prompt, max_new_tokens=25, temperature=0)
    a, b = ChatSession(ref, temperature=0, max_new_tokens=8), ChatSession(lm, temperature=0, max_new_tokens=8)
    for turn in ("hello", "and again"):
        assert a.send(turn).text == b.send(turn).text


def test_cache_key_hash_is_sha256():
    """The cache key's hash comes from CPython's own sha256 where built (no OpenSSL mapped): the
    same digests as hashlib's, so existing cache files keep their names."""
    import hashlib
    from bitlm.io.native import _sha256
    h = _sha256(b"bitlm|q8|/models/x")
    h.update(b"|model.safetensors:123:456")
    assert h.hexdigest() == hashlib.sha256(b"bitlm|q8|/models/x|model.safetensors:123:456").hexdigest()


def test_weights_read_into_memory_equal_the_mapped_ones(tiny_model_dir, tmp_path, monkeypatch):
    """--no-mmap: the weights are read into one anonymous (huge-page) mapping; the same logits to the
    bit as the memory-mapped file, and the embedding still read from the file."""
    monkeypatch.setenv("BITLM_CACHE", str(tmp_path / "cache"))
    mapped = bitlm.load_native(tiny_model_dir, head="q6", mmap=True)
    read = bitlm.load_native(tiny_model_dir, head="q6", mmap=False)
    for name, a in mapped.arrays.items():
        b = read.arrays[name]
        assert np.array_equal(a, b), name
        if name != "embed":
            assert not isinstance(b, np.memmap) and b.ctypes.data % 64 == 0, name
    assert read._embed_file is not None
    ids = np.arange(40) * 13 % mapped.config.vocab_size
    assert np.array_equal(mapped.forward(ids, n_out=40), read.forward(ids, n_out=40))


def test_read_to_memory_of_a_truncated_file_is_a_clear_error(tmp_path):
    st.write(tmp_path / "a.safetensors", {"w": np.arange(1 << 15, dtype=np.int32)}, {})
    arrays, _ = st.open_arrays(tmp_path / "a.safetensors")
    with open(tmp_path / "a.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(BitlmError, match="ends early"):
        st.read_to_memory(arrays, ["w"])


def test_load_native_without_its_tokenizer(tiny_model_dir, tmp_path, monkeypatch):
    """bitlm bench runs token ids only: it loads no tokenizer (Llama 3's takes 70 MB)."""
    monkeypatch.setenv("BITLM_CACHE", str(tmp_path / "cache"))
    nm = bitlm.load_native(tiny_model_dir, tokenizer=False)
    assert nm.tokenizer is None and nm.forward(np.arange(5)).shape == (1, nm.config.vocab_size)
    assert bitlm.load_native(tiny_model_dir).tokenizer is not None
