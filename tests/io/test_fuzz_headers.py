"""Fuzzing the binary readers: random and mutated safetensors files (io/st.py), native files
(io/native.open_native) and GGUF files (io/gguf_read.py). The only outcomes allowed are a correct load
or a BitlmError: never another exception, a crash, a hang, or an allocation of a size taken from the
file unchecked. A safetensors load is correct when the reference reader (the safetensors package) reads
the same file to the same bytes; an allocation is unchecked when this process's Python allocations
(tracemalloc: numpy's included) grow by more than a small multiple of the file's size. Bounded: 100-200
examples per property, a few seconds."""

import json
import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as s  # noqa: E402

from bitlm.errors import BitlmError  # noqa: E402
from bitlm.io import native, st  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "I64", "BOOL", "U32", "U64", "C64", "F4",
          "F8_E4M3", "Q4", "", "f32"]
# values a mutated header field may take: the types JSON has, and integers at every edge
JSON_INTS = s.sampled_from([0, 1, -1, 7, 64, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, 2**64 + 8,
                            -2**63, 10**30]) | s.integers(-1000, 100_000)
JSON_LEAF = JSON_INTS | s.floats(allow_nan=True, allow_infinity=True) | s.text(max_size=8) | s.booleans() | \
    s.none() | s.sampled_from(DTYPES)
JSON_ANY = s.recursive(JSON_LEAF, lambda kids: s.lists(kids, max_size=4) | s.dictionaries(s.text(max_size=6), kids,
                                                                                          max_size=3), max_leaves=8)

# files in memory where the system has a tmpfs there: a thousand examples write and map one each
_dir = Path(tempfile.mkdtemp(prefix="bitlm-fuzz-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))


def as_file(data: bytes) -> Path:
    """data in a file: one name reused, a new inode each time (a mapping an earlier example left for
    the garbage collector keeps the old one, never seeing it shrink)."""
    f = _dir / "x.safetensors"
    f.unlink(missing_ok=True)
    f.write_bytes(data)
    return f


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body: bytes) -> bytes:
    raw = json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def read_checked(data: bytes, read) -> object:
    """read(path) of a file holding data: its result, or None for a BitlmError; any other exception
    propagates (and fails the property). Python allocations during the read stay under a bound that
    grows with the file, not with a length or shape the file states."""
    f = as_file(data)
    tracemalloc.start()  # traced only while reading: tracing hypothesis too would triple the time
    try:
        return read(f)
    except BitlmError as e:
        assert "\n" not in str(e) and str(e)
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < (1 << 20) + 16 * len(data), f"{peak} bytes allocated reading {len(data)} bytes"


def same_as_reference(path: Path, arrays: dict, meta: dict) -> None:
    """What open_arrays returned is what the safetensors package reads from the same file."""
    import torch
    from safetensors import safe_open
    with safe_open(str(path), "pt") as ref:
        assert (ref.metadata() or {}) == meta
        names = [k for k in ref.keys() if not k.startswith(st.PAD)]
        assert sorted(names) == sorted(arrays)
        for k in names:
            t = ref.get_tensor(k)
            a = arrays[k]
            assert list(t.shape) == list(a.shape), k
            want = t.contiguous().view(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
            assert np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8), want), k


# ---- safetensors ------------------------------------------------------------------------------------

def valid_file() -> bytes:
    rng = np.random.default_rng(0)
    f = _dir / "valid.safetensors"
    st.write(f, {"f": rng.standard_normal((3, 5)).astype(np.float32), "b": ("BF16", np.arange(6, dtype=np.uint16)),
                 "i": np.arange(-4, 4, dtype=np.int8).reshape(2, 2, 2), "e": np.zeros((0, 4), np.int32),
                 "h": np.ones(7, np.float16)}, {"k": "v", "bitlm": "1"})
    return f.read_bytes()


VALID = valid_file()


def read_st(f: Path) -> dict:
    arrays, meta = st.open_arrays(f)
    same_as_reference(f, arrays, meta)
    return arrays


def load_st(data: bytes) -> None:
    hypothesis.event("loaded" if read_checked(data, read_st) is not None else "refused")  # --hypothesis-show-statistics


@FUZZ
@given(s.binary(max_size=300))
def test_random_bytes(data):
    load_st(data)


@FUZZ
@given(s.integers(0, 2**64 - 1), s.binary(max_size=200))
def test_any_length_prefix(n, rest):
    """A length of 2**63 (or one past the file) is refused before anything of that size is read."""
    load_st(struct.pack("<Q", n) + rest)
    load_st(struct.pack("<Q", n) + VALID[8:])


@FUZZ
@given(s.lists(s.tuples(s.integers(0, len(VALID) - 1), s.integers(1, 255)), min_size=1, max_size=6),
       s.integers(0, len(VALID)))
def test_flipped_and_cut_bytes(flips, cut):
    data = bytearray(VALID)
    for i, x in flips:
        data[i] ^= x
    load_st(bytes(data))
    load_st(VALID[:cut])


TENSORS = [k for k in split(VALID)[0] if k != "__metadata__"]


@FUZZ
@given(s.sampled_from(TENSORS), s.sampled_from(["dtype", "shape", "data_offsets", "extra", "whole"]), JSON_ANY,
       s.lists(JSON_INTS, max_size=4), s.booleans())
def test_mutated_entries(name, field, value, ints, as_ints):
    """One entry's dtype, shape or offsets set to anything: wrong dtypes, out of range, overlapping,
    negative, huge shapes, other JSON types."""
    header, body = split(VALID)
    if field == "whole":
        header[name] = value
    elif field == "extra":
        header["other"] = {"dtype": "U8", "shape": [len(ints)], "data_offsets": ints[:2] or [0, 0]}
    else:
        header[name][field] = ints if as_ints and field != "dtype" else value
    load_st(join(header, body))


@FUZZ
@given(s.dictionaries(s.text(max_size=4), JSON_ANY, max_size=3) | JSON_ANY, s.integers(0, 64))
def test_mutated_metadata_and_data_size(meta, cut_or_grow):
    header, body = split(VALID)
    header["__metadata__"] = meta
    load_st(join(header, body))
    header, body = split(VALID)
    load_st(join(header, body[:-cut_or_grow] if cut_or_grow else body + b"x"))


# ---- the native file --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native_file(tiny_model_dir, tmp_path_factory) -> bytes:
    if not __import__("bitlm.kernels", fromlist=["x"]).available():
        pytest.skip("native kernels not built")
    return native.convert(tiny_model_dir, tmp_path_factory.mktemp("n") / "n.safetensors", "q8").read_bytes()


def load_native_file(data: bytes, max_len) -> None:
    """open_native of the file, and one forward of the model it gives (a wrong shape or pointer that
    got through would crash the process here)."""
    def read(f):
        nm = native.open_native(f, max_len=max_len)
        assert nm.forward(np.array([1, 2]), n_out=2).shape == (2, nm.config.vocab_size)
        return nm
    return read_checked(data, read) is not None


@FUZZ
@given(data=s.data())
def test_mutated_native_files(native_file, data):
    header, body = split(native_file)
    n = struct.unpack("<Q", native_file[:8])[0]
    how = data.draw(s.sampled_from(["flip", "cut", "prefix", "entry", "metadata", "config", "drop"]))
    if how == "flip":  # bytes of the length prefix and the header
        out = bytearray(native_file)
        for i, x in data.draw(s.lists(s.tuples(s.integers(0, 8 + n - 1), s.integers(1, 255)), min_size=1,
                                      max_size=4)):
            out[i] ^= x
        out = bytes(out)
    elif how == "cut":
        out = native_file[:data.draw(s.integers(0, len(native_file)))]
    elif how == "prefix":
        out = struct.pack("<Q", data.draw(s.integers(0, 2**64 - 1))) + native_file[8:]
    elif how == "drop":
        del header[data.draw(s.sampled_from([k for k in header if k != "__metadata__"]))]
        out = join(header, body)
    elif how == "entry":
        name = data.draw(s.sampled_from([k for k in header if k != "__metadata__"]))
        field = data.draw(s.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = data.draw(s.lists(JSON_INTS, max_size=4) | JSON_ANY)
        out = join(header, body)
    elif how == "metadata":
        key = data.draw(s.sampled_from(["bitlm_format", "data_size", "head", "source", "config"]))
        header["__metadata__"][key] = data.draw(s.text(max_size=12) | s.sampled_from(["native-v1", "native-v2",
                                                                                     "0", str(len(body))]))
        out = join(header, body)
    else:  # one field of the config, set to anything
        cfg = json.loads(header["__metadata__"]["config"])
        key = data.draw(s.sampled_from(sorted(cfg)))
        cfg[key] = data.draw(JSON_INTS | JSON_ANY)  # sizes at every edge: tensor shapes, a context of 2**62
        header["__metadata__"]["config"] = json.dumps(cfg, allow_nan=True)
        out = join(header, body)
    loaded = load_native_file(out, data.draw(s.sampled_from([None, 16])))  # None: the config's context
    hypothesis.event(f"{how}: {'loaded' if loaded else 'refused'}")


@pytest.mark.parametrize("positions", [2**44, 2**62, 10**30])  # 2**44: 2**51 bytes, past any address space
def test_a_context_too_long_to_allocate_is_an_error(native_file, positions):
    """A config (in the file, or a checkpoint's) asking for more positions than memory can map: the RoPE
    tables and KV cache it sizes are refused with a one-line error, not an OSError or a wrapped size."""
    header, body = split(native_file)
    cfg = json.loads(header["__metadata__"]["config"])
    cfg["max_position_embeddings"] = positions
    header["__metadata__"]["config"] = json.dumps(cfg)
    with pytest.raises(BitlmError, match=rf"the RoPE tables of {positions} positions cannot be allocated \("
                                         r".*\); pass a smaller context length"):
        native.open_native(as_file(join(header, body)))
    assert read_checked(join(header, body), lambda f: native.open_native(f, max_len=16)) is not None


def test_the_unmutated_files_load(native_file):
    """The fuzzed files start from good ones (or every property above would pass by refusing all)."""
    assert read_checked(VALID, read_st) is not None
    assert read_checked(native_file, lambda f: native.open_native(f)) is not None


def teardown_module():
    for f in _dir.iterdir():
        os.unlink(f)
    os.rmdir(_dir)


# ---- GGUF (io/gguf_read.py) -------------------------------------------------------------------------

_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes


def gguf_int_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every count, length, type, dimension and offset field of a valid GGUF file,
    found by walking its layout (magic, version, counts, key/values, tensor infos) independently of
    the reader under test."""
    fields, pos = [(4, 4), (8, 8), (16, 8)], 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def u(fmt):
        nonlocal pos
        fields.append((pos, struct.calcsize(fmt)))
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = u("<Q")
        pos += n

    def value(t):
        nonlocal pos
        if t == 8:
            string()
        elif t == 9:
            et, n = u("<I"), u("<Q")
            for _ in range(n):
                value(et)
        else:
            pos += _GGUF_SCALAR[t]
    for _ in range(n_kv):
        string()
        value(u("<I"))
    for _ in range(n_tensors):
        string()
        for _ in range(u("<I")):
            u("<Q")
        u("<I")
        u("<Q")
    return fields


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tiny_tokenizer_dir) -> bytes:
    """A small I2_S GGUF of a tiny model (rows of 128, I2_S's block), written by bitlm's exporter."""
    pytest.importorskip("gguf")
    import bitlm
    from bitlm.io.gguf import export_gguf
    from helpers import make_tiny_model_dir
    d = tmp_path_factory.mktemp("gguf")
    m = bitlm.load(make_tiny_model_dir(d / "m", tiny_tokenizer_dir, hidden_size=128, intermediate_size=256,
                                       num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1))
    return export_gguf(m, d / "m.gguf", "i2_s", "f16").read_bytes()


def load_gguf(data: bytes) -> None:
    """gguf_read.read: the config, every array and the tokenizer, or one BitlmError line."""
    from bitlm.io import gguf_read

    def read(f):
        cfg, arrays, _ = gguf_read.read(f)
        assert arrays["embed"].shape == (cfg.vocab_size, cfg.hidden_size)
        return cfg
    hypothesis.event("loaded" if read_checked(data, read) is not None else "refused")


GGUF_FUZZ = settings(FUZZ, max_examples=100)


def test_the_unmutated_gguf_loads(gguf_file):
    from bitlm.io import gguf_read
    assert read_checked(gguf_file, lambda f: gguf_read.read(f)) is not None
    assert len(gguf_int_fields(gguf_file)) > 50  # the walker found the layout


@GGUF_FUZZ
@given(data=s.data())
def test_mutated_gguf_files(gguf_file, data):
    """A count, length, type, dimension or tensor offset set to an edge value (0, 2**32, 2**63, ...), bytes
    flipped anywhere, or the file cut: a correct load or one BitlmError line, never a huge allocation."""
    how = data.draw(s.sampled_from(["field", "flip", "cut"]))
    out = bytearray(gguf_file)
    if how == "field":
        for _ in range(data.draw(s.integers(1, 3))):
            pos, width = data.draw(s.sampled_from(gguf_int_fields(gguf_file)))
            v = data.draw(JSON_INTS.filter(lambda x: 0 <= x < 1 << (8 * width)) | s.integers(0, (1 << (8 * width)) - 1))
            out[pos:pos + width] = v.to_bytes(width, "little")
    elif how == "flip":
        for i, x in data.draw(s.lists(s.tuples(s.integers(0, len(out) - 1), s.integers(1, 255)), min_size=1,
                                      max_size=4)):
            out[i] ^= x
    else:
        out = out[:data.draw(s.integers(0, len(out) - 1))]
    load_gguf(bytes(out))


@GGUF_FUZZ
@given(s.binary(max_size=200))
def test_random_bytes_after_the_gguf_magic(rest):
    load_gguf(b"GGUF" + rest)
