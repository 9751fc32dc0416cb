"""`bitlm bench`: prompt processing and generation speed, load time and peak memory, llama-bench style.

Runs on the native runtime (that is what is being measured) and imports no torch, so the peak
resident memory it reports is the model's, not a framework's. `--shape NAME` benchmarks a random model of
a preset's shape (e.g. 2b4t), written once as a native file in the cache and then loaded like any other.

`--device cuda` measures the torch model on a GPU instead, its packed products done by the Triton
kernels (bitlm.gpu): random_torch_model and run_torch, the same two tests, torch imported in them only.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np



def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux VmHWM, the high-water mark of its own address
    space: ru_maxrss would also carry the peak of the process it was forked from across the exec (a
    benchmark worker started by a parent that held 6 GB reported 6 GB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux and BSD report KiB


def synthetic_native_file(shape: str, head: str = "q8", seed: int = 0, weights: str = "i2v") -> Path:
    """A native file of random weights shaped like preset `shape` (made once, streamed to disk). The
    same seed gives the same weights in either weight format (the codes are drawn in the same order)."""
    from ..config import preset
    from ..io.native import cache_dir, ensure_file, format_tag, weights_entry
    from .native import check_weights
    check_weights(weights)
    path = cache_dir() / f"random-{shape}-{format_tag(head, weights)}-seed{seed}.safetensors"
    source = {"synthetic": shape, "head": head, "seed": seed, **weights_entry(weights)}
    ensure_file(path, source, lambda: _write_synthetic(path, preset(shape), head, seed, source, weights))
    return path


def _write_synthetic(path: Path, cfg, head: str, seed: int, source: dict, weights: str = "i2v") -> None:
    from ..io import st
    from ..io.native import metadata
    from ..formats import hf_packed
    from .native import NORMS, PROJS, WEIGHT_MODULES, f32_to_bf16, head_arrays, pack_projection
    fmt = WEIGHT_MODULES[weights]
    rng = np.random.default_rng(seed)
    V, H = cfg.vocab_size, cfg.hidden_size
    tensors: dict = {}

    made = {}  # the embedding, kept until the head (tied to it) has been made from it

    def embed_rows():
        made["embed"] = f32_to_bf16(rng.standard_normal((V, H), dtype=np.float32))
        return made["embed"]

    tensors["embed"] = st.Lazy((V, H), np.uint16, embed_rows, "BF16")
    tensors["final_norm"] = np.ones(H, np.float32)
    tensors["scales"] = (rng.random((cfg.num_hidden_layers, len(PROJS)), dtype=np.float32) + 0.5)
    norm_sizes = dict(zip(NORMS, (H, H, cfg.q_size, cfg.intermediate_size)))
    shapes = cfg.projection_shapes()
    for l in range(cfg.num_hidden_layers):
        for n in NORMS:
            tensors[f"{l}.{n}"] = np.ones(norm_sizes[n], np.float32)
        for name in PROJS:
            n_out, n_in = shapes[name]
            tensors[f"{l}.{name}"] = st.Lazy(
                fmt.packed_shape(n_out, n_in), np.uint8,  # packed in C where built (pack_projection)
                lambda n_out=n_out, n_in=n_in: pack_projection(
                    hf_packed.pack(rng.integers(-1, 2, (n_out, n_in), dtype=np.int8)), n_out, weights))
    # the head is tied to the embedding: made from the same rows, in the chosen format
    for name, (shape, dtype) in {"q8": {"head.q8": ((V, H), np.int8), "head.scale": ((V,), np.float32),
                                        "head.rowsum": ((V,), np.int32)},
                                 "q6": {"head.q6": ((V, -(-H // 64) * 48), np.uint8), "head.scale": ((V,), np.float32)},
                                 "f32": {"head": ((V, H), np.float32)},
                                 "bf16": {"head": ((V, H), np.uint16)}}[head].items():
        def make(name=name):
            if "head" not in made:
                made["head"] = head_arrays(made.pop("embed"), head)
            return made["head"][name]
        tensors[name] = st.Lazy(shape, dtype, make, "BF16" if dtype == np.uint16 else None)
    st.write(path, tensors, metadata(cfg, head, source, tensors, weights))


class _TokenSource:
    """Random token ids from the standard library's generator: numpy.random imports `secrets`, which
    maps OpenSSL (3.6 MB resident), and this process's peak memory is meant to be the runtime's."""

    def __init__(self, seed: int, vocab_size: int):
        import random
        self.r, self.V = random.Random(seed), vocab_size

    def token(self) -> int:
        return self.r.randrange(self.V)

    def tokens(self, n: int) -> np.ndarray:
        return np.array([self.token() for _ in range(n)], dtype=np.int32)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(nm, threads: int, n_prompt: int, n_gen: int, reps: int, seed: int = 0, depth: int = 0) -> list[dict]:
    """llama-bench's two tests: pp<n_prompt> (one batch) and tg<n_gen> (one token at a time, each next
    token the argmax of the last logits); one warm-up run of each first. depth (llama-bench's -d): the
    tests start after `depth` tokens already in the context (filled once, untimed; each run rolls the
    cache back to them), as a long conversation or document does; 0, an empty context. With no test
    to run (n_prompt and n_gen 0, as `bitlm bench -p 0` asks), nothing is filled or run."""
    if not n_prompt and not n_gen:
        return []
    from ..kernels import set_num_threads
    set_num_threads(threads)
    rng = _TokenSource(seed, nm.config.vocab_size)
    _fill(nm, rng, depth)
    records = []
    if n_prompt:
        prompt = rng.tokens(n_prompt)

        def pp():
            _prefill(nm, prompt, depth)

        pp()
        times = [_timed(pp) for _ in range(reps)]
        records.append(_record(nm, threads, n_prompt, 0, [n_prompt / t for t in times], depth))
    if n_gen:
        def tg():
            _generate(nm, rng.token(), n_gen, depth)

        tg()
        times = [_timed(tg) for _ in range(reps)]
        records.append(_record(nm, threads, 0, n_gen, [n_gen / t for t in times], depth))
    return records


def _fill(nm, rng: _TokenSource, depth: int) -> None:
    """The context of the tests at `depth` (llama-bench's -d): that many random tokens from position 0,
    untimed; each test then rolls the cache back to them."""
    if depth:
        nm.reset()
        nm.forward(rng.tokens(depth), n_out=1)


def _prefill(nm, prompt, depth: int = 0) -> None:
    """llama-bench's pp test: one batch of prompt tokens after the first `depth` of the context."""
    nm.truncate(depth)
    nm.forward(prompt, n_out=1)


def _generate(nm, tok: int, n: int, depth: int = 0) -> None:
    """llama-bench's tg test: n tokens one at a time after the first `depth` of the context, each the
    argmax of the last."""
    nm.truncate(depth)
    for _ in range(n):
        tok = int(nm.forward([tok], n_out=1)[0].argmax())


def _record(nm, threads, n_prompt, n_gen, samples, depth: int = 0) -> dict:
    sizes = nm.nbytes
    return {
        "build_commit": os.environ.get("BITLM_COMMIT", ""),
        "model_filename": getattr(nm, "source", {}).get("file", ""),
        "model_type": (f"bitnet {nm.config.num_hidden_layers}L {nm.config.hidden_size}H ternary {nm.weights}, "
                       f"head {nm.head_format}, kv {nm.kv}"),
        "model_size": sizes["ternary"] + sizes["head"] + sizes["embedding"] + sizes["norms"],
        "model_n_params": nm.config.num_parameters()["total"],
        "n_threads": threads,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "n_depth": depth,
        "avg_ts": statistics.mean(samples),
        "stddev_ts": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "median_ts": statistics.median(samples),
        "samples_ts": samples,
    }


def test_name(r: dict) -> str:
    """A record's test as llama-bench names it: pp512, tg128, tg128 @ d4096."""
    name = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
    return f"{name} @ d{r['n_depth']}" if r.get("n_depth") else name


def phase_breakdown(nm, threads: int, n_prompt: int, n_gen: int, seed: int = 0,
                    depth: int = 0) -> dict[str, dict[str, float]]:
    """Milliseconds per token in each phase of the C forward (bitnet.h BN_PROF_*), for one profiled
    pp<n_prompt> batch and one tg<n_gen> run like those of `run` (after `depth` tokens of context);
    "total" is their sum."""
    from ..kernels import set_num_threads
    from .native import profile
    set_num_threads(threads)
    rng = _TokenSource(seed, nm.config.vocab_size)
    _fill(nm, rng, depth)
    prompt = rng.tokens(n_prompt)
    out = {}
    for n_p, n_g, test in ((n_prompt, 0, lambda: _prefill(nm, prompt, depth)),
                           (0, n_gen, lambda: _generate(nm, rng.token(), n_gen, depth))):
        if not n_p + n_g:
            continue
        profile(nm, True, reset=True)
        test()
        phases = profile(nm, False)
        ms = {k: 1e3 * v / (n_p + n_g) for k, v in phases.items()}
        ms["total"] = sum(ms.values())
        out[test_name({"n_prompt": n_p, "n_gen": n_g, "n_depth": depth})] = ms
    return out



# ---- the torch model (bench --device cuda) -------------------------------------------------------
def random_torch_model(shape: str, device, dtype=None, kernel: str = "auto", seed: int = 0):
    """A packed torch model of preset `shape` with random ternary codes, made on `device` (no download,
    no copy through the CPU); its products by `kernel` (bitlm.gpu.resolve_kernel)."""
    import torch

    from ..config import preset
    from ..gpu import check_device, resolve_kernel
    from ..model import BitNetForCausalLM
    dev = check_device(device)
    kernel = resolve_kernel(dev, kernel)
    cfg = preset(shape)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.device(dev):
        model = BitNetForCausalLM(cfg, linear="packed")  # embedding and norms initialised on the device
        for _, m in model.ternary_layers():
            codes = torch.randint(0, 3, (4, *m.weight.shape), generator=g, dtype=torch.uint8)  # c = w + 1
            m.weight.copy_(codes[0] | codes[1] << 2 | codes[2] << 4 | codes[3] << 6)
            m.weight_scale.fill_(m.in_features ** -0.5)
    model.to(dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32))
    model.requires_grad_(False)
    if kernel == "triton":
        from ..gpu.linear import use_triton
        use_triton(model)
    model.source = {"file": f"random {shape}"}
    return model


def run_torch(model, n_prompt: int, n_gen: int, reps: int, seed: int = 0) -> list[dict]:
    """`run`'s two tests on a torch model (BitNetForCausalLM): pp<n_prompt> and tg<n_gen>, the device
    synchronised before each clock reading."""
    import torch
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    rng = _TokenSource(seed, model.config.vocab_size)
    cache = model.new_cache(max_len=n_prompt + n_gen + 1)
    records = []

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    with torch.inference_mode():
        if n_prompt:
            ids = torch.from_numpy(rng.tokens(n_prompt)).long()[None].to(model.device)

            def pp():
                cache.reset()
                model(ids, cache, logits_to_keep=1)

            pp()
            records.append(_torch_record(model, n_prompt, 0, [n_prompt / timed(pp) for _ in range(reps)]))
        if n_gen:
            def tg():
                cache.reset()
                tok = torch.tensor([[rng.token()]], device=model.device)
                for _ in range(n_gen):
                    tok = model(tok, cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)

            tg()
            records.append(_torch_record(model, 0, n_gen, [n_gen / timed(tg) for _ in range(reps)]))
    return records


def measure_torch(model_path, shape, device, n_prompts, n_gens, reps: int) -> list[dict]:
    """bench --device cuda: the checkpoint at `model_path` (or a random model of preset `shape`) on
    `device` in bf16, run_torch for each prompt and generation length; load time and the device's peak
    memory in every record."""
    import torch
    t0 = time.perf_counter()
    if shape:
        model = random_torch_model(shape, device)
    else:
        from ..io.hf import load
        model = load(model_path, device=device, dtype=torch.bfloat16, tokenizer=False)
    load_s = time.perf_counter() - t0
    records = [r for n in n_prompts for r in run_torch(model, n, 0, reps)]
    records += [r for n in n_gens for r in run_torch(model, 0, n, reps)]
    peak = torch.cuda.max_memory_allocated(model.device) if model.device.type == "cuda" else 0
    for r in records:
        r["load_s"], r["peak_gpu_bytes"] = load_s, peak
    return records


def _torch_record(model, n_prompt, n_gen, samples) -> dict:
    import torch
    cfg = model.config
    size = sum(t.numel() * t.element_size() for t in {id(t): t for t in
               [*model.parameters(), *model.buffers()]}.values())
    kernel = getattr(model, "kernel", "torch")
    return {
        "build_commit": os.environ.get("BITLM_COMMIT", ""),
        "model_filename": (model.source or {}).get("file", (model.source or {}).get("path", "")),
        "model_type": f"bitnet {cfg.num_hidden_layers}L {cfg.hidden_size}H ternary, {str(model.dtype)[6:]}",
        "model_size": size,
        "model_n_params": cfg.num_parameters()["total"],
        "backend": f"{kernel} ({model.device.type})",
        "n_threads": torch.get_num_threads(),
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "avg_ts": statistics.mean(samples),
        "stddev_ts": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "median_ts": statistics.median(samples),
        "samples_ts": samples,
    }
