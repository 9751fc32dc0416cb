"""The `bitlm` command: subcommands that call the library.

    bitlm generate -m MODEL -p PROMPT [-n N] [sampling flags] [--stop STR ...] [--ignore-eos] [-t THREADS]
                   [--speculative lookup | --draft MODEL] [--draft-max N] [--lookup-ngram N]
    bitlm chat -m MODEL [--system S] [sampling flags] [speculative flags]
        (generate, chat, serve, bench, eval: --device cuda runs the torch model on a GPU with the Triton kernels)
    bitlm info [MODEL] [--json]
    bitlm bench (-m MODEL | --shape NAME) [-t THREADS] [-p N_PROMPT] [-n N_GEN] [-r REPS] [--json] [--profile]
                [--device cuda]
    bitlm serve -m MODEL [--host 127.0.0.1] [--port 8000] [--max-seqs N] [--api-key KEY] [--device cuda]
                [--speculative lookup | --draft MODEL] ...
    bitlm convert IN OUT --to FORMAT [--embed-type T] [--head H]
    bitlm doctor
    bitlm eval ppl -m MODEL --data FILE... [--ctx N] [--stride S] [--runtime native|torch] [--json] [--device cuda]
    bitlm eval harness --model_args pretrained=DIR --tasks TASKS [--device cuda] [lm_eval's other flags]
    bitlm report (-m MODEL | --shape NAME) [--out DIR]
    bitlm train | sft | dpo ...   (docs/training.md)

A BitlmError (bad input, a bad file, a missing model) prints one line `bitlm: error: ...` and exits 2;
so does a command that needs PyTorch where it is not installed (it names the extra to install);
Ctrl-C exits 130 without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

from .errors import BitlmError

PROG = "bitlm"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
KV_TYPES = ("f16", "f32", "q8_0")  # engine/native.py KV_KINDS (kept here: the parser imports no numpy)
KV_HELP = "KV cache type: f16, f32 or q8_0 (8-bit blocks, 0.53 of f16's bytes: faster decode at long context)"
TORCH_NEEDED = ("this needs PyTorch, which is not installed (training, latent checkpoints, --runtime torch, "
                "bitlm.load's model): pip install 'bitlm[torch]'")


def resolve_model_arg(arg: str | None) -> str:
    """The model to use: the -m argument (a directory or a hub repo id), else the bundled Shakespeare
    model (src/bitlm/data/shakespeare, made by scripts/train_bundled_model.sh)."""
    if arg:
        return arg
    from .data import bundled_model_dir
    return str(bundled_model_dir())


def set_threads(n: int | None, torch_too: bool = True) -> None:
    """Threads for the native kernels' pool, when they are built in, and for torch. torch_too=False
    leaves torch unimported (the native runtime does not need it); if something imports it later (the
    first run's conversion of a checkpoint), OMP_NUM_THREADS gives it the same count."""
    if n is None:
        return
    if n < 1:
        raise BitlmError(f"-t/--threads must be at least 1, got {n}")
    if torch_too or "torch" in sys.modules:
        import torch
        torch.set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)
    if importlib.util.find_spec(f"{__package__}.kernels") is None:  # a build without native kernels
        return
    importlib.import_module(f"{__package__}.kernels").set_num_threads(n)


def native_available() -> bool:
    if importlib.util.find_spec(f"{__package__}.kernels._native") is None:
        return False
    return importlib.import_module(f"{__package__}.kernels").available()


def add_device_option(parser) -> None:
    """--device, shared by the commands that run a model (generate, chat, serve, bench, eval ppl)."""
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda[:N]: the torch model on the GPU in bf16, packed weights "
                             "multiplied by the Triton kernels (pip install 'bitlm[gpu]')")


def add_weights_option(parser, what: str) -> None:
    """--weights, shared by the commands that make a native file (engine/native.resolve_weights)."""
    parser.add_argument("--weights", choices=("auto", "i2v", "t5"), default="auto",
                        help=f"{what}: i2v (2 bits a weight), t5 (1.6 bits: decode reads 20%% fewer bytes; "
                             "same outputs), or auto (default): t5 where the kernels run on AVX-512 VNNI or AMX "
                             "and one sequence decodes at a time, i2v elsewhere and for serve's batches")


def check_device_arg(args):
    """args.device as a torch.device (a one-line error when CUDA or Triton is missing); None for cpu,
    without importing torch."""
    if getattr(args, "device", "cpu") == "cpu":  # commands without --device (report) run on the CPU
        return None
    from .gpu import check_device, resolve_kernel
    dev = check_device(args.device, "--device")
    resolve_kernel(dev, "auto", "packed", "--device")
    return dev


def load_model(args):
    """The model on the runtime asked for: "native" (the C forward, the default where it is built) or
    "torch" (the reference model); with --device cuda, the torch model on the GPU."""
    source = resolve_model_arg(args.model)
    runtime = args.runtime
    dev = check_device_arg(args)
    if dev is not None:
        if runtime == "native":
            raise BitlmError(f"--runtime native runs on the CPU; --device {args.device} runs the torch model "
                             "(drop --runtime native)")
        runtime = "torch"
    if runtime == "auto":
        runtime = "native" if native_available() else "torch"
    set_threads(args.threads, torch_too=runtime == "torch")
    if runtime == "native" and not native_available():
        raise BitlmError("--runtime native: the native kernels are not built in this install; "
                         "run `bitlm doctor`, or use --runtime torch")
    model = _load_on(runtime, source, args, dev)
    if model.tokenizer is None:
        raise BitlmError(f"{args.model}: no tokenizer.json next to the weights; `bitlm {args.command}` needs one")
    args.runtime = runtime  # a draft model is loaded on the same runtime
    return model


def _load_on(runtime: str, source: str, args, dev=None):
    if runtime == "native":
        from .engine.native import NativeLM, resolve_weights
        from .io.native import load_native
        return NativeLM(load_native(source, head=args.head, max_len=args.ctx_size, kv=args.kv, mmap=args.mmap,
                                    weights=resolve_weights(getattr(args, "weights", "i2v"),
                                                            getattr(args, "step_rows", 1))))
    import bitlm
    if dev is not None:
        import torch
        return bitlm.load(source, device=dev, dtype=torch.bfloat16)  # bf16 activations on a GPU
    return bitlm.load(source)


def speculative_option(args) -> dict:
    """{"speculative": Speculative(...)} from --speculative, --draft, --draft-max, --lookup-ngram (the
    draft model loaded on the target's runtime), or {} for plain decoding."""
    method = args.speculative or ("draft" if args.draft else "none")
    if args.draft and method != "draft":
        raise BitlmError(f"--draft MODEL drafts with a model: it goes with --speculative draft, not {method}")
    if method == "none":
        return {}
    from .engine.speculative import Speculative
    if method == "lookup":
        return {"speculative": Speculative("lookup", draft_max=args.draft_max, ngram_max=args.lookup_ngram)}
    if not args.draft:
        raise BitlmError("--speculative draft needs a draft model: --draft MODEL (one sharing the model's tokenizer)")
    draft = _load_on(args.runtime, args.draft, args, check_device_arg(args))
    return {"speculative": Speculative("draft", draft_max=args.draft_max, draft_model=draft)}


def sampling_options(args) -> dict:
    return dict(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop_strings=args.stop or (), ignore_eos=args.ignore_eos)


def write_stream(stream, out) -> None:
    for piece in stream:
        out.write(piece)
        out.flush()


def report_stats(stream, err) -> None:
    s = stream.stats()
    rate = f"{s['decode_tokens_per_s']:.1f} tokens/s" if s.get("decode_tokens_per_s") else "n/a"
    spec = ""
    if "draft_tokens" in s:
        rate_a = f"{s['acceptance_rate']:.0%}" if s["acceptance_rate"] is not None else "n/a"
        spec = f"; drafts accepted {s['accepted_tokens']}/{s['draft_tokens']} ({rate_a})"
    err.write(f"[prompt {s['prompt_tokens']} tokens, prefill {s['prefill_s'] * 1000:.0f} ms; "
              f"{s['new_tokens']} new tokens, decode {rate}{spec}; finished: {s['finish_reason']}]\n")


# ---- subcommands ---------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = load_model(args)
    from .engine.generate import stream_text
    stream = stream_text(model, prompt, **sampling_options(args), **speculative_option(args))
    write_stream(stream, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stream.finish_reason == "context":
        sys.stderr.write(f"{PROG}: note: stopped at the context length ({model.config.max_position_embeddings} "
                         "tokens)\n")
    if args.stats:
        report_stats(stream, sys.stderr)
    return 0


CHAT_HELP = "Type a message and press Enter. /reset starts over, /quit or Ctrl-D exits."


def cmd_chat(args) -> int:
    model = load_model(args)
    from .engine.generate import ChatSession
    session = ChatSession(model, system=args.system, **sampling_options(args), **speculative_option(args))
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(CHAT_HELP)
    while True:
        try:
            line = input("> ")
        except EOFError:
            if interactive:
                print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            print(CHAT_HELP)
            continue
        try:
            stream = session.send(line)
            write_stream(stream, sys.stdout)
        except BitlmError as e:  # e.g. the conversation outgrew the context: say so and carry on
            print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.stats:
            report_stats(stream, sys.stderr)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def cmd_bench(args) -> int:
    import time

    from .engine import bench
    from .io.native import load_native, open_native
    if bool(args.model) == bool(args.shape):
        raise BitlmError("bitlm bench: give exactly one of -m MODEL or --shape NAME (e.g. --shape 2b4t)")
    dev = check_device_arg(args)
    if dev is not None:
        return _bench_torch(args, dev)
    if not native_available():
        raise BitlmError("bitlm bench measures the native runtime, which is not built in this install "
                         "(see `bitlm doctor`)")
    longest = max(args.n_depth) + max(max(args.n_prompt), max(args.n_gen)) + 1
    t0 = time.perf_counter()
    if args.shape:
        from .engine.native import resolve_weights
        path = bench.synthetic_native_file(args.shape, args.head, weights=resolve_weights(args.weights))
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        nm = open_native(path, max_len=longest, kv=args.kv, mmap=args.mmap)
        nm.source = {"file": str(path)}
    else:
        nm = load_native(args.model, head=args.head, max_len=longest, kv=args.kv, mmap=args.mmap, tokenizer=False,
                         weights=args.weights)
        made = 0.0
    load_s = time.perf_counter() - t0
    if longest > nm.max_len:
        raise BitlmError(f"bitlm bench: -d {max(args.n_depth)} plus {longest - 1 - max(args.n_depth)} test tokens "
                         f"exceed the model's context of {nm.max_len} tokens; lower -d, -p or -n")
    records = []
    for threads in args.threads:
        for depth in args.n_depth:
            for n_prompt in args.n_prompt:
                records += bench.run(nm, threads, n_prompt, 0, args.repetitions, depth=depth)
            for n_gen in args.n_gen:
                records += bench.run(nm, threads, 0, n_gen, args.repetitions, depth=depth)
    rss = bench.peak_rss_bytes()
    for r in records:
        r["load_s"], r["peak_rss_bytes"] = load_s, rss
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if made > 1:
        print(f"(made the random {args.shape} model file in {made:.0f} s, once: {nm.source['file']})")
    _print_bench_table(records)
    print(f"\nload {load_s:.2f} s, peak RSS {rss / 1e9:.3f} GB")
    if args.profile:
        prof = bench.phase_breakdown(nm, args.threads[-1], max(args.n_prompt), max(args.n_gen),
                                     depth=max(args.n_depth))
        tests = list(prof)
        print(f"\nms per token by phase ({args.threads[-1]} threads; one profiled run of each test)")
        print("| phase | " + " | ".join(tests) + " |")
        print("| --- |" + " ---: |" * len(tests))
        for phase in prof[tests[0]]:
            cells = [f"{_ms(prof[t][phase])} ({100 * prof[t][phase] / prof[t]['total']:.0f}%)" for t in tests]
            print(f"| {phase} | " + " | ".join(cells) + " |")
    return 0


def _print_bench_table(records) -> None:
    from .engine.bench import test_name
    size = records[0]["model_size"] / 2**30 if records else 0
    print("| model | size | params | backend | threads | test | t/s |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in records:
        test = test_name(r)
        print(f"| {r['model_type']} | {size:.2f} GiB | {r['model_n_params'] / 1e9:.2f} B | {r.get('backend', 'native')} "
              f"| {r['n_threads']} | {test} | {r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} |")


def _bench_torch(args, dev) -> int:
    """bench --device cuda: the torch model on the GPU, its products by the Triton kernels."""
    from .engine import bench
    if args.profile:
        raise BitlmError("bench --profile times the native runtime's phases; it has no --device cuda form")
    if max(args.n_depth):
        raise BitlmError("bench -d/--n-depth is measured on the native runtime; it has no --device cuda form")
    records = bench.measure_torch(args.model, args.shape, dev, args.n_prompt, args.n_gen, args.repetitions)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        _print_bench_table(records)
        print(f"\nload {records[0]['load_s']:.2f} s, peak GPU memory {records[0]['peak_gpu_bytes'] / 1e9:.3f} GB")
    return 0


def _ms(v: float) -> str:
    """A phase's milliseconds: three decimals, or three significant digits below 0.1 ms, so that a
    tiny model's phases on a fast CPU show their size instead of 0.000."""
    import math
    return f"{v:.{3 if v >= 0.1 or v <= 0 else 2 - math.floor(math.log10(v))}f}"

def cmd_serve(args) -> int:
    """An OpenAI-compatible HTTP server (bitlm.serve; needs the `serve` extra: fastapi, uvicorn). The model
    loads as for generate (load_model): the native runtime by default, served by --engine batch or
    sequential; the torch model with --runtime torch or --device cuda, served by serve/torch_engine.py."""
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise BitlmError("bitlm serve needs fastapi and uvicorn: pip install 'bitlm[serve]'")
    from .serve.server import run, served_name
    from .serve.settings import ServeSettings
    torch_model = args.runtime == "torch" or args.device != "cpu"
    if args.runtime == "auto" and not torch_model and not native_available():
        raise BitlmError("bitlm serve: the native kernels are not built in this install (see `bitlm doctor`); "
                         "--runtime torch serves the torch model instead (slower)")
    if torch_model and args.engine == "batch":
        raise BitlmError("bitlm serve: --engine batch runs the native runtime; the torch model (--runtime torch, "
                         "--device cuda) is served one sequence after another (leave out --engine)")
    engine = args.engine or ("sequential" if torch_model else "batch")
    speculative = args.speculative or ("draft" if args.draft else "none")
    if torch_model and speculative != "none":
        raise BitlmError("bitlm serve: --speculative and --draft run on the native runtime; the torch model "
                         "(--runtime torch, --device cuda) is served without them")
    source = resolve_model_arg(args.model)
    settings = ServeSettings(model_name=args.served_model_name or served_name(source), host=args.host,
                             port=args.port, max_seqs=args.max_seqs, max_queue=args.max_queue,
                             kv_blocks=args.kv_blocks, block_size=args.block_size,
                             prefill_chunk=args.prefill_chunk, api_key=args.api_key,
                             drain_timeout=args.drain_timeout, engine=engine,
                             max_len=args.ctx_size if torch_model else None, speculative=speculative,
                             draft=args.draft, draft_max=args.draft_max, lookup_ngram=args.lookup_ngram)
    args.step_rows = args.max_seqs if engine == "batch" else 1  # for --weights auto: rows a step decodes
    model = load_model(args)
    draft = None
    if args.draft:  # on the native runtime, as the target is (refused above for the torch model)
        from .engine.speculative import check_draft_model
        draft = _load_on("native", resolve_model_arg(args.draft), args)
        check_draft_model(model, draft)
        draft = draft.nm
    return run(model, settings, draft)


def cmd_doctor(args) -> int:
    import platform

    from . import __version__
    print(f"bitlm {__version__}, Python {platform.python_version()}, {platform.system()} {platform.machine()}")
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        cpu = platform.processor() or "?"
    print(f"cpu: {cpu}, {os.cpu_count()} logical CPUs")
    if importlib.util.find_spec(f"{__package__}.kernels") is None:
        print("native kernels: not part of this install")
        return 0
    info = importlib.import_module(f"{__package__}.kernels").info()
    if not info["available"]:
        print(f"native kernels: NOT available ({info.get('error')}); the pure-torch path is used")
        return 0
    print(f"cpu features: {' '.join(info['cpu_features']) or '-'}")
    print(f"kernel paths: {', '.join(info['paths'])}; in use: {info['path']}")
    print("kernel tests: amx is tested only on CPUs that have it (no emulator); avx512vnni/vbmi and neon are "
          "also tested in CI on any CPU, by emulation (SIMDe, qemu-user), except the AVX-512 attention loops "
          "and softmax (only where the CPU has AVX-512)")
    print(f"threads: {info['threads']}")
    return 0


def cmd_info(args) -> int:
    from .io.summary import describe, format_summary
    info = describe(resolve_model_arg(args.model_pos or args.model))
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def cmd_eval_ppl(args) -> int:
    from .eval.ppl import format_result, perplexity, read_text
    texts = [read_text(f) for f in args.data]  # a bad --data fails before the model loads
    args.ctx_size, args.mmap = args.ctx, True
    model = load_model(args)
    from .eval.scoring import scorer_for
    scorer = scorer_for(model)
    ctx = args.ctx or model.config.max_position_embeddings
    stride = args.stride or max(1, ctx // 2)
    r = perplexity(scorer, texts, ctx, stride, progress=args.progress)
    r["model"] = args.model or "bundled shakespeare"
    r["head"] = args.head if scorer.runtime == "native" else None
    r["device"] = str(model.device)
    r["data"] = args.data
    names = ", ".join(os.path.basename(f) for f in args.data)
    print(json.dumps(r, indent=2) if args.json else format_result(r, names))
    return 0


def cmd_eval_harness(args) -> int:
    if importlib.util.find_spec("lm_eval") is None:
        raise BitlmError("bitlm eval harness needs lm-evaluation-harness: pip install 'bitlm[eval]'")
    from .eval.harness import run_cli
    return run_cli(args.lm_eval_args)


def cmd_report(args) -> int:
    from .eval.report import make_report
    if bool(args.model) == bool(args.shape):
        raise BitlmError("bitlm report: give exactly one of -m MODEL or --shape NAME (e.g. --shape 2b4t)")
    if not native_available():
        raise BitlmError("bitlm report measures the native runtime, which is not built in this install "
                         "(see `bitlm doctor`)")
    make_report(model=args.model, shape=args.shape, out=args.out, threads=args.threads, n_prompt=args.n_prompt,
                n_gen=args.n_gen, twin_gen=args.twin_n_gen, reps=args.repetitions, head=args.head)
    return 0


def cmd_convert(args) -> int:
    from .io.convert import convert
    out = convert(args.input, args.output, args.to, embed_type=args.embed_type, head=args.head, weights=args.weights)
    print(f"wrote {out} ({args.to})", file=sys.stderr)
    return 0


# ---- the parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="BitNet b1.58 ternary language models.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("-m", "--model", help="model directory or Hugging Face repo id")
    model.add_argument("-t", "--threads", type=int, help="CPU threads (default: all)")
    model.add_argument("--runtime", choices=("auto", "native", "torch"), default="auto",
                       help="native: the C forward (default where built); torch: the reference model")
    model.add_argument("--head", choices=("q8", "q6", "bf16", "f32"), default="q8",
                       help="native runtime: output head format (default q8: int8 rows, per-row scale)")
    add_weights_option(model, "native runtime: ternary weight format made at conversion")
    model.add_argument("-c", "--ctx-size", type=int,
                       help="native runtime, and serve on any runtime: context to allocate (default: the model's)")
    model.add_argument("--kv", choices=KV_TYPES, default="f16", help=f"native runtime: {KV_HELP} (default f16)")
    model.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=True,
                       help="native runtime: --mmap keeps the weights memory-mapped (instant load, page cache "
                            "shared with other processes); --no-mmap reads them into memory on huge pages "
                            "(here decode 3-5%% faster, prompts 4%% slower, a slower start; default --mmap)")
    add_device_option(model)

    sampling = argparse.ArgumentParser(add_help=False)
    g = sampling.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=256, help="most new tokens per reply (default 256)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens, 0 = off (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, 1 = off (default 0.95)")
    g.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    g.add_argument("--stop", nargs="+", metavar="STR", help="stop at any of these strings (not printed)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-text tokens")
    g.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")

    speculative = argparse.ArgumentParser(add_help=False)
    g = speculative.add_argument_group("speculative decoding (the same output, faster where drafts are often right)")
    g.add_argument("--speculative", choices=("none", "lookup", "draft"),
                   help="draft tokens by prompt lookup (n-grams of the context, no second model) or with a draft "
                        "model, and check them in one forward (serve: every request's beside the others' rows; "
                        "default: draft with --draft, else none)")
    g.add_argument("--draft", metavar="MODEL", help="the draft model: a smaller model sharing the tokenizer")
    g.add_argument("--draft-max", type=int, default=8, metavar="N",
                   help="most tokens drafted per step (default 8; fewer while drafts are rejected)")
    g.add_argument("--lookup-ngram", type=int, default=3, metavar="N",
                   help="prompt lookup: the longest n-gram of the context matched, down to 1 (default 3)")

    p = sub.add_parser("generate", parents=[model, sampling, speculative],
                       help="continue a prompt, streaming to stdout",
                       description="Continue PROMPT and stream the continuation to stdout.")
    p.add_argument("-p", "--prompt", required=True, help="the prompt text ('-' reads it from stdin)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("chat", parents=[model, sampling, speculative], help="interactive multi-turn chat",
                       description="Chat through the model's chat template. " + CHAT_HELP)
    p.add_argument("--system", help="a system message")
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("info", help="config, parameter counts, bytes on disk, format",
                       description="Describe a checkpoint from its config.json and safetensors headers.")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model directory or Hugging Face repo id")
    p.add_argument("-m", "--model", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("bench", help="prompt and generation speed, load time, peak memory (llama-bench style)",
                       description="Measure the native runtime: pp (prompt processing) and tg (generation) "
                                   "tokens/s, the median of -r repetitions, load time and peak RSS.")
    p.add_argument("-m", "--model", help="model directory or Hugging Face repo id")
    p.add_argument("--shape", help="a random model of a preset's shape instead (e.g. 2b4t); no download")
    p.add_argument("-t", "--threads", type=_int_list, default=[os.cpu_count() or 1], help="threads, e.g. 1,2")
    p.add_argument("-p", "--n-prompt", type=_int_list, default=[512], help="prompt lengths (default 512)")
    p.add_argument("-n", "--n-gen", type=_int_list, default=[128], help="tokens to generate (default 128)")
    p.add_argument("-d", "--n-depth", type=_int_list, default=[0],
                   help="tokens already in the context when each test starts, e.g. 0,1024,4000 (default 0)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="runs per test (default 5)")
    p.add_argument("--head", choices=("q8", "q6", "bf16", "f32"), default="q8", help="output head format")
    p.add_argument("--kv", choices=KV_TYPES, default="f16", help=f"{KV_HELP} (default f16)")
    add_weights_option(p, "ternary weight format")
    p.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=True,
                       help="--mmap keeps the weights memory-mapped (instant load, page cache "
                            "shared with other processes); --no-mmap reads them into memory on huge pages "
                            "(here decode 3-5%% faster, prompts 4%% slower, a slower start; default --mmap)")
    p.add_argument("--json", action="store_true", help="print llama-bench's JSON records")
    p.add_argument("--profile", action="store_true",
                   help="also print the per-token time of each phase of the forward (norms, products, attention, head)")
    add_device_option(p)
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("serve", parents=[model, speculative], help="an OpenAI-compatible HTTP server",
                       description="Serve the model over the OpenAI API (/v1/completions, /v1/chat/completions, "
                                   "/v1/models) with /health and Prometheus /metrics; many requests at once. "
                                   "--device cuda serves the torch model on a GPU (the Triton kernels).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, logged)")
    p.add_argument("--served-model-name", help="the model id of the API (default: the model directory's name)")
    p.add_argument("--max-seqs", type=int, default=16, help="requests generated at once (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429 (default 64)")
    p.add_argument("--kv-blocks", type=int, help="KV cache budget in blocks of --block-size positions (default: "
                                                  "max-seqs full contexts, at most 2 GiB with --engine batch)")
    p.add_argument("--block-size", type=int, default=16,
                   help="positions per KV cache block (default 16, as vLLM; a multiple of 16 with --kv q8_0; "
                        "64 decodes faster at long contexts: benchmarks/README.md)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens per step, so long prompts do not stall running requests (default 256)")
    p.add_argument("--api-key", default=os.environ.get("BITLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $BITLM_API_KEY, unset: no key)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGINT/SIGTERM lets running requests finish (default 30)")
    p.add_argument("--engine", choices=("batch", "sequential"),
                   help="native runtime: batch, all sequences of a step in one forward (its default), or "
                        "sequential, one after another (the reference); the torch model (--runtime torch, "
                        "--device cuda) is always served sequentially")
    p.set_defaults(run=cmd_serve)

    from .io.convert import FORMATS
    p = sub.add_parser("convert", help="convert a model between HF, GGUF (llama.cpp, bitnet.cpp) and native files",
                       description="Convert IN (an HF directory or repo id, a .gguf file, a native file) to "
                                   "FORMAT at OUT, atomically. Ternary weights cross over exactly.")
    p.add_argument("input", metavar="IN", help="HF directory or repo id, .gguf file, or native file")
    p.add_argument("output", metavar="OUT", help="the directory (hf, hf-bf16) or file to write")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("--embed-type", choices=("f16", "bf16", "f32", "q8_0", "q6_k"), default="f16",
                   help="GGUF: the token embedding's type (default f16, as the official I2_S file)")
    p.add_argument("--head", choices=("q8", "q6", "bf16", "f32"), default="q8", help="native: output head format")
    add_weights_option(p, "native: ternary weight format")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("doctor", help="CPU features and the kernel path in use")
    p.set_defaults(run=cmd_doctor)

    add_eval_parsers(sub)

    from .train.cli import add_dpo_parser, add_sft_parser, add_train_parser
    for add in (add_train_parser, add_sft_parser, add_dpo_parser):
        add(sub).set_defaults(run=lambda args: args.func(args))
    return parser


def add_eval_parsers(sub) -> None:
    """`bitlm eval ppl`, `bitlm eval harness` and `bitlm report`."""
    ev = sub.add_parser("eval", help="model quality: perplexity (ppl), lm-evaluation-harness tasks (harness)",
                        description="Measure a model's quality.")
    esub = ev.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    p = esub.add_parser("ppl", help="perplexity and bits per byte of a text file (sliding window)",
                        description="Perplexity and bits per byte of a UTF-8 text, scored in windows of --ctx "
                                    "tokens that start every --stride tokens; each window scores only the "
                                    "tokens the previous one did not (Hugging Face's method for fixed-length "
                                    "models).")
    p.add_argument("-m", "--model", help="model directory or Hugging Face repo id (default: the bundled model)")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help="UTF-8 text files, each scored as one document")
    p.add_argument("--ctx", type=int, help="window length in tokens (default: the model's context)")
    p.add_argument("--stride", type=int, help="tokens between window starts, below --ctx (default ctx / 2)")
    p.add_argument("--runtime", choices=("auto", "native", "torch"), default="auto",
                   help="native: the C forward (default where built); torch: the reference model")
    p.add_argument("--head", choices=("q8", "q6", "bf16", "f32"), default="q8",
                   help="native runtime: output head format (default q8)")
    p.add_argument("--kv", choices=KV_TYPES, default="f16", help=f"native runtime: {KV_HELP} (default f16)")
    p.add_argument("-t", "--threads", type=int, help="CPU threads (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    add_device_option(p)
    p.set_defaults(run=cmd_eval_ppl)

    # Everything after `harness` goes to lm-eval's own parser (its -h included): '+' as the prefix
    # character keeps argparse from reading lm-eval's --flags as ours.
    p = esub.add_parser("harness", prefix_chars="+", add_help=False,
                        help="lm-evaluation-harness tasks (lm_eval's flags; --model bitlm is implied; lm_eval's "
                             "--device cuda runs the torch model on a GPU)",
                        description="Run lm-eval's command line with the bitlm model registered.")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(run=cmd_eval_harness)

    p = sub.add_parser("report", help="the 2B4T efficiency table on this machine: ternary beside its bf16 twin",
                       description="Weight memory, peak RSS, prefill and decode latency per token and energy per "
                                   "token of a ternary model (native runtime) and its bf16 twin of the same "
                                   "shape (bitlm's torch model), each measured in its own process; a Markdown "
                                   "table and a PNG chart in --out.")
    p.add_argument("-m", "--model", help="model directory or Hugging Face repo id")
    p.add_argument("--shape", help="random weights of a preset's shape instead (e.g. 2b4t); no download")
    p.add_argument("--out", default="report", help="directory for report.md, report.json, report.png (default report)")
    p.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: all)")
    p.add_argument("-p", "--n-prompt", type=int, default=64, help="prompt tokens for prefill (default 64)")
    p.add_argument("-n", "--n-gen", type=int, default=32, help="tokens decoded by the ternary model (default 32)")
    p.add_argument("--twin-n-gen", type=int, default=8, help="tokens decoded by the bf16 twin (default 8)")
    p.add_argument("-r", "--repetitions", type=int, default=2, help="runs per test, after a warm-up (default 2)")
    p.add_argument("--head", choices=("q8", "q6", "bf16", "f32"), default="q8", help="ternary model's head format")
    p.set_defaults(run=cmd_report)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")).strip() or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    # The command's numbers are computed by bitlm's kernel threads or torch; numpy's OpenBLAS pool of
    # busy-waiting threads would only compete with them for the cores (4% of decode speed on 2 cores).
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and its one-line error (or the help)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return args.run(args)
    except BitlmError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as e:  # torch is an extra: the base install runs packed models natively
        if (e.name or "").split(".")[0] != "torch":
            raise
        print(f"{PROG}: error: {TORCH_NEEDED}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `bitlm generate ... | head -c 100`
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    import os
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
