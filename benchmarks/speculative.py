"""Speculative decoding beside plain decoding on an input-grounded workload, native runtime.

The workload: a passage given in the prompt that the model is to repeat (as summarizing and
code-editing users quote their input back), greedy. Plain decoding, then prompt lookup and a draft model
at each --draft-max (k; with the adaptive schedule, k at most, and with k fixed), in the same process,
alternating within each round; medians over --rounds.

    python benchmarks/speculative.py                          # the bundled Shakespeare model, ~10 s
    python benchmarks/speculative.py -m microsoft/bitnet-b1.58-2B-4T --chat --draft-layers 6 -t 2 --rounds 5
    python benchmarks/speculative.py --shape 2b4t --draft-layers 4 -t 2   # random weights: the costs only

Models: -m MODEL (a checkpoint with its tokenizer), the bundled model (default), or --shape NAME, random
weights of a preset's shape (bitlm bench's synthetic file) with a prompt of a random passage repeated:
random weights do not copy, so there the acceptance rate is whatever greedy loops give, and the figures
to read are the costs. Draft: --draft MODEL (sharing the tokenizer), or --draft-layers N, the target's
own first N blocks then its final norm and head (an early-exit draft: no second file, shares the pages).

Columns: tokens/s = new tokens / (generation time - the prompt's prefill time, measured alone), so both
sides are charged the same for the prompt; speedup = over plain decoding in the same round (median of the
per-round ratios); acceptance = accepted / drafted tokens; tok/round = tokens per forward of the target
after the prompt; same = the greedy output equals plain decoding's token for token (it must).
A "verify cost" table gives the time of one forward of k + 1 rows over one of 1 row at the prompt's end:
speedup ~ (tokens per round) / (verify cost of k + 1 rows + drafting time), which with an acceptance
rate measured elsewhere predicts other workloads.

--llama-cpp [GGUF] adds llama.cpp in the same rounds (llama-cpp-python, as cpu_inference.py runs it):
plain greedy decoding and its prompt-lookup speculation (llama_cpp's LlamaPromptLookupDecoding, n-grams up
to --lookup-ngram, k = each --draft-max drafted a round, verified in one eval). GGUF: a file of the same
model; with --shape 2b4t and no file, cpu_inference.py's TQ2_0 GGUF of the same random weights (Q8_0
head). llama.cpp keeps the prompt cached between runs (its prefix reuse replays the prompt's last token),
so its tokens/s is the generation alone, as bitlm's.

    python benchmarks/speculative.py --shape 2b4t -t 2 --rounds 3 -n 64 --draft-max 4 8 --llama-cpp
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import numpy as np

PASSAGE = """\
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life;
For who would bear the whips and scorns of time,
The oppressor's wrong, the proud man's contumely,
The pangs of despised love, the law's delay,
The insolence of office and the spurns
That patient merit of the unworthy takes,
When he himself might his quietus make
With a bare bodkin? who would fardels bear,
To grunt and sweat under a weary life,
But that the dread of something after death,
The undiscover'd country from whose bourn
No traveller returns, puzzles the will
And makes us rather bear those ills we have
Than fly to others that we know not of?
"""


def load(args):
    """(target NativeLM, draft NativeLM or None, prompt ids)."""
    import bitlm
    from bitlm.engine.native import NativeLM
    if args.shape:
        from bitlm.engine.bench import synthetic_native_file
        from bitlm.io.native import open_native
        from bitlm.engine.native import resolve_weights
        nm = open_native(synthetic_native_file(args.shape, args.head, weights=resolve_weights(args.weights)),
                         max_len=args.ctx, kv="f16")
        passage = np.random.default_rng(0).integers(0, nm.config.vocab_size, args.passage_tokens).tolist()
        prompt = passage * 2 + passage[:8]
    else:
        from bitlm.data import bundled_model_dir
        nm = bitlm.load_native(args.model or bundled_model_dir(), head=args.head, max_len=args.ctx,
                               weights=args.weights)
        prompt = make_prompt(nm.tokenizer, nm.config.max_position_embeddings if args.ctx is None else args.ctx,
                             args)
    target = NativeLM(nm)
    draft = None
    if args.draft:
        draft = NativeLM(bitlm.load_native(args.draft, head=args.head, max_len=args.ctx))
    elif args.draft_layers:
        draft = NativeLM(first_layers(nm, args.draft_layers))
    return target, draft, prompt


def first_layers(nm, n: int):
    """A NativeModel of nm's first n blocks and its final norm and head (the same arrays, not copies)."""
    from bitlm.engine.native import NativeModel
    if not 0 < n < nm.config.num_hidden_layers:
        sys.exit(f"--draft-layers must be in 1 .. {nm.config.num_hidden_layers - 1}")
    arrays = {k: v for k, v in nm.arrays.items() if not (k[0].isdigit() and int(k.split(".")[0]) >= n)}
    arrays["scales"] = nm.arrays["scales"][:n]
    out = NativeModel(dataclasses.replace(nm.config, num_hidden_layers=n), arrays, max_len=nm.max_len, kv=nm.kv)
    out.tokenizer = nm.tokenizer
    return out


def make_prompt(tok, ctx: int, args) -> list[int]:
    """The passage, cut to leave room for it to be repeated and --new-tokens more, then either its first
    line again (a base model continues the repetition) or, with --chat, a request to repeat it."""
    lines = PASSAGE.splitlines(keepends=True)
    while lines:
        passage = "".join(lines)
        if args.chat:
            ids = tok.encode_chat([{"role": "user", "content": "Repeat the following passage word for word.\n\n"
                                    + passage}])
        else:
            ids = tok.encode(passage + "\n" + passage + "\n" + lines[0])
        if len(ids) + args.new_tokens <= ctx:
            return ids
        lines.pop()
    sys.exit(f"the model's context ({ctx}) is too short for the passage and --new-tokens {args.new_tokens}")


def timed_generation(model, prompt, n, spec):
    from bitlm.engine.generate import generate
    t = time.perf_counter()
    it = generate(model, prompt, n, temperature=0, ignore_eos=True, speculative=spec)
    tokens = list(it)
    return time.perf_counter() - t, tokens, getattr(it, "speculative", None)


def prefill_time(nm, prompt, reps=3) -> float:
    times = []
    for _ in range(reps):
        nm.reset()
        t = time.perf_counter()
        nm.forward(prompt, 1)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def verify_costs(nm, prompt, ks, reps=5) -> dict[int, float]:
    """Median time of one forward of k + 1 rows at the prompt's end, over that of 1 row."""
    def t(rows):
        times = []
        for _ in range(reps):
            nm.truncate(len(prompt))
            s = time.perf_counter()
            nm.forward(prompt[:rows], rows)
            times.append(time.perf_counter() - s)
        return statistics.median(times)
    nm.reset()
    nm.forward(prompt, 0)
    one = t(1)
    return {k: t(k + 1) / one for k in ks}


def llama_cpp_model(args, ctx: int):
    """llama_cpp.Llama on --llama-cpp's GGUF (cpu_inference.py's TQ2_0 file with --shape 2b4t), logits of
    every row kept (its speculation samples each verified row)."""
    try:
        import llama_cpp
    except ImportError:
        sys.exit("--llama-cpp needs llama-cpp-python (CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python)")
    path = args.llama_cpp
    if path == "auto":
        if args.shape != "2b4t":
            sys.exit("--llama-cpp without a GGUF: only with --shape 2b4t (cpu_inference.py's TQ2_0 file)")
        from pathlib import Path

        import cpu_inference
        cache = Path.home() / ".cache" / "bitlm" / "bench"
        cache.mkdir(parents=True, exist_ok=True)
        path = cpu_inference.prepare(["llama.cpp-tq2_0"], cache)["llama.cpp-tq2_0"]
    if not os.path.isfile(path):
        sys.exit(f"--llama-cpp {path}: no such file (a GGUF that llama.cpp reads, e.g. bitlm convert --to gguf-tq2_0)")
    return llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=args.threads,
                           n_threads_batch=args.threads, logits_all=True, verbose=False)


def llama_cpp_generation(llm, prompt, n, k, ngram):
    """(seconds, tokens, (evals, drafted)) of n greedy tokens after the cached prompt: plain (k = 0) or
    with llama_cpp's prompt lookup drafting k tokens a round. Counts: the evals of the target (each
    samples one token plus the accepted drafts) and the tokens drafted."""
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    evals, drafted = [0], [0]

    class Lookup(LlamaPromptLookupDecoding):
        def __call__(self, input_ids, /, **kwargs):
            d = super().__call__(input_ids, **kwargs)
            drafted[0] += len(d)
            return d

    llm.draft_model = Lookup(max_ngram_size=ngram, num_pred_tokens=k) if k else None
    ev = llm.eval

    def counted(tokens):
        evals[0] += 1
        return ev(tokens)

    llm.eval = counted
    try:
        t = time.perf_counter()
        tokens = []
        for tok in llm.generate(prompt, temp=0.0):
            tokens.append(tok)
            if len(tokens) == n:
                break
        secs = time.perf_counter() - t
    finally:
        del llm.eval  # the class's method again
    return secs, tokens, (evals[0], drafted[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("-m", "--model", help="a checkpoint (directory or hub id) with its tokenizer")
    src.add_argument("--shape", help="random weights of a preset's shape, e.g. 2b4t")
    ap.add_argument("--draft", help="a draft model sharing the tokenizer")
    ap.add_argument("--draft-layers", type=int, help="an early-exit draft: the target's first N blocks")
    ap.add_argument("--draft-max", type=int, nargs="+", default=[4, 8], help="tokens drafted per round (k)")
    ap.add_argument("--lookup-ngram", type=int, default=3)
    ap.add_argument("--chat", action="store_true", help="ask for the repetition through the chat template")
    ap.add_argument("-n", "--new-tokens", type=int, default=128)
    ap.add_argument("--passage-tokens", type=int, default=400, help="--shape: length of the random passage")
    ap.add_argument("-c", "--ctx", type=int, help="context to allocate (default: the model's)")
    ap.add_argument("--head", default="q6", choices=("q8", "q6", "bf16", "f32"))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--weights", default="auto", choices=("auto", "i2v", "t5"),
                    help="bitlm's ternary weight format (default auto, as bitlm generate's)")
    ap.add_argument("--llama-cpp", nargs="?", const="auto", metavar="GGUF",
                    help="also llama.cpp, plain and with its prompt lookup, on this GGUF of the same model "
                         "(with --shape 2b4t: cpu_inference.py's TQ2_0 file when none is given)")
    args = ap.parse_args(argv)

    from bitlm.engine.speculative import Speculative
    from bitlm.kernels import info, set_num_threads
    set_num_threads(args.threads)
    target, draft, prompt = load(args)
    nm = target.nm
    if args.shape and args.ctx is None and len(prompt) + args.new_tokens > nm.max_len:
        sys.exit("--passage-tokens: the prompt and --new-tokens do not fit the context")
    configs = [("plain", 0, None)]
    for k in args.draft_max:
        for adaptive in (True, False):
            tag = "" if adaptive else " fixed k"
            configs.append(("lookup" + tag, k, Speculative("lookup", draft_max=k, ngram_max=args.lookup_ngram,
                                                            adaptive=adaptive)))
            if draft is not None:
                configs.append(("draft" + tag, k, Speculative("draft", draft_max=k, draft_model=draft,
                                                              adaptive=adaptive)))
    i = info()
    print(f"# {nm.config.num_hidden_layers} layers, hidden {nm.config.hidden_size}, vocab {nm.config.vocab_size}, "
          f"head {nm.head_format}; path {i['path']}, {args.threads} thread(s); prompt {len(prompt)} tokens, "
          f"{args.new_tokens} new; draft: "
          f"{args.draft or (f'first {args.draft_layers} blocks' if args.draft_layers else 'none')}", flush=True)

    llm = None
    if args.llama_cpp:
        llm = llama_cpp_model(args, len(prompt) + args.new_tokens + max(args.draft_max) + 8)
        llama_cpp_generation(llm, prompt, min(8, args.new_tokens), 0, args.lookup_ngram)  # prefill, cached
    runs: dict[str, list] = {}
    plain_tokens = None
    timed_generation(target, prompt, min(8, args.new_tokens), None)  # warm-up: pages, RoPE rows, scratch
    for rnd in range(args.rounds):
        if llm is not None:
            base = cpp_plain = None
            for k in [0, *args.draft_max]:
                secs, tokens, (evals, drafted) = llama_cpp_generation(llm, prompt, args.new_tokens, k,
                                                                      args.lookup_ngram)
                if not k:
                    base, cpp_plain = secs, tokens
                runs.setdefault(f"llama.cpp:{k}", []).append(dict(
                    rate=len(tokens) / secs, speedup=base / secs, same=tokens == cpp_plain,
                    evals=evals, drafted=drafted))
        pre = prefill_time(nm, prompt)
        base = None
        for name, k, spec in configs:
            secs, tokens, stats = timed_generation(target, prompt, args.new_tokens, spec)
            if spec is None:
                plain_tokens, base = tokens, secs - pre
            rate = len(tokens) / max(secs - pre, 1e-9)
            runs.setdefault(f"{name}:{k}", []).append(dict(
                rate=rate, speedup=base / (secs - pre), same=tokens == plain_tokens, stats=stats))
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    med = statistics.median
    print("\n| method | k | tokens/s | speedup | acceptance | tok/round | same |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, k, _ in configs:
        rs = runs[f"{name}:{k}"]
        st = rs[-1]["stats"]
        acc = f"{st.acceptance_rate:.0%}" if st and st.acceptance_rate is not None else "-"
        per = f"{args.new_tokens / st.rounds:.2f}" if st else "1.00"
        print(f"| {name} | {k or '-'} | {med(r['rate'] for r in rs):.1f} | {med(r['speedup'] for r in rs):.2f}x "
              f"| {acc} | {per} | {'yes' if all(r['same'] for r in rs) else 'NO'} |")
    if llm is not None:
        n = args.new_tokens
        for k in [0, *args.draft_max]:
            rs = runs[f"llama.cpp:{k}"]
            last = rs[-1]
            # each eval samples one token and keeps the drafts it accepted: accepted = n - evals
            acc = f"{(n - last['evals']) / last['drafted']:.0%}" if k and last["drafted"] else "-"
            print(f"| llama.cpp {'plain' if not k else 'lookup'} | {k or '-'} | {med(r['rate'] for r in rs):.1f} "
                  f"| {med(r['speedup'] for r in rs):.2f}x | {acc} | {n / last['evals']:.2f} "
                  f"| {'yes' if all(r['same'] for r in rs) else 'NO'} |")
        ratio = med(b["rate"] / c["rate"] for b, c in zip(runs["plain:0"], runs["llama.cpp:0"]))
        print(f"\nbitlm plain / llama.cpp plain: {ratio:.2f}x (median of the rounds' ratios); llama.cpp's rows: "
              f"its own plain decoding is the base of its speedup and of its 'same'")
    costs = verify_costs(nm, prompt, sorted({k for k in args.draft_max} | {1, 2}))
    print("\nverify cost: one forward of k + 1 rows / one of 1 row, at the prompt's end")
    print("| k + 1 | " + " | ".join(str(k + 1) for k in costs) + " |")
    print("| --- |" + " ---: |" * len(costs))
    print("| cost | " + " | ".join(f"{c:.2f}" for c in costs.values()) + " |")


if __name__ == "__main__":
    main()
