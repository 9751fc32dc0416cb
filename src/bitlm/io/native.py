"""bitlm's own file for the native runtime: every array in its kernel layout, memory-mapped at load.

A Hugging Face checkpoint is converted once (packed projections in the chosen weight format, the head in
the chosen format)
into one safetensors file, cached under ~/.cache/bitlm/native (or $BITLM_CACHE); later loads map it
and touch no weight until the first forward, so loading takes well under a second and resident memory
stays near the bytes actually read. The file says what it holds in its metadata:
    bitlm_format  "native-v3"
    config        the Hugging Face config.json (JSON)
    head          "f32" | "bf16" | "q8" | "q6"
    weights       "i2v" | "t5": the packed projections' format (engine/native.py WEIGHTS)
    data_size     bytes of the data section (decimal): a truncated or padded file is told by its size
    source        what it was made from (JSON): the checkpoint directory, the head, and the size and
                  modification time of config.json and each weight file
v2 is v1 with data_size and source; v3 is v2 with weights (a v2 file is read as weights "i2v", the only
format v2 had, and its source as made with weights "i2v"). Array names and layouts: engine/native.py.

The cache cannot poison a run: a load reads the header alone (no hashing of gigabytes) and rebuilds a
file that is truncated, of another format version, or made from an earlier state of the checkpoint,
saying so in one line on stderr; conversions write a unique temporary file renamed into place, under a
lock, so a second process converting the same checkpoint waits for the first and uses its file.
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np

from ..config import BitNetConfig
from ..errors import BitlmError
from . import st

FORMAT = "native-v3"
_READABLE = ("native-v2", FORMAT)  # v2: v3 without the weights field, all I2V
_MISSING = "missing"  # the reason a file that does not exist is made: not worth a line


def cache_dir() -> Path:
    return Path(os.environ.get("BITLM_CACHE") or Path.home() / ".cache" / "bitlm") / "native"


def _sha256(data: bytes):
    """hashlib.sha256, from CPython's own implementation where it is built (_sha2; _sha256 before
    3.12): importing hashlib maps OpenSSL's libcrypto, 3.6 MB resident in a runtime that otherwise
    never needs it. The digests are the same either way."""
    import importlib
    for name in ("_sha2", "_sha256"):
        try:
            return importlib.import_module(name).sha256(data)
        except (ImportError, AttributeError):
            pass
    import hashlib
    return hashlib.sha256(data)


def format_tag(head: str, weights: str, sep: str = "-") -> str:
    """The head and weight formats as a cache file's name (sep "-") or hash key (sep "|") gives them:
    the head alone for I2V, so that its files keep the names they had before weight formats existed."""
    return head if weights == "i2v" else f"{head}{sep}{weights}"


def weights_entry(weights: str) -> dict:
    """The weight format as a made file's recorded source gives it: nothing for I2V (the sources of
    files made before weight formats existed still match), else {"weights": weights}."""
    return {} if weights == "i2v" else {"weights": weights}


def cache_path(model_dir: Path, head: str, weights: str = "i2v") -> Path:
    """The cache file of a checkpoint directory, head format and weight format: one per triple (the I2V
    file keeps the name it had before weight formats existed). What the checkpoint held when it was
    converted is recorded inside (source_identity), so a changed checkpoint replaces its file rather than
    leaving one more beside it."""
    h = _sha256(f"{format_tag(head, weights, '|')}|{model_dir.resolve()}".encode())
    return cache_dir() / f"{model_dir.resolve().name}-{format_tag(head, weights)}-{h.hexdigest()[:16]}.safetensors"


def source_identity(model_dir: Path, head: str, weights: str = "i2v") -> dict:
    """What a native file is made from, cheap to compute at every load: the directory, the head and
    weight formats, and the size and modification time (ns) of config.json, the shard index and each
    weight file."""
    from .hub import weight_files
    files = [model_dir / "config.json", model_dir / "model.safetensors.index.json", *weight_files(model_dir)]
    stats = {}
    for f in files:
        with contextlib.suppress(FileNotFoundError):  # the index, for a checkpoint of one file
            s = f.stat()
            stats[f.name] = [s.st_size, s.st_mtime_ns]
    return {"dir": str(model_dir.resolve()), "head": head, "weights": weights, "files": stats}


def _stale(recorded, source: dict) -> str | None:
    """Why a file made from `recorded` does not hold `source` (source_identity, or any JSON object naming
    the origin), or None."""
    if recorded == source:
        return None
    if not isinstance(recorded, dict):
        return "its record of what it was made from is missing or malformed"
    for k in sorted(set(source) - {"files"}):
        if recorded.get(k) != source[k]:
            return f"it was made from {k} {recorded.get(k)!r}, not {source[k]!r}"
    was, now = recorded.get("files"), source.get("files")
    if isinstance(was, dict) and isinstance(now, dict):
        for name in sorted(set(was) | set(now)):
            if name not in now:
                return f"the checkpoint's {name} is gone since it was converted"
            if name not in was:
                return f"the checkpoint has a new {name} since it was converted"
            if was[name] != now[name]:
                return f"the checkpoint's {name} changed since it was converted"
    return "it was made from something else"


class _Unusable(Exception):
    """A native file that cannot be used as it is; the message is the reason, without the file name."""


def _checked_header(path: Path, source: dict | None = None) -> tuple[dict, int, dict]:
    """(header, data offset, metadata) of a native file whose header holds together: a whole
    safetensors file of this format whose data section has the size its metadata records, made from
    `source` (when given). Raises _Unusable. Reads the header only (a few kB)."""
    try:
        header, start = st.read_header(path)
    except st.DamagedFile as e:
        raise _Unusable(e.reason) from None
    meta = header.get("__metadata__") or {}
    fmt = meta.get("bitlm_format")
    if fmt is None:
        raise _Unusable("not a bitlm native file (no bitlm_format in its metadata)")
    if fmt not in _READABLE:
        raise _Unusable(f"it is in format {fmt!r}; this bitlm reads {' and '.join(_READABLE)}")
    if fmt == "native-v2":  # before weight formats: I2V
        meta = {**meta, "weights": "i2v"}
    if meta.get("weights") not in ("i2v", "t5"):
        raise _Unusable(f"its metadata records weights {meta.get('weights')!r}, not i2v or t5")
    # the entries tile the data section exactly (read_header checks it against the file's size)
    size = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if meta.get("data_size") != str(size):
        raise _Unusable(f"its metadata records {meta.get('data_size')!r} bytes of data, the file holds {size}")
    if source is not None:
        try:
            recorded = json.loads(meta.get("source", ""))
        except json.JSONDecodeError:
            recorded = None
        if fmt == "native-v2" and isinstance(recorded, dict) and "dir" in recorded:
            recorded.setdefault("weights", "i2v")
        why = _stale(recorded, source)
        if why:
            raise _Unusable(why)
    return header, start, meta


def _problem(path: Path, source: dict) -> str | None:
    """Why the cache file `path` must be (re)built, or None when it can be used."""
    if not path.exists():
        return _MISSING
    try:
        _checked_header(path, source)
    except (_Unusable, BitlmError) as e:  # BitlmError: the file cannot be read at all
        return str(e)
    return None


def _cache_error(where: Path, e: OSError) -> BitlmError:
    return BitlmError(f"cannot write the native cache {where} ({e.strerror or e}); set BITLM_CACHE to a "
                      "writable directory")


@contextlib.contextmanager
def _lock(dest: Path):
    """An exclusive lock on dest's conversion (a lock file beside it, kept: removing it would race with
    a process about to take it). Without fcntl (Windows) there is no lock, and concurrent converters
    each write their own temporary file; the last rename wins, a whole file either way."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest.parent / f".{dest.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _cache_error(dest.parent, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


_announce: contextvars.ContextVar[bool] = contextvars.ContextVar("bitlm_native_announce", default=False)


def ensure_file(dest: Path, source: dict, build, what: str | None = None) -> bool:
    """Make sure `dest` is a usable native file of `source`, calling build() (which writes dest) when it
    is missing or unusable, with one line on stderr saying why when a file was there. True when it was
    built here. The check is the header's alone; building happens under a lock, and the check is made
    again once the lock is held: a process that waited finds the file its peer made. A first
    conversion of `what` (the model's name) says so in one line, and save() draws a progress bar."""
    if _problem(dest, source) is None:
        return False
    with _lock(dest):
        reason = _problem(dest, source)
        if reason is None:
            return False
        # temporary files of conversions that were killed (atomic_file's names); none is being
        # written, since every converter of dest holds this lock
        leftovers = glob.glob(os.path.join(glob.escape(str(dest.parent)), f".{glob.escape(dest.name)}.*.tmp"))
        for f in leftovers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
        if reason == _MISSING and leftovers:
            reason = "an earlier conversion was interrupted (its partial file is removed)"
        if reason != _MISSING:
            print(f"bitlm: rebuilding the native file {dest}: {reason}", file=sys.stderr)
        elif what is not None:
            print(f"bitlm: converting {what} for the native runtime (once; cached in {dest.parent})",
                  file=sys.stderr)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _cache_error(dest.parent, e) from None
        token = _announce.set(True)
        try:
            build()
        finally:
            _announce.reset(token)
        st.release_page_cache(dest)  # its first load maps it in 2 MB folios (st.advise_huge_pages)
        return True


def convert(model_dir, dest, head: str = "q8", source: dict | None = None, weights: str = "i2v") -> Path:
    """Write the native file of a Hugging Face checkpoint directory (atomically). A packed checkpoint
    (quantization_mode offline, as microsoft/bitnet-b1.58-2B-4T) is converted tensor by tensor from its
    files, without torch; a latent one goes through the torch model, whose quantizer makes the codes.
    source: what the metadata records the file is made from (default: source_identity of model_dir).
    weights: the projections' packed format, "i2v" or "t5" (engine/native.py WEIGHTS)."""
    from ..engine.native import check_weights
    from .hub import read_config
    check_weights(weights)
    cfg = read_config(Path(model_dir))
    source = source or source_identity(Path(model_dir), head, weights)
    return (convert_packed if cfg.quantization_mode == "offline" else convert_via_torch)(model_dir, dest, head,
                                                                                          source, weights)


def convert_via_torch(model_dir, dest, head: str = "q8", source: dict | None = None, weights: str = "i2v") -> Path:
    """convert() through bitlm's torch model, in the checkpoint's torch_dtype (any checkpoint)."""
    import torch

    from ..engine.native import arrays_from_model
    from .hf import load
    from .hub import read_config
    cfg = read_config(Path(model_dir))
    dtype = torch.bfloat16 if cfg.torch_dtype == "bfloat16" else torch.float32
    model = load(model_dir, dtype=dtype, tokenizer=False)
    save(arrays_from_model(model, head, weights=weights), model.config, dest, head,
         source or source_identity(Path(model_dir), head, weights=weights), weights=weights)
    return Path(dest)


def convert_packed(model_dir, dest, head: str = "q8", source: dict | None = None, weights: str = "i2v") -> Path:
    """convert() of a packed checkpoint from its memory-mapped files, one projection in memory at a
    time: the same file, byte for byte, as convert_via_torch (a test checks it), in a fraction of the
    time and memory. Float tensors take the model's dtype on the way, as loading it would: bf16
    (rounded to nearest even) when config.json's torch_dtype is bfloat16, else float32."""
    from ..engine.native import head_arrays
    arrays, cfg = packed_arrays(model_dir, weights=weights)
    rows = arrays["embed"] if cfg.tie_word_embeddings else arrays.pop("head")
    arrays.update(head_arrays(rows, head))
    save(arrays, cfg, dest, head, source or source_identity(model_dir, head, weights), weights=weights)
    return Path(dest)


def packed_arrays(model_dir, exact: bool = False, weights: str = "i2v") -> tuple[dict, BitNetConfig]:
    """The native array dict of a packed checkpoint with the head as rows ("head" only when untied),
    the projections made lazily in the weight format `weights` (st.Lazy, each filled as it is written;
    their codes checked then), and the config. exact=False gives the float tensors the model's dtype, as
    convert_packed needs; exact=True keeps them as the files hold them (bf16 as bits, other floats as
    float32) and the scales unrounded: `bitlm convert`, without torch."""
    from ..engine.native import NORMS, PROJS, WEIGHT_MODULES, bf16_to_f32, f32_to_bf16
    from . import names
    from .checkpoint import check_scale, open_checkpoint, scale_value
    ck = open_checkpoint(model_dir)  # every tensor present, of the dtype kind and shape config.json implies
    cfg = ck.config
    arrays_of = {f: st.map_arrays(f, header, start) for f, (header, start) in ck.headers.items()}
    bf16 = cfg.torch_dtype == "bfloat16" and not exact

    def get(key):
        return arrays_of[ck.where[key]][key]  # BF16 is mapped as uint16 bits

    def model_dtype(a):  # the values the torch model would hold: bf16 bits (uint16) or float32
        if a.dtype == np.uint16:  # BF16 in the file
            return a if bf16 or exact else bf16_to_f32(a)
        return f32_to_bf16(a) if bf16 else np.asarray(a, dtype=np.float32)

    def as_f32(a):  # a float32 copy of what the model holds (norms)
        a = model_dtype(a)
        return bf16_to_f32(a) if a.dtype == np.uint16 else np.array(a, dtype=np.float32)

    arrays = {"embed": model_dtype(get(names.EMBED)), "final_norm": as_f32(get(names.FINAL_NORM))}
    scales = np.zeros((cfg.num_hidden_layers, len(PROJS)), np.float32)
    shapes = cfg.projection_shapes()
    for l in range(cfg.num_hidden_layers):
        for name in NORMS:
            arrays[f"{l}.{name}"] = as_f32(get(names.layer(l, name) + ".weight"))
        for j, name in enumerate(PROJS):
            out_f, in_f = shapes[name]
            key = names.layer(l, name)
            packed = get(key + ".weight")
            scale = scale_value(get(key + ".weight_scale"), ck.dtype(key + ".weight_scale"))
            check_scale(scale, key + ".weight_scale", ck.where[key + ".weight_scale"])
            # the older "bitlinear" class stores the reciprocal and divides; the model's dtype then
            # rounds the scale too (it keeps the bf16 value in float32)
            scale = np.array([np.float32(1) / scale if cfg.linear_class == "bitlinear" else scale], np.float32)
            scales[l, j] = bf16_to_f32(f32_to_bf16(scale))[0] if bf16 else scale[0]
            arrays[f"{l}.{name}"] = st.Lazy(WEIGHT_MODULES[weights].packed_shape(out_f, in_f), np.uint8,
                                            lambda p=packed, k=key, o=out_f: _packed_checked(p, k, o, ck, weights))
    arrays["scales"] = scales
    if not cfg.tie_word_embeddings:
        arrays["head"] = model_dtype(get(names.LM_HEAD))
    return arrays, cfg


def _packed_checked(packed: np.ndarray, key: str, out_features: int, ck, weights: str) -> np.ndarray:
    from ..engine.native import pack_projection
    from .checkpoint import check_ternary_codes
    check_ternary_codes(packed, key + ".weight", ck.where[key + ".weight"])
    return pack_projection(packed, out_features, weights)


def save(arrays: dict[str, np.ndarray], config: BitNetConfig, dest, head: str, source: dict,
         extra: dict[str, str] | None = None, weights: str = "i2v") -> None:
    """Write the native file (atomically). source: what it is made from (source_identity, or any JSON
    object naming the origin), recorded for later loads to compare; extra: more metadata (the
    tokenizer, from `bitlm convert`). Lazy arrays are made in dict order: "scales" is written last,
    after the projections whose makers may fill it. Inside ensure_file, a progress bar (stderr)."""
    from .progress import Progress
    bf16 = {"embed", "head"}  # uint16 arrays there are bf16 bit patterns
    tensors = {k: ("BF16", v) if k in bf16 and v.dtype == np.uint16 and not isinstance(v, st.Lazy) else v
               for k, v in arrays.items() if k != "scales"}
    tensors["scales"] = arrays["scales"]
    with Progress(len(tensors), "converting", enabled=_announce.get()) as bar:
        st.write(dest, tensors, {**metadata(config, head, source, tensors, weights), **(extra or {})},
                 progress=bar)


def retarget(arrays: dict, config: BitNetConfig, weights: str, lazy: bool = True, source: str = "i2v") -> dict:
    """The native array dict with its projections (in format `source`) in the weight format `weights`,
    exactly: the codes unpacked and packed again (formats/i2v.py, formats/t5.py). lazy: each made as it
    is written (st.Lazy, one projection in memory at a time; a lazy input projection is made first, and
    its maker may fill "scales", which save writes last); else made now."""
    from ..engine.native import PROJS, WEIGHT_MODULES, check_weights, pack_projection
    from ..formats import hf_packed
    if check_weights(weights) == check_weights(source):
        return arrays
    shapes = config.projection_shapes()
    out = dict(arrays)
    for l in range(config.num_hidden_layers):
        for name in PROJS:
            key, (n, k) = f"{l}.{name}", shapes[name]

            def make(a=arrays[key], n=n, k=k):
                codes = WEIGHT_MODULES[source].unpack(a.make() if isinstance(a, st.Lazy) else a, n, k)
                return pack_projection(hf_packed.pack(codes), n, weights)
            out[key] = st.Lazy(WEIGHT_MODULES[weights].packed_shape(n, k), np.uint8, make) if lazy else make()
    return out


def metadata(config: BitNetConfig, head: str, source: dict, tensors: dict, weights: str = "i2v") -> dict[str, str]:
    """The native file's metadata (module docstring) for the tensors st.write is given."""
    return {"bitlm_format": FORMAT, "config": json.dumps(config.to_hf()), "head": head, "weights": weights,
            "data_size": str(st.data_size(tensors)), "source": json.dumps(source, sort_keys=True)}


def open_native(path, max_len: int | None = None, kv: str = "f16", mmap: bool = True, source: dict | None = None):
    """A NativeModel over the file. mmap=True: the weights stay memory-mapped (instant, the page
    cache shared with other processes); False: they are read into memory, on transparent huge pages
    where the kernel offers them (here decode 3-5% faster, prompts 4% slower; the read takes 0.2 s
    from the page cache, several seconds where fresh memory is slow to fault in, as in this VM). The
    embedding stays in the file either way (its rows are read as needed). A file that is damaged, of
    another format, or (source given) not made from `source` is a BitlmError."""
    from ..engine.native import NativeArrays, NativeModel
    path = Path(path)
    try:
        header, start, meta = _checked_header(path, source)
    except _Unusable as e:
        raise BitlmError(f"{path}: {e}; convert the checkpoint again") from None
    arrays = st.map_arrays(path, header, start)
    try:
        config = BitNetConfig.from_hf(json.loads(meta["config"]), source=f"{path} (metadata)")
    except (KeyError, ValueError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise BitlmError(f"{path}: metadata has no readable config ({type(e).__name__}: {str(e)[:120]}); "
                         "convert the checkpoint again") from None
    if mmap:
        st.advise_huge_pages(arrays)
    else:
        arrays.update(st.read_to_memory(arrays, [k for k in arrays if k != "embed"]))
    if "embed" in arrays:
        st.prefetch_to_page_cache(arrays["embed"])  # its rows are read with pread as tokens need them
    return NativeModel(config, NativeArrays(arrays, meta["weights"]), max_len=max_len, kv=kv)


def load_native(path_or_repo_id, head: str = "q8", max_len: int | None = None, revision: str | None = None,
                kv: str = "f16", mmap: bool = True, tokenizer: bool = True, weights: str = "i2v"):
    """A Hugging Face checkpoint (directory or repo id), or a GGUF file (io/gguf_read.py), on the native
    runtime, converting it once (per head and weight format: weights "i2v", 2 bits, "t5", 1.6 bits, or
    "auto", the one faster on this CPU: engine/native.resolve_weights).
    tokenizer=False leaves the tokenizer out (nm.tokenizer None): Llama 3's takes 70 MB of memory, which
    a benchmark of token ids does not need. kv: the KV cache type, engine.native.KV_KINDS ("f16", "f32",
    or "q8_0": 8-bit blocks, formats/q8_0.py)."""
    from ..engine.native import HEADS, check_kv, resolve_weights
    from ..engine.tokenizer import Tokenizer
    from . import gguf_read
    from .checkpoint import open_checkpoint
    if head not in HEADS:
        raise BitlmError(f"head format {head!r} is not one of {', '.join(HEADS)}")
    weights = resolve_weights(weights)
    check_kv(kv)
    if gguf_read.is_gguf(path_or_repo_id):  # a GGUF file (by its first bytes): converted once the same way
        return gguf_read.load_native(path_or_repo_id, head=head, max_len=max_len, kv=kv, mmap=mmap,
                                     tokenizer=tokenizer, weights=weights)
    ck = open_checkpoint(path_or_repo_id, revision)  # a broken checkpoint fails here, cached or not
    model_dir = ck.path
    dest = cache_path(model_dir, head, weights)
    source = source_identity(model_dir, head, weights)
    if ck.config.quantization_mode != "offline" and _problem(dest, source) is not None:
        import torch  # noqa: F401  (a latent checkpoint converts through the torch model: without torch,
        # its one-line error comes before the line that announces a conversion)
    converted = ensure_file(dest, source, lambda: convert(model_dir, dest, head, source, weights),
                            what=str(model_dir))
    nm = open_native(dest, max_len=max_len, kv=kv, mmap=mmap, source=source)
    if tokenizer:
        nm.tokenizer = Tokenizer.from_dir(model_dir, ck.config)
    nm.source = {"path": str(model_dir), "format": "native", "file": str(dest), "converted": converted}
    return nm


def to_torch(arrays: dict[str, np.ndarray], config: BitNetConfig, dtype=None, weights: str | None = None):
    """The packed torch model holding the same weights as a native array dict (the head comes from
    the embedding when tied, else from f32/bf16 head rows; a q8-only untied head cannot go back).
    weights: the projections' format (None: the one a NativeArrays dict records, else i2v)."""
    weights = weights or getattr(arrays, "weights", "i2v")
    import torch

    from ..engine.native import NORMS, PROJS, WEIGHT_MODULES, bf16_to_f32
    from ..formats import hf_packed
    from ..model import BitNetForCausalLM
    dtype = dtype or torch.float32

    def tensor(a):  # a writable float32 copy (the arrays may be read-only mappings)
        return torch.from_numpy(np.array(bf16_to_f32(a) if a.dtype == np.uint16 else a, dtype=np.float32))

    model = BitNetForCausalLM.empty(config, linear="packed")
    shapes = config.projection_shapes()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(tensor(arrays["embed"]))
        if not config.tie_word_embeddings:
            if "head" not in arrays:
                raise BitlmError("to_torch: an untied int8 (q8) head cannot be turned back into float rows")
            model.lm_head.weight.copy_(tensor(arrays["head"]))
        model.model.norm.weight.copy_(tensor(arrays["final_norm"]))
        for l, block in enumerate(model.model.layers):
            for name in NORMS:
                block.get_submodule(name).weight.copy_(tensor(arrays[f"{l}.{name}"]))
            for j, name in enumerate(PROJS):
                n_out, n_in = shapes[name]
                m = block.get_submodule(name)
                packed = arrays[f"{l}.{name}"]
                packed = packed.make() if isinstance(packed, st.Lazy) else packed  # packed_arrays' lazies
                codes = WEIGHT_MODULES[weights].unpack(np.asarray(packed), n_out, n_in)
                m.weight.copy_(torch.from_numpy(hf_packed.pack(codes)))
                m.weight_scale.fill_(float(arrays["scales"][l, j]))
    return model.to(dtype)
