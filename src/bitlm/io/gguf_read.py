"""GGUF in: bitnet GGUF files (llama.cpp's "bitnet", bitnet.cpp's "bitnet-b1.58" and "bitnet-25")
to bitlm's native array dict (engine/native.py names), the torch model, and the tokenizer.

bitlm parses the file itself (it is a simple format) rather than through gguf.GGUFReader: that reader
does not know bitnet.cpp's I2_S (type 36, sized n/4 + 32 bytes: formats/i2s.py) and trusts the file's
sizes, and this one checks every length, count, dimension and offset against the file before using
it, so a truncated or malformed file is a one-line BitlmError. No gguf package is needed to read.

Layout (GGUF v2/v3, little-endian):
    "GGUF", u32 version, u64 n_tensors, u64 n_kv
    n_kv x (string key, u32 value type, value)        string = u64 length + UTF-8 bytes
    n_tensors x (string name, u32 n_dims, u64 dims[n_dims] (fastest first), u32 ggml type, u64 offset)
    padding to general.alignment (default 32), then the tensor data; offsets are relative to it

Tensors read (GGUF names; numpy shapes are the dims reversed):
    token_embd.weight [vocab, hidden]  F32 / F16 / BF16 / Q8_0 / Q6_K   (the head too when no output.weight)
    output.weight     [vocab, hidden]  same types (untied head; optional)
    output_norm.weight, blk.N.{attn_norm, ffn_norm, attn_sub_norm, ffn_sub_norm}.weight   F32 (F16/BF16 too)
    blk.N.{attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down}.weight   TQ1_0 / TQ2_0 / I2_S
    blk.N.<proj>.scale [1] F32 (optional, llama.cpp's "bitnet"): multiplies the weights
A TQ block carries its own float16 scale d; bitlm needs one scale per tensor, so every block of a
projection must have the same d (or be all zero): llama.cpp's converter writes codes times the one
absmean scale, bitlm writes d = 1 and the scale tensor. Anything else is refused, not approximated.

q and k are stored as the HF checkpoint holds them (no permutation): llama.cpp's "bitnet" and
bitnet.cpp's "bitnet-b1.58" both use NEOX RoPE, which pairs dimension i with i + head_dim/2 as HF's
rotate-half does (read from llama_model_rope_type in third-party notes on the fork, and seen in
tests/io/test_gguf.py when llama.cpp runs bitlm's TQ file; not run against bitnet.cpp here).

The configuration comes from the architecture's keys (block_count, embedding_length, ...); the
feed-forward activation from the architecture (llama.cpp's "bitnet" graph gates with SiLU, bitnet.cpp's
"bitnet-b1.58" with relu^2), unless the file carries `bitlm.config` (the HF config.json that bitlm
writes on export, so that a relu2 model exported for llama.cpp comes back as relu2).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import BitNetConfig
from ..errors import BitlmError
from ..formats import ggml_blocks, i2s, q6_k

ARCHS = ("bitnet", "bitnet-b1.58", "bitnet-25")
PROJ_NAMES = {  # HF name -> GGUF name (the order of engine/native.PROJS)
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
NORM_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"}

F32, F16, Q8_0, Q6_K, BF16, TQ1_0, TQ2_0, I2_S = 0, 1, 8, 14, 30, 34, 35, 36
TYPE_NAMES = {F32: "F32", F16: "F16", Q8_0: "Q8_0", Q6_K: "Q6_K", BF16: "BF16", TQ1_0: "TQ1_0",
              TQ2_0: "TQ2_0", I2_S: "I2_S"}
_BLOCKS = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q8_0: (32, 34), Q6_K: (256, 210), TQ1_0: (256, 54),
           TQ2_0: (256, 66)}  # weights, bytes per block (I2_S: formats/i2s.nbytes)
FLOAT_TYPES = (F32, F16, BF16, Q8_0, Q6_K)
TERNARY_TYPES = (TQ1_0, TQ2_0, I2_S)

# GGUF metadata value types: fixed-size ones as struct formats
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4


@dataclass
class TensorInfo:
    name: str
    type: int
    shape: tuple[int, ...]  # numpy order (slowest first)
    offset: int  # absolute, in the file
    nbytes: int


class GGUFFile:
    """The metadata and tensor table of a GGUF file, its data memory-mapped (nothing read yet)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        except OSError as e:
            raise BitlmError(f"{path}: cannot read ({e.strerror})") from None
        self.meta: dict = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._pos = 0
        self._parse()

    # ---- checked reading --------------------------------------------------------------------------
    def _fail(self, what: str) -> BitlmError:
        return BitlmError(f"{self.path}: not a valid GGUF file: {what}; the file may be truncated or "
                          "damaged: download or convert it again")

    def _take(self, n: int, what: str) -> memoryview:
        if n < 0 or self._pos + n > self.size:
            raise self._fail(f"{what} at byte {self._pos} runs past the end ({self.size} bytes)")
        b = memoryview(self._mm)[self._pos:self._pos + n]
        self._pos += n
        return b

    def _scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self._take(struct.calcsize(fmt), what))[0]

    def _string(self, what: str) -> str:
        n = self._scalar("<Q", what + " length")
        try:
            return str(self._take(n, what), "utf-8")
        except UnicodeDecodeError:
            raise self._fail(f"{what} at byte {self._pos - n} is not UTF-8") from None

    def _value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            return self._scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self._string(what)
        if vtype == _ARRAY:
            etype = self._scalar("<I", what + " element type")
            count = self._scalar("<Q", what + " length")
            least = struct.calcsize(_SCALARS[etype]) if etype in _SCALARS else 8  # a string is >= 8 bytes
            if etype not in _SCALARS and etype not in (_STRING, _ARRAY):
                raise self._fail(f"{what}: unknown array element type {etype}")
            if count * least > self.size - self._pos:
                raise self._fail(f"{what}: {count} elements cannot fit in the {self.size - self._pos} bytes left")
            if etype in _SCALARS and etype != 7:
                dt = np.dtype(_SCALARS[etype])
                return np.frombuffer(self._take(count * dt.itemsize, what), dtype=dt).tolist()
            return [self._value(etype, what) for _ in range(count)]
        raise self._fail(f"{what}: unknown value type {vtype}")

    def _parse(self) -> None:
        magic = bytes(self._take(4, "magic")) if self.size >= 4 else b""
        if magic != b"GGUF":
            raise BitlmError(f"{self.path}: not a GGUF file (it does not start with 'GGUF')")
        version = self._scalar("<I", "version")
        if version not in (2, 3):
            raise self._fail(f"version {version} (bitlm reads GGUF versions 2 and 3)")
        n_tensors = self._scalar("<Q", "tensor count")
        n_kv = self._scalar("<Q", "metadata count")
        if n_tensors > self.size or n_kv > self.size:
            raise self._fail(f"{n_tensors} tensors and {n_kv} metadata entries in a {self.size}-byte file")
        for _ in range(n_kv):
            key = self._string("metadata key")
            vtype = self._scalar("<I", f"type of {key}")
            self.meta[key] = self._value(vtype, key)
        infos = []
        for _ in range(n_tensors):
            name = self._string("tensor name")
            n_dims = self._scalar("<I", f"{name} dimension count")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise self._fail(f"tensor {name} has {n_dims} dimensions")
            dims = [self._scalar("<Q", f"{name} dimensions") for _ in range(n_dims)]
            gtype = self._scalar("<I", f"{name} type")
            offset = self._scalar("<Q", f"{name} offset")
            if name in self.tensors or any(name == i[0] for i in infos):
                raise self._fail(f"tensor {name} appears twice")
            infos.append((name, dims, gtype, offset))
        align = self.meta.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise self._fail(f"general.alignment is {align!r}, not a power of two")
        start = -(-self._pos // align) * align
        for name, dims, gtype, offset in infos:
            if any(d <= 0 or d > 2**40 for d in dims):
                raise self._fail(f"tensor {name} has dimensions {dims}")
            n = int(np.prod(dims, dtype=np.float64))
            if gtype == I2_S:
                if n % i2s.BLOCK:
                    raise self._fail(f"I2_S tensor {name} has {n} weights, not a multiple of {i2s.BLOCK}")
                nbytes = i2s.nbytes(n)
            elif gtype in _BLOCKS:
                per, size = _BLOCKS[gtype]
                if dims[0] % per:
                    raise self._fail(f"{TYPE_NAMES[gtype]} tensor {name} has rows of {dims[0]}, not a multiple "
                                     f"of {per}")
                nbytes = n // per * size
            else:
                nbytes = None  # a type bitlm does not read; refused only if the tensor is needed
            if offset % align:
                raise self._fail(f"tensor {name} data offset {offset} is not aligned to {align}")
            if nbytes is not None and start + offset + nbytes > self.size:
                raise self._fail(f"tensor {name} ({nbytes} bytes at {start + offset}) runs past the end "
                                 f"({self.size} bytes)")
            self.tensors[name] = TensorInfo(name, gtype, tuple(reversed(dims)), start + offset, nbytes or 0)

    # ---- access -------------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def tensor(self, name: str, types, shape: tuple[int, ...]) -> TensorInfo:
        t = self.tensors.get(name)
        if t is None:
            raise BitlmError(f"{self.path}: tensor {name} is missing")
        if t.type not in types:
            have = TYPE_NAMES.get(t.type, f"type {t.type}")
            raise BitlmError(f"{self.path}: tensor {name} is {have}; bitlm reads "
                             f"{', '.join(TYPE_NAMES[x] for x in types)} there")
        if tuple(t.shape) != tuple(shape):
            raise BitlmError(f"{self.path}: tensor {name} has shape {list(t.shape)}, the metadata implies "
                             f"{list(shape)}")
        return t

    def floats(self, name: str, shape: tuple[int, ...], rows: slice = slice(None)) -> np.ndarray:
        """float32 values of a float tensor, or of `rows` of it (F32 mapped, others converted)."""
        t = self.tensor(name, FLOAT_TYPES, shape)
        raw = self.raw(name).reshape(shape[0], -1)[rows] if len(shape) == 2 else self.raw(name)
        out_shape = (-1, *shape[1:])
        if t.type == F32:
            return raw.reshape(-1).view("<f4").reshape(out_shape)
        if t.type == F16:
            return raw.reshape(-1).view("<f2").astype(np.float32).reshape(out_shape)
        if t.type == BF16:
            return (raw.reshape(-1).view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(out_shape)
        if t.type == Q8_0:
            return ggml_blocks.q8_0_values(raw).reshape(out_shape)
        return q6_k.dequantize(raw, shape[-1]).reshape(out_shape)

    def rows(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Embedding/head rows for the native runtime: bf16 bits (uint16) when stored as BF16, else
        float32 values (F16, Q8_0 and Q6_K are exact in float32)."""
        t = self.tensor(name, FLOAT_TYPES, shape)
        return self.raw(name).view("<u2").reshape(shape) if t.type == BF16 else self.floats(name, shape)

    def ternary(self, name: str, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
        """(int8 values [out, in] in {-1, 0, 1}, float32 scale) of a ternary projection."""
        t = self.tensor(name, TERNARY_TYPES, shape)
        raw = self.raw(name)
        if t.type == I2_S:
            w, scale = i2s.unpack(raw, shape)
        else:
            trits, d = (ggml_blocks.tq2_0_trits if t.type == TQ2_0 else ggml_blocks.tq1_0_trits)(raw)
            used = np.abs(trits).any(axis=1)
            ds = np.unique(d[used])
            if len(ds) > 1:
                raise BitlmError(f"{self.path}: {name} has {len(ds)} different block scales (e.g. {ds[0]:g}, "
                                 f"{ds[-1]:g}); bitlm holds one scale per ternary tensor, so it cannot carry "
                                 "this file exactly")
            w, scale = trits.reshape(shape), np.float32(ds[0] if len(ds) else 1.0)
            if scale <= 0 or not np.isfinite(scale):
                raise BitlmError(f"{self.path}: {name} has block scale {scale:g}; expected a positive number")
        sname = name.removesuffix(".weight") + ".scale"
        if sname in self.tensors:
            s = self.floats(sname, (1,))[0]
            scale = np.float32(scale * s)
        if not np.isfinite(scale) or scale == 0:
            raise BitlmError(f"{self.path}: {name} has scale {scale}; expected a finite non-zero number")
        return w, np.float32(scale)


# ---- configuration ------------------------------------------------------------------------------
def _key(g: GGUFFile, key: str, kind=int, default=None):
    v = g.meta.get(key, default)
    if v is None:
        raise BitlmError(f"{g.path}: metadata {key} is missing")
    if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
        raise BitlmError(f"{g.path}: metadata {key} is {v!r}; expected a positive integer")
    if kind is float and (not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0):
        raise BitlmError(f"{g.path}: metadata {key} is {v!r}; expected a positive number")
    return v


def config_from_gguf(g: GGUFFile) -> BitNetConfig:
    arch = g.meta.get("general.architecture")
    if arch not in ARCHS:
        raise BitlmError(f"{g.path}: architecture {arch!r} is not a BitNet one bitlm reads "
                         f"({', '.join(ARCHS)})")
    emb = g.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise BitlmError(f"{g.path}: tensor token_embd.weight is missing or not 2-D")
    vocab, hidden = emb.shape
    heads = _key(g, f"{arch}.attention.head_count")
    a = {
        "vocab_size": vocab,
        "hidden_size": _key(g, f"{arch}.embedding_length"),
        "intermediate_size": _key(g, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _key(g, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _key(g, f"{arch}.attention.head_count_kv", default=heads),
        "max_position_embeddings": _key(g, f"{arch}.context_length"),
        "rope_theta": float(_key(g, f"{arch}.rope.freq_base", float, 10000.0)),
        "rms_norm_eps": float(_key(g, f"{arch}.attention.layer_norm_rms_epsilon", float)),
        "head_dim": _key(g, f"{arch}.rope.dimension_count", default=hidden // heads),
    }
    if a["hidden_size"] != hidden:
        raise BitlmError(f"{g.path}: token_embd.weight has rows of {hidden}, embedding_length says "
                         f"{a['hidden_size']}")
    stored = g.meta.get("bitlm.config")
    if stored is not None:  # bitlm's own export: the full HF config, checked against the GGUF keys
        try:
            cfg = BitNetConfig.from_hf(json.loads(stored), source=f"{g.path} (metadata bitlm.config)")
        except (json.JSONDecodeError, TypeError) as e:
            raise BitlmError(f"{g.path}: metadata bitlm.config is not JSON ({e})") from None
        for k, v in a.items():  # float keys are float32 in the file
            mine = np.float32(getattr(cfg, k)) if isinstance(v, float) else getattr(cfg, k)
            if mine != (np.float32(v) if isinstance(v, float) else v):
                raise BitlmError(f"{g.path}: metadata bitlm.config says {k} = {getattr(cfg, k)!r}, the GGUF "
                                 f"keys say {v!r}")
        return cfg.replace(quantization_mode="offline", linear_class="autobitlinear")
    bos, eos = g.meta.get("tokenizer.ggml.bos_token_id"), g.meta.get("tokenizer.ggml.eos_token_id")
    eot = g.meta.get("tokenizer.ggml.eot_token_id")
    embed_type = emb.type
    return BitNetConfig(
        **a, hidden_act="silu" if arch == "bitnet" else "relu2",
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=bos, eos_token_id=[eos, eot] if eot is not None and eot != eos else eos,
        quantization_mode="offline", linear_class="autobitlinear",
        torch_dtype="bfloat16" if embed_type == BF16 else "float32")


# ---- arrays -------------------------------------------------------------------------------------
def arrays_from_gguf(g: GGUFFile, cfg: BitNetConfig, progress=None, as_model: bool = False,
                     lazy: bool = False) -> dict[str, np.ndarray]:
    """The native array dict (engine/native.py) of the file, but with the head as rows: "head" holds
    the untied head's rows (float32 or bf16 bits); engine.native.head_arrays makes the chosen format.
    as_model=False keeps every value as the file holds it (conversions); True gives the float tensors
    the model's dtype, as loading a checkpoint does (bf16 when torch_dtype says so: the native cache)."""
    from ..engine.native import NORMS, PROJS, bf16_to_f32, f32_to_bf16
    from ..formats import hf_packed, i2v
    from ..kernels import from_hf_packed_array
    from . import st
    V, H = cfg.vocab_size, cfg.hidden_size
    bf16 = as_model and cfg.torch_dtype == "bfloat16"

    def model_rows(name):
        if bf16 and g.tensor(name, FLOAT_TYPES, (V, H)).type != BF16:
            out = np.empty((V, H), np.uint16)  # chunked: the float32 rows of 2B4T's embedding are 1.3 GB
            for i in range(0, V, 8192):
                out[i:i + 8192] = f32_to_bf16(g.floats(name, (V, H), slice(i, i + 8192)))
            return out
        r = g.rows(name, (V, H))
        if not as_model or bf16:
            return r if r.dtype == np.uint16 else np.ascontiguousarray(r)
        return bf16_to_f32(r) if r.dtype == np.uint16 else np.ascontiguousarray(r)

    def norm(name, size):
        v = np.array(g.floats(name, (size,)), dtype=np.float32)
        return bf16_to_f32(f32_to_bf16(v)) if bf16 else v

    arrays = {"embed": model_rows("token_embd.weight"), "final_norm": norm("output_norm.weight", H)}
    if not cfg.tie_word_embeddings:
        arrays["head"] = model_rows("output.weight")
    sizes = {"input_layernorm": H, "post_attention_layernorm": H, "self_attn.attn_sub_norm": H,
             "mlp.ffn_sub_norm": cfg.intermediate_size}
    scales = np.zeros((cfg.num_hidden_layers, len(PROJS)), np.float32)
    shapes = cfg.projection_shapes()
    for l in range(cfg.num_hidden_layers):
        for name in NORMS:
            arrays[f"{l}.{name}"] = norm(f"blk.{l}.{NORM_NAMES[name]}.weight", sizes[name])
        for j, name in enumerate(PROJS):
            def make(l=l, j=j, name=name):
                w, scale = g.ternary(f"blk.{l}.{PROJ_NAMES[name]}.weight", shapes[name])
                scales[l, j] = bf16_to_f32(f32_to_bf16(np.array([scale])))[0] if bf16 else scale
                if progress is not None:
                    progress.update(1)
                return from_hf_packed_array(hf_packed.pack(w), shapes[name][0])
            # lazy: made one at a time as st.write reaches them (memory: one projection, not all), each
            # filling its scale; a writer must write "scales" after them (io/convert.write does)
            key = f"{l}.{name}"
            arrays[key] = st.Lazy(i2v.packed_shape(*shapes[name]), np.uint8, make) if lazy else make()
    arrays["scales"] = scales
    return arrays


# ---- tokenizer ----------------------------------------------------------------------------------
# Llama 3's split (tokenizer.json of meta-llama/Meta-Llama-3-8B; llama.cpp's "llama-bpe")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL, _USER_DEFINED, _UNUSED = 3, 4, 5


def tokenizer_from_gguf(g: GGUFFile, cfg: BitNetConfig, warn=None):
    """engine.tokenizer.Tokenizer rebuilt from tokenizer.ggml.* (a byte-level BPE, model "gpt2"), or
    None when the file has no tokenizer."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    from ..engine.tokenizer import Tokenizer
    m = g.meta
    if "tokenizer.ggml.tokens" not in m:
        return None
    if m.get("tokenizer.ggml.model") != "gpt2":
        raise BitlmError(f"{g.path}: tokenizer model {m.get('tokenizer.ggml.model')!r} is not supported "
                         "(bitlm reads byte-level BPE, tokenizer.ggml.model 'gpt2')")
    tokens, merges = m["tokenizer.ggml.tokens"], m.get("tokenizer.ggml.merges") or []
    types = m.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if (not isinstance(tokens, list) or not isinstance(merges, list) or not all(isinstance(t, str) for t in tokens)
            or not all(isinstance(x, str) and " " in x for x in merges)):
        raise BitlmError(f"{g.path}: tokenizer.ggml.tokens/merges are not lists of strings (merges 'a b')")
    if not isinstance(types, list) or not all(isinstance(t, int) for t in types) or len(types) != len(tokens):
        raise BitlmError(f"{g.path}: tokenizer.ggml.token_type is not one integer per token")
    vocab = {}
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind != _UNUSED:  # padding ids beyond the tokenizer's own ([PAD123]) decode to nothing, as in HF
            vocab.setdefault(t, i)
    pre = m.get("tokenizer.ggml.pre")
    if pre is None:
        pre = "llama-bpe" if "<|begin_of_text|>" in vocab else "gpt-2"
        if warn:
            warn(f"{g.path}: no tokenizer.ggml.pre; splitting text as {pre} does")
    llama3 = pre in ("llama-bpe", "llama3", "llama-v3")
    # Llama 3's tokenizer.json sets ignore_merges (a piece that is a whole token is not merged up from
    # bytes), and llama.cpp does the same for its llama-bpe pre-tokenizer
    try:
        bpe = models.BPE(vocab=vocab, merges=[tuple(x.split(" ", 1)) for x in merges], fuse_unk=False,
                         ignore_merges=llama3)
    except Exception as e:  # the tokenizers library's own error, e.g. a merge naming a token not in the list
        raise BitlmError(f"{g.path}: tokenizer.ggml.tokens/merges do not make a BPE tokenizer "
                         f"({str(e).splitlines()[0][:160]}); the file is damaged: convert it again") from None
    tok = HFTokenizer(bpe)
    if llama3:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("gpt-2", "gpt2"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise BitlmError(f"{g.path}: pre-tokenizer {pre!r} is not supported (bitlm reads llama-bpe and gpt-2)")
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    bos = m.get("tokenizer.ggml.bos_token_id")
    eos = m.get("tokenizer.ggml.eos_token_id")
    for key, i in (("bos", bos), ("eos", eos)):
        if i is not None and (not isinstance(i, int) or not 0 <= i < len(tokens)):
            raise BitlmError(f"{g.path}: tokenizer.ggml.{key}_token_id {i} is outside the {len(tokens)} tokens")
    if bos is not None and m.get("tokenizer.ggml.add_bos_token", True):
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)])
    tcfg = {"bos_token": tokens[bos] if bos is not None else None, "eos_token": tokens[eos] if eos is not None else None}
    return Tokenizer(tok, tokenizer_config={k: v for k, v in tcfg.items() if v is not None},
                     chat_template=m.get("tokenizer.chat_template"), eos_token_ids=cfg.eos_token_ids)


def _warn(msg: str) -> None:
    print(f"bitlm: warning: {msg}", file=sys.stderr)


def read(path, progress: bool = False):
    """(config, array dict with head rows, tokenizer or None) of a bitnet GGUF file."""
    from .progress import Progress
    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    with Progress(cfg.num_hidden_layers * 7, f"reading {Path(path).name}", enabled=progress) as bar:
        arrays = arrays_from_gguf(g, cfg, bar)
    return cfg, arrays, tokenizer_from_gguf(g, cfg, warn=_warn)


def is_gguf(path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def load_torch(path, dtype=None, tokenizer: bool = True):
    """bitlm.load of a GGUF file: the packed torch model (io/native.to_torch) and its tokenizer."""
    from .native import to_torch
    cfg, arrays, tok = read(path)
    model = to_torch(arrays, cfg, dtype)
    model.source = {"path": str(path), "format": "gguf"}
    model.tokenizer = tok if tokenizer else None
    return model


def native_cache_path(path, head: str, weights: str = "i2v") -> Path:
    """The cache file of a GGUF file, head and weight format: one per triple (io/native.cache_path's
    rule; the I2V file keeps the name it had before weight formats existed)."""
    from .native import _sha256, cache_dir, format_tag
    p = Path(path).resolve()
    h = _sha256(f"gguf|{format_tag(head, weights, '|')}|{p}".encode())
    return cache_dir() / f"{p.stem}-gguf-{format_tag(head, weights)}-{h.hexdigest()[:16]}.safetensors"


def source_identity(path, head: str, weights: str = "i2v") -> dict:
    """What a native file made from a GGUF file records (io/native.source_identity's form): a changed
    file (size, modification time) replaces its cache file."""
    from .native import weights_entry
    p = Path(path).resolve()
    s = p.stat()
    return {"gguf": str(p), "head": head, **weights_entry(weights),
            "files": {p.name: [s.st_size, s.st_mtime_ns]}}


def load_native(path, head: str = "q8", max_len: int | None = None, kv: str = "f16", mmap: bool = True,
                tokenizer: bool = True, weights: str = "i2v"):
    """A GGUF file on the native runtime: converted once to a native file in the cache (saying so on
    stderr, with a progress bar; io/native.ensure_file), then memory-mapped like any other. Its
    projections are in the weight format `weights` (io/native.retarget)."""
    from ..engine.native import resolve_weights
    from .native import ensure_file, open_native, retarget, save
    weights = resolve_weights(weights)
    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    dest = native_cache_path(path, head, weights)
    source = source_identity(path, head, weights)

    def build():
        from ..engine.native import head_arrays
        arrays = arrays_from_gguf(g, cfg, as_model=True, lazy=True)
        rows = arrays.pop("head", arrays["embed"]) if not cfg.tie_word_embeddings else arrays["embed"]
        arrays.update(head_arrays(rows, head))
        save(retarget(arrays, cfg, weights), cfg, dest, head, source, weights=weights)

    converted = ensure_file(dest, source, build, what=str(path))
    nm = open_native(dest, max_len=max_len, kv=kv, mmap=mmap, source=source)
    nm.tokenizer = tokenizer_from_gguf(g, cfg, warn=_warn) if tokenizer else None
    nm.source = {"path": str(path), "format": "gguf", "file": str(dest), "converted": converted}
    return nm


def describe(path) -> dict:
    """`bitlm info` of a GGUF file (the dict io/summary.format_summary prints). Like the loaders, it
    reads every ternary tensor's codes and scales, so a file they refuse is refused here too."""
    from .summary import COMPONENTS
    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    shapes = cfg.projection_shapes()
    for l in range(cfg.num_hidden_layers):
        for name in PROJ_NAMES:
            g.ternary(f"blk.{l}.{PROJ_NAMES[name]}.weight", shapes[name])
    nbytes = dict.fromkeys(COMPONENTS, 0)
    dtypes: dict[str, set[str]] = {c: set() for c in COMPONENTS}
    proj = set(PROJ_NAMES.values())
    for t in g.tensors.values():
        parts = t.name.split(".")
        c = ("embedding" if t.name == "token_embd.weight" else "head" if t.name == "output.weight"
             else "ternary weights" if len(parts) == 4 and parts[2] in proj and parts[3] == "weight"
             else "ternary scales" if parts[-1] == "scale" else "norms" if parts[-2].endswith("norm") else "other")
        nbytes[c] += t.nbytes
        dtypes[c].add(TYPE_NAMES.get(t.type, f"type {t.type}"))
    data = sum(nbytes.values())
    params = cfg.num_parameters()
    arch = g.meta.get("general.architecture")
    types = "/".join(sorted(dtypes["ternary weights"]))
    desc = (f"GGUF ({arch}): ternary weights as {types}"
            + (" with the per-tensor scale inside each tensor" if types == "I2_S" else ", block scales")
            + (" and blk.N.*.scale tensors" if nbytes["ternary scales"] else "")
            + f"; embedding {'/'.join(sorted(dtypes['embedding']))}")
    meta = {k: v for k, v in g.meta.items() if not isinstance(v, list) and k != "bitlm.config"
            and not k.startswith("tokenizer.chat")}
    return {
        "path": str(path),
        "format": {"quantization_mode": "gguf", "linear_class": None, "description": desc,
                   "dtypes": {c: sorted(d) for c, d in dtypes.items() if d}, "metadata": meta},
        "config": cfg.to_hf(),
        "parameters": params,
        "bytes": {**nbytes, "headers": g.size - data, "total": g.size},
        "bits_per_ternary_weight": 8 * nbytes["ternary weights"] / params["ternary"] if params["ternary"] else None,
        "files": {Path(path).name: g.size},
    }
