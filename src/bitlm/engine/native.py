"""The native runtime: the whole forward pass in C (kernels/bitnet.c) on numpy arrays.

A NativeModel holds every weight as a numpy array (packed ternary projections, float norms, the
embedding, the head in the chosen format) plus its own KV cache, and hands the C core their pointers
once. Each step is then one call: `forward(tokens, n_out)` runs the tokens at the next positions and
returns the logits of the last n_out of them. torch is not needed here: the arrays come either from a
converted file, memory-mapped (bitlm.io.native), or from a torch model (`from_model`).

The arrays, by name (the same names in the converted file):
    embed                      float32 or bf16 bits (uint16) [vocab, hidden]
    final_norm                 float32 [hidden]
    scales                     float32 [layers, 7]   weight scales of q k v o gate up down
    L.<norm>                   float32, for the four norms of block L
    L.<proj>                   uint8 packed ternary weights in the model's weight format: "i2v" (2 bits,
                               formats/i2v.py) or "t5" (1.6 bits, formats/t5.py); the same format for all
    head                       head rows [vocab, hidden] (f32 / bf16 heads; absent when tied)
    head.q8, head.scale, head.rowsum   int8 rows, float32 row scales, int32 row sums (q8 head)
    head.q6, head.scale        6-bit rows (formats/q6.py), float32 row scales (q6 head)

Head formats: "f32" (exact), "bf16" (rows as the checkpoint stores them), "q8" (int8 rows with a float
scale per row: half the bytes of bf16, read by AVX-512 VNNI), "q6" (6-bit rows, formats/q6.py: 0.75
bytes a weight, read by AVX-512 VBMI + VNNI).

Weight formats (WEIGHTS): "i2v" (2 bits a weight) or "t5" (1.6: decode reads 20% fewer bytes; its
kernels do more work per byte, and T5 prefill has no AMX kernel). Both give the same logits, bit for bit:
the kernels compute the same exact integer sums.
"""

from __future__ import annotations

import numpy as np

from ..errors import BitlmError
from ..formats import i2v, q8_0, t5

HEADS = ("f32", "bf16", "q8", "q6")
NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.attn_sub_norm", "mlp.ffn_sub_norm")
PROJS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_F32, _BF16, _Q8, _Q6 = 0, 1, 2, 4
WEIGHTS = ("i2v", "t5")  # i2v.h I2V_FMT_* indices
WEIGHT_MODULES = {"i2v": i2v, "t5": t5}


class NativeArrays(dict):
    """The array dict of a native model, knowing the format of its packed projections (`weights`), so a
    second NativeModel over the same arrays (a server's engine) runs them in the right format."""

    def __init__(self, arrays, weights: str):
        super().__init__(arrays)
        self.weights = check_weights(weights)


def check_weights(weights: str) -> str:
    """A weight format name, checked (a one-line BitlmError otherwise)."""
    if weights not in WEIGHTS:
        raise BitlmError(f"weight format {weights!r} is not one of {', '.join(WEIGHTS)}")
    return weights


def resolve_weights(weights: str, rows: int = 1) -> str:
    """A weight format name, or "auto": the format that decodes faster on this CPU's kernel path, as
    benchmarks/cpu_inference.py and bitlm bench measured it (benchmarks/README.md), for a workload of up
    to `rows` sequences decoded a step. t5 where the products run on AVX-512 VNNI (with or without AMX)
    and one sequence decodes at a time: 1.6 bits read per weight, decode bandwidth-bound, prefill as fast.
    i2v elsewhere: on AVX2 a T5 GEMV costs 1.6-2.1x I2V's time (Zen 3), and a step of several rows (a server's batch)
    turns T5 compute-bound (decoding its digits), where I2V's cheaper unpacking wins (2B4T shape, 2
    threads: 4 rows a step 125 against 107 t/s, 8 rows 186-197 against 158). Speculative decoding's
    verify rows are not counted (rows = 1 for generate: T5's single rows are 10% faster, its verify rows
    slower, a wash at the acceptance measured). NEON and the scalar path are not measured, and i2v does
    less arithmetic a weight."""
    if weights == "auto":
        from ..kernels import info
        return "t5" if info()["path"] in ("avx512vnni", "amx") and rows <= 1 else "i2v"
    return check_weights(weights)
_NI = 24  # bitnet.h: BN_NI
# KV cache element types: numpy dtype of the cache array, bitnet.h BN_F32 / BN_F16 / BN_Q8_0. q8_0 rows are
# bytes (formats/q8_0.py: ceil(head_dim / 32) blocks of 34 bytes, 0.53 of f16's bytes).
KV_KINDS = {"f32": (np.float32, 0), "f16": (np.float16, 3), "q8_0": (np.uint8, 5)}


def check_kv(kv: str) -> str:
    """A KV cache type name, checked (a one-line BitlmError naming the choices otherwise)."""
    if kv not in KV_KINDS:
        raise BitlmError(f"KV cache type {kv!r} is not one of {', '.join(KV_KINDS)}")
    return kv


KV_TILE = q8_0.TILE  # kernels/bitnet_impl.h BN_KT: q8_0 keys are cached in tiles of 16 (formats/q8_0.py)


def kv_row(kv: str, head_dim: int) -> tuple[type, int]:
    """(dtype, elements) of one cached row of head_dim keys or values."""
    return KV_KINDS[check_kv(kv)][0], q8_0.row_bytes(head_dim) if kv == "q8_0" else head_dim


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch's .bfloat16() does; a NaN stays a NaN (0x7FC0, quiet) where the
    rounding would carry it into an infinity or zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    return np.where(nan, np.uint16(0x7FC0), bits) if nan.any() else bits


def quantize_head_rows(e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 rows with one float32 scale per row (absmax), and the row sums the VNNI trick needs."""
    e = np.asarray(e, dtype=np.float32)
    amax = np.abs(e).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(e / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale, q.sum(axis=1, dtype=np.int32)


def head_arrays(rows: np.ndarray, head_format: str, chunk: int = 4096) -> dict[str, np.ndarray]:
    """The head entries of the array dict from its rows (float32 or bf16 bits), made `chunk` rows at a
    time into the final arrays: the float32 rows of a 128256-row head alone are 1.3 GB, and packing
    all of them at once took 9 GB of temporaries."""
    if head_format not in HEADS:
        raise BitlmError(f"head format {head_format!r} is not one of {', '.join(HEADS)}")
    if head_format == "bf16":
        return {"head": rows if rows.dtype == np.uint16 else f32_to_bf16(rows)}
    V, H = rows.shape

    def full(i):  # float32 rows i .. i + chunk
        r = rows[i:i + chunk]
        return r if r.dtype == np.float32 else bf16_to_f32(r)

    if head_format == "f32":
        if rows.dtype == np.float32:
            return {"head": np.ascontiguousarray(rows)}
        out = {"head": np.empty((V, H), np.float32)}
        for i in range(0, V, chunk):
            out["head"][i:i + chunk] = full(i)
        return out
    if head_format == "q6":
        from ..formats import q6
        out = {"head.q6": np.empty((V, q6.padded_cols(H) // q6.GROUP * q6.GROUP_BYTES), np.uint8),
               "head.scale": np.empty(V, np.float32)}
        for i in range(0, V, chunk):
            q, out["head.scale"][i:i + chunk] = q6.quantize(full(i))
            out["head.q6"][i:i + chunk] = q6.pack(q)
        return out
    out = {"head.q8": np.empty((V, H), np.int8), "head.scale": np.empty(V, np.float32),
           "head.rowsum": np.empty(V, np.int32)}
    for i in range(0, V, chunk):
        j = slice(i, i + chunk)
        out["head.q8"][j], out["head.scale"][j], out["head.rowsum"][j] = quantize_head_rows(full(i))
    return out


def arrays_from_model(model, head_format: str = "q8", weights: str = "i2v") -> dict[str, np.ndarray]:
    """The array dict of a packed torch BitNetForCausalLM (copies, in the native layouts; the ternary
    projections in weight format `weights`)."""
    import torch

    from ..bitlinear import PackedBitLinear

    def np_float(t):
        t = t.detach()
        return t.view(torch.int16).numpy().view(np.uint16).copy() if t.dtype == torch.bfloat16 else t.float().numpy()

    a = {"embed": np_float(model.model.embed_tokens.weight),
         "final_norm": model.model.norm.weight.detach().float().numpy()}
    scales = np.zeros((model.config.num_hidden_layers, len(PROJS)), np.float32)
    for l, block in enumerate(model.model.layers):
        for name in NORMS:
            a[f"{l}.{name}"] = block.get_submodule(name).weight.detach().float().numpy()
        for j, name in enumerate(PROJS):
            m = block.get_submodule(name)
            if not isinstance(m, PackedBitLinear):
                raise BitlmError("native runtime: convert the model to its packed form first (to_packed())")
            a[f"{l}.{name}"] = pack_projection(m.weight.numpy(), m.out_features, weights)
            scales[l, j] = float(m.weight_scale)
    a["scales"] = scales
    rows = a["embed"] if model.config.tie_word_embeddings else np_float(model.lm_head.weight)
    a.update(head_arrays(rows, head_format))
    return NativeArrays(a, weights)


def pack_projection(hf: np.ndarray, out_features: int, weights: str) -> np.ndarray:
    """Hugging Face packed uint8 [ceil(out/4), in] -> the weight format's packed array (in C where built,
    else the formats/ module's numpy reference)."""
    from ..kernels import from_hf_packed_array
    return from_hf_packed_array(hf, out_features, check_weights(weights))


def rope_tables(head_dim: int, theta: float, max_len: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [max_len - start, head_dim] for positions start .. max_len - 1, rotate-half
    convention (model.rope_tables without torch)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    freqs = np.arange(start, max_len, dtype=np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def _native():
    from ..kernels import _native as n  # raises ImportError when the library was not built
    return n


def _zeros_pages(n: int, shape: tuple, dtype, huge: bool = False) -> tuple[object, list[np.ndarray]]:
    """n zeroed arrays in one anonymous mapping, untouched pages costing no memory. On ordinary pages
    unless `huge`: numpy asks for transparent huge pages on large arrays, which suits only memory used
    in order from its start. A KV cache laid out by position (a paged pool's blocks, the model's own
    cache: kernels/bitnet.h BN_KV_BLOCK) is, and takes huge pages: attention reads it from memory with
    fewer TLB misses (one core's scores over q8_0 keys in memory ran at 13.1-13.6 GB/s against 9.3 on
    4 KB pages, benchmarks/kv_attention_c.c; benchmarks/README.md, seventh session). Laid out by head it
    made 2 MB resident for each head's first row (the 2B4T cache at 4,096 positions took 180 MB after one
    token) and stayed on ordinary pages. The advice is a hint: a kernel without transparent huge pages
    refuses it, and the mapping stays as it is."""
    import contextlib
    import math
    import mmap
    count = math.prod(shape)  # Python ints: a context length from a file cannot wrap around
    each = -(-count * np.dtype(dtype).itemsize // 64) * 64
    try:
        buf = mmap.mmap(-1, max(each * n, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, OverflowError) as e:
        raise MemoryError(f"{each * n / 2**30:.3g} GiB: {e}") from None
    advice = "MADV_HUGEPAGE" if huge else "MADV_NOHUGEPAGE"
    if hasattr(mmap, advice):
        with contextlib.suppress(OSError, ValueError):
            buf.madvise(getattr(mmap, advice))
    return buf, [np.frombuffer(buf, dtype, count, i * each).reshape(shape) for i in range(n)]


def _kernel_path(path: str | None) -> int:
    from ..kernels import _path_index
    try:
        return _path_index(path)
    except ValueError as e:
        raise BitlmError(str(e)) from None


class NativeModel:
    def __init__(self, config, arrays: dict[str, np.ndarray], max_len: int | None = None, kv: str = "f16",
                 path: str | None = None, weights: str | None = None):
        """kv: the KV cache's element type (KV_KINDS), "f16" (half the bytes of f32, as llama.cpp keeps it),
        "q8_0" (8-bit blocks, formats/q8_0.py: 0.53 of f16's bytes, for long contexts; the queries are
        rounded to q8_0 too and scored with integer dots over the keys, as llama.cpp does) or "f32".
        path: the kernel path to run ("scalar", "avx2", ...; bitlm.kernels.info()["paths"]), None for the
        best this CPU has. weights: the format of the packed projections in arrays (WEIGHTS; a converted
        file's metadata says which); None: the format a NativeArrays dict records, else "i2v"."""
        check_kv(kv)
        c = self.config = config
        self.kv = kv
        recorded = getattr(arrays, "weights", None)
        if weights is not None and recorded is not None and weights != recorded:
            raise BitlmError(f"native model: weights {weights!r} asked for arrays packed as {recorded!r}")
        weights = self.weights = check_weights(weights or recorded or "i2v")
        self.n = _native()
        self.arrays = arrays  # the C side points into these: they live as long as the model
        self.max_len = min(max_len or c.max_position_embeddings, c.max_position_embeddings)
        self.pos = 0
        self.ubatch = 48  # prompt tokens per C forward (8 register tiles of 6): bounds its scratch (~6 MB at 2B4T)
        self.tokenizer = None
        if "head.q6" in arrays:
            self.head_format = "q6"
        elif "head.q8" in arrays:
            self.head_format = "q8"
        elif "head" in arrays:
            self.head_format = "f32" if arrays["head"].dtype == np.float32 else "bf16"
        else:
            raise BitlmError("native runtime: no head arrays (head or head.q8)")

        def get(name, dtype, shape):
            if name not in arrays:
                raise BitlmError(f"native model: array {name!r} is missing")
            x = arrays[name]
            if x.dtype != dtype or tuple(x.shape) != tuple(shape) or not x.flags.c_contiguous:
                raise BitlmError(f"native model: array {name!r} is {x.dtype} {list(x.shape)}, expected "
                                 f"contiguous {np.dtype(dtype)} {list(shape)}")
            return x.ctypes.data

        V, H = c.vocab_size, c.hidden_size
        emb = arrays.get("embed")
        emb_kind = _F32 if emb is not None and emb.dtype == np.float32 else _BF16
        embed_ptr = get("embed", np.float32 if emb_kind == _F32 else np.uint16, (V, H))
        # an embedding mapped from a file is read a row at a time with pread: the rows seen stay in the
        # page cache, not in this process's resident memory (a long session touches thousands of rows)
        from ..io.st import file_span
        span = file_span(emb)
        self._embed_file = open(span[0], "rb") if span else None
        embed_fd = (self._embed_file.fileno(), span[1]) if span else (-1, 0)
        if self.head_format == "q6":
            from ..formats import q6
            head_ptrs = (get("head.q6", np.uint8, (V, q6.padded_cols(H) // q6.GROUP * q6.GROUP_BYTES)),
                         get("head.scale", np.float32, (V,)), 0)
            head_kind = _Q6
        elif self.head_format == "q8":
            head_ptrs = (get("head.q8", np.int8, (V, H)), get("head.scale", np.float32, (V,)),
                         get("head.rowsum", np.int32, (V,)))
            head_kind = _Q8
        else:
            head_kind = _F32 if self.head_format == "f32" else _BF16
            head_ptrs = (get("head", np.float32 if head_kind == _F32 else np.uint16, (V, H)), 0, 0)
        # RoPE tables for every position, filled as positions are reached (_fill_rope): untouched pages of
        # the mapping cost no memory (4 MB at 4,096 positions of the 2B4T shape)
        try:
            self._rope_map, (cos, sin) = _zeros_pages(2, (self.max_len, c.head_dim), np.float32)
        except MemoryError as e:
            raise BitlmError(f"native model: the RoPE tables of {self.max_len} positions cannot be allocated "
                             f"({e}); pass a smaller context length (max_len, --ctx-size)") from None
        self._rope = (cos, sin)
        self._rope_filled = 0
        self.rope_chunk = 256  # positions filled at a time
        # The KV cache: a paged pool of the model's own, its blocks in position order (kernels/bitnet.h
        # BN_I_KV_CACHE): [blocks][layers][2][kv_heads][KV_BLOCK][row], positions rounded up to whole blocks
        kv_dtype, kv_elems = kv_row(kv, c.head_dim)
        kb = self.n.KV_BLOCK
        kv_shape = (-(-self.max_len // kb), c.num_hidden_layers, 2, c.num_key_value_heads, kb, kv_elems)
        try:
            self._kv_map, (self.kv_cache,) = _zeros_pages(1, kv_shape, kv_dtype, huge=True)
        except MemoryError as e:
            raise BitlmError(f"native model: a KV cache of {self.max_len} positions cannot be allocated ({e}); "
                             "pass a smaller context length (max_len, --ctx-size)") from None
        ints = [c.num_hidden_layers, H, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                c.head_dim, V, self.max_len, 0 if c.hidden_act == "relu2" else 1, cos.ctypes.data, sin.ctypes.data,
                get("final_norm", np.float32, (H,)), embed_ptr, emb_kind, head_kind, *head_ptrs,
                _kernel_path(path),
                KV_KINDS[kv][1], *embed_fd, WEIGHTS.index(weights), self.kv_cache.ctypes.data]
        assert len(ints) == _NI
        get("scales", np.float32, (c.num_hidden_layers, len(PROJS)))  # present, of that dtype and shape
        scales = arrays["scales"]
        flts = [c.rms_norm_eps]
        norm_sizes = dict(zip(NORMS, (H, H, c.q_size, c.intermediate_size)))
        shapes = c.projection_shapes()
        for l in range(c.num_hidden_layers):
            ints += [get(f"{l}.{n}", np.float32, (norm_sizes[n],)) for n in NORMS]
            for j, name in enumerate(PROJS):
                ints.append(get(f"{l}.{name}", np.uint8, WEIGHT_MODULES[weights].packed_shape(*shapes[name])))
                flts.append(float(scales[l, j]))
        self._ints = np.array(ints, dtype=np.int64)
        self._flts = np.array(flts, dtype=np.float64)
        self._handle = self.n.model_new(self._ints.ctypes.data, len(self._ints), self._flts.ctypes.data,
                                        len(self._flts))

    @classmethod
    def from_model(cls, model, head: str = "q8", max_len: int | None = None, kv: str = "f16",
                   path: str | None = None, weights: str = "i2v") -> "NativeModel":
        """From a packed torch BitNetForCausalLM (its weights are copied into the native layouts)."""
        nm = cls(model.config, arrays_from_model(model, head, weights), max_len=max_len, kv=kv, path=path,
                 weights=weights)
        nm.tokenizer = model.tokenizer
        return nm

    @property
    def nbytes(self) -> dict[str, int]:
        """Bytes held per component (memory-mapped arrays count as their file size)."""
        out = {"ternary": 0, "norms": 0, "embedding": 0, "head": 0, "kv_cache": 0}
        for k, v in self.arrays.items():
            kind = ("head" if k.startswith("head") else "embedding" if k == "embed" else
                    "ternary" if k.endswith("_proj") or k == "scales" else "norms")
            out[kind] += v.nbytes
        out["kv_cache"] = self.kv_cache.nbytes
        return out

    def kv_rows(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer `layer`'s cached keys and values, each [kv_heads, positions, row] (copies out of the
        cache's blocks; positions up to its whole blocks, those not reached zero). Rows as kv_row says;
        q8_0 keys as the cache holds them, in tiles (formats/q8_0.py tile_keys)."""
        k, v = self.kv_cache[:, layer].transpose(1, 2, 0, 3, 4)  # each [kv_heads, blocks, KV_BLOCK, row]
        return tuple(x.reshape(x.shape[0], -1, x.shape[-1]) for x in (k, v))

    # ---- running -----------------------------------------------------------------------------------
    def reset(self) -> None:
        self.pos = 0

    def truncate(self, length: int) -> None:
        self.pos = min(self.pos, length)

    def _tokens(self, tokens) -> np.ndarray:
        t = np.ascontiguousarray(np.asarray(tokens, dtype=np.int32).reshape(-1))
        if self.pos + t.shape[0] > self.max_len:
            raise BitlmError(f"sequence of {self.pos + t.shape[0]} tokens exceeds the context length "
                             f"{self.max_len}; shorten the prompt or lower max_new_tokens")
        if t.shape[0] and (t.min() < 0 or t.max() >= self.config.vocab_size):
            raise BitlmError(f"token id out of range [0, {self.config.vocab_size})")
        return t

    def _fill_rope(self, n: int) -> None:
        """RoPE rows for positions up to n, filled rope_chunk positions at a time."""
        if n > self._rope_filled:
            end = min(self.max_len, -(-n // self.rope_chunk) * self.rope_chunk)
            c = self.config
            cos, sin = rope_tables(c.head_dim, c.rope_theta, end, start=self._rope_filled)
            self._rope[0][self._rope_filled:end] = cos
            self._rope[1][self._rope_filled:end] = sin
            self._rope_filled = end

    def forward(self, tokens, n_out: int = 1) -> np.ndarray:
        """Run `tokens` at positions pos, pos+1, ...; float32 logits [n_out, vocab] of the last n_out.

        A long prompt runs in micro-batches of `self.ubatch` tokens (llama.cpp's n_ubatch): the same
        numbers, with the C forward's scratch memory bounded by the micro-batch, not the prompt."""
        t = self._tokens(tokens)
        T = t.shape[0]
        n_out = min(n_out, T)
        out = np.empty((n_out, self.config.vocab_size), dtype=np.float32)
        for start in range(0, T, self.ubatch):
            chunk = t[start:start + self.ubatch]
            end = start + chunk.shape[0]
            k = max(0, end - max(start, T - n_out))  # how many of this chunk's positions are wanted
            dst = out[n_out - (T - end) - k:n_out - (T - end)]
            self._run(chunk, dst.ctypes.data if k else 0, k, 0)
            self.pos += chunk.shape[0]
        return out

    def _run(self, tokens: np.ndarray, out_ptr: int, n_out: int, hidden: int) -> None:
        self._fill_rope(self.pos + tokens.shape[0])
        try:
            self.n.forward(self._handle, tokens.ctypes.data, tokens.shape[0], self.pos, out_ptr, n_out, hidden)
        except OSError:
            raise BitlmError(f"{self._embed_file.name}: an embedding row could not be read (was the file "
                             "truncated or replaced while in use?); load the model again") from None

    def hidden(self, tokens) -> np.ndarray:
        """Final-norm hidden states float32 [T, hidden] (advances the cache like forward)."""
        t = self._tokens(tokens)
        out = np.empty((t.shape[0], self.config.hidden_size), dtype=np.float32)
        if t.shape[0]:
            self._run(t, out.ctypes.data, 0, 1)
            self.pos += t.shape[0]
        return out


class NativeCache:
    """The KV cache of a NativeModel seen through the KVCache interface the generation engine uses.
    A NativeModel owns one cache, so one conversation at a time."""

    def __init__(self, nm: NativeModel, max_len: int | None = None):
        self.nm = nm
        self.max_len = min(max_len or nm.max_len, nm.max_len)
        nm.reset()

    @property
    def length(self) -> int:
        return self.nm.pos

    def reset(self) -> None:
        self.nm.reset()

    def truncate(self, length: int) -> None:
        self.nm.truncate(length)


class NativeLM:
    """A NativeModel that answers like BitNetForCausalLM (last_logits, new_cache, config, tokenizer, and
    a call on torch ids), so generate(), stream_text() and ChatSession run on the native runtime."""

    device = "cpu"

    def __init__(self, nm: NativeModel):
        self.nm = nm
        self.config = nm.config
        self.tokenizer = nm.tokenizer
        self.source = getattr(nm, "source", None)

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> NativeCache:
        if batch_size != 1:
            raise BitlmError("the native runtime runs one sequence at a time (batch size 1)")
        return NativeCache(self.nm, max_len)

    def last_logits(self, ids, cache: NativeCache | None = None, n: int = 1) -> np.ndarray:
        """Float32 logits (n, vocab) of the last n of `ids` (the generation engine's step, no torch; n=0
        only fills the cache)."""
        if cache is None:  # a stateless call: run from position 0
            self.nm.reset()
        return self.nm.forward(ids, n)

    def __call__(self, input_ids, cache: NativeCache | None = None, logits_to_keep: int = 0):
        """BitNetForCausalLM's call: torch ids (1, T) in, torch logits (1, n, vocab) out."""
        import torch
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise BitlmError("the native runtime runs one sequence at a time: input_ids must be (1, T)")
        if cache is None:  # a stateless call: run from position 0
            self.nm.reset()
        T = input_ids.shape[1]
        n_out = T if not logits_to_keep else min(logits_to_keep, T)
        return torch.from_numpy(self.nm.forward(input_ids[0].numpy(), n_out)).unsqueeze(0)


# "norm+quantize" includes the residual adds and relu2/silu, done by the norm that follows them
PROFILE_PHASES = ("embed", "norm+quantize", "q/k/v", "rope+kv store", "attention", "o", "gate/up", "down",
                  "head")


def profile(nm: NativeModel, enable: bool | None = None, reset: bool = False) -> dict[str, float]:
    """Seconds spent per phase of the forward since the last reset (bitnet.h BN_PROF_*)."""
    ns = nm.n.profile(nm._handle, -1 if enable is None else int(enable), int(reset))
    return {name: v / 1e9 for name, v in zip(PROFILE_PHASES, ns, strict=True)}
