"""The GGUF reader refuses malformed and truncated files with one line, and its block readers agree
with gguf-py's dequantizers (the reference)."""

import struct
import subprocess
import sys

import numpy as np
import pytest

import bitlm
from bitlm.errors import BitlmError
from bitlm.formats import ggml_blocks
from bitlm.io import gguf_read
from bitlm.io.gguf import export_gguf
from helpers import make_tiny_model_dir

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("g")
    m = bitlm.load(make_tiny_model_dir(d / "m", tiny_tokenizer_dir, hidden_size=256, intermediate_size=512,
                                       num_attention_heads=4, num_key_value_heads=2))
    return export_gguf(m, d / "m.gguf", "i2_s", "f16")


def read_all(path):
    return gguf_read.read(path)


def one_line_error(fn, *args, match=None):
    with pytest.raises(BitlmError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("keep", [0, 3, 10, 23, 200, 3000, 20000, -1])
def test_truncated(good, tmp_path, keep):
    data = good.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    msg = one_line_error(read_all, bad)
    assert str(bad) in msg


def _header(n_tensors, kvs, infos=b"", version=3):
    out = b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kvs))
    for key, vtype, payload in kvs:
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload
    return out + infos


def _str(s):
    return struct.pack("<Q", len(s)) + s.encode()


@pytest.mark.parametrize("data, match", [
    (b"GGML" + b"\0" * 40, "not a GGUF file"),
    (_header(0, [], version=1), "version 1"),
    (_header(0, [("k", 99, b"")]), "unknown value type 99"),
    (_header(0, [("k", 8, struct.pack("<Q", 2**40))]), "runs past the end"),
    (_header(0, [("k", 9, struct.pack("<IQ", 4, 2**40))]), "cannot fit"),
    (_header(0, [("general.alignment", 4, struct.pack("<I", 3))]), "power of two"),
    (_header(1, [], _str("t") + struct.pack("<I", 7)), "7 dimensions"),
    (_header(1, [], _str("t") + struct.pack("<IQIQ", 1, 0, 0, 0)), "dimensions"),
    (_header(1, [], _str("t") + struct.pack("<IQIQ", 1, 4, 0, 3)), "not aligned"),
    (_header(1, [], _str("t") + struct.pack("<IQIQ", 1, 4, 0, 0)), "runs past the end"),
    (_header(1, [], _str("t") + struct.pack("<IQIQ", 1, 100, 36, 0)), "multiple of 128"),
    (_header(2, [], (_str("t") + struct.pack("<IQIQ", 1, 1, 0, 0)) * 2), "appears twice"),
    (_header(0, [("general.architecture", 8, _str("llama"))]), "architecture 'llama'"),
])
def test_malformed(tmp_path, data, match):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data + b"\0" * 64 if "past the end" not in match else data)
    one_line_error(read_all, bad, match=match)


def test_wrong_tensor_type_and_mixed_block_scales(good, tmp_path):
    g = gguf_read.GGUFFile(good)
    cfg = gguf_read.config_from_gguf(g)
    t = g.tensors["blk.0.attn_q.weight"]
    g.tensors["blk.0.attn_q.weight"] = gguf_read.TensorInfo(t.name, gguf_read.F32, t.shape, t.offset, t.nbytes)
    one_line_error(gguf_read.arrays_from_gguf, g, cfg, match="blk.0.attn_q.weight is F32")
    # a TQ2_0 tensor whose blocks carry two different scales cannot be held with one scale
    vals = np.ones((2, 256), np.float32)
    vals[1] *= 0.5
    q = gguf.quants.quantize(vals, gguf.GGMLQuantizationType.TQ2_0)
    path = tmp_path / "two.gguf"
    w = gguf.GGUFWriter(str(path), "bitnet")
    w.add_tensor("w.weight", q, raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    one_line_error(gguf_read.GGUFFile(path).ternary, "w.weight", (2, 256), match="2 different block scales")


def test_cli_one_line_exit_2(good, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good.read_bytes()[:5000])
    for args in (["generate", "-m", str(bad), "-p", "x", "-n", "1"], ["info", str(bad)],
                 ["bench", "-m", str(bad), "-p", "4", "-n", "1", "-r", "1"]):
        r = subprocess.run([sys.executable, "-m", "bitlm", *args], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("bitlm: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr


def test_block_readers_agree_with_gguf():
    rng = np.random.default_rng(0)
    Q = gguf.GGMLQuantizationType
    w = rng.integers(-1, 2, (3, 512)).astype(np.float32) * np.float32(0.375)
    for t, fn in ((Q.TQ1_0, ggml_blocks.tq1_0_trits), (Q.TQ2_0, ggml_blocks.tq2_0_trits)):
        data = gguf.quants.quantize(w, t)
        trits, d = fn(data)
        assert np.array_equal((trits * d[:, None]).reshape(w.shape), gguf.quants.dequantize(data, t))
    x = rng.standard_normal((4, 64)).astype(np.float32)
    data = gguf.quants.quantize(x, Q.Q8_0)
    assert np.array_equal(ggml_blocks.q8_0_values(data).reshape(x.shape), gguf.quants.dequantize(data, Q.Q8_0))


def test_llama_bpe_ignores_merges_for_whole_tokens():
    """llama-bpe (Llama 3) emits a piece that is itself a token whole, as HF's ignore_merges and
    llama.cpp do, even when the merges cannot build it; gpt-2 merges up from bytes."""
    from types import SimpleNamespace
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "c", "ab", "abc", "<s>"],
            "tokenizer.ggml.token_type": [1, 1, 1, 1, 1, 3], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.bos_token_id": 5, "tokenizer.ggml.add_bos_token": False}
    cfg = bitlm.preset("tiny", vocab_size=6)
    g = SimpleNamespace(meta={**meta, "tokenizer.ggml.pre": "llama-bpe"}, path="x.gguf")
    assert gguf_read.tokenizer_from_gguf(g, cfg).encode("abc") == [4]
    g = SimpleNamespace(meta={**meta, "tokenizer.ggml.pre": "gpt-2"}, path="x.gguf")
    assert gguf_read.tokenizer_from_gguf(g, cfg).encode("abc") == [3, 2]
    g = SimpleNamespace(meta={**meta, "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.add_bos_token": True}, path="x.gguf")
    assert gguf_read.tokenizer_from_gguf(g, cfg).encode("abc") == [5, 3, 2]
    g = SimpleNamespace(meta={**meta, "tokenizer.ggml.tokens": "abc"}, path="x.gguf")
    one_line_error(gguf_read.tokenizer_from_gguf, g, cfg, match="not lists of strings")
