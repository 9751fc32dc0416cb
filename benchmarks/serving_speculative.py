"""`bitlm serve --speculative lookup` beside `bitlm serve` on an input-grounded load, the bundled model.

Two servers on the same model, one drafting by prompt lookup and one not, each in its own process with
the same thread count. For each number of concurrent clients C (default 1 and 4), C client threads each
send --requests /v1/completions one after another: greedy, ignore_eos, --max-tokens new tokens, the
prompt a passage given twice and begun a third time (as summarizing and editing users quote their input
back), a different passage per client. Reported per C: aggregate generated tokens/s of each server
(completion tokens / wall time of the whole load), their ratio, the acceptance rate (from /metrics), and
whether the texts were the same (greedy: they must be). --rounds R alternates the servers R times;
medians of the per-round figures.

    python benchmarks/serving_speculative.py                 # about a minute on 2 cores
    python benchmarks/serving_speculative.py --clients 1 4 8 --rounds 5 -t 2
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import run_clients  # noqa: E402  (the client threads, timed as serving.py times them)

SRC = Path(__file__).resolve().parents[1] / "src"
PASSAGES = [
    "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
    "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief.\n",
    "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.\n",
    "KING RICHARD III:\nNow is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n",
    "MACBETH:\nTo-morrow, and to-morrow, and to-morrow,\nCreeps in this petty pace from day to day,\n"
    "To the last syllable of recorded time;\nAnd all our yesterdays have lighted fools.\n",
]


def prompt(i: int) -> str:
    p = PASSAGES[i % len(PASSAGES)]
    return p + p + p[:40]


def start(spec: bool, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "bitlm", "serve", "--port", "0", "-t", str(args.threads),
           "--max-seqs", str(max(args.clients))]
    if args.model:
        cmd += ["-m", args.model]
    if spec:
        cmd += ["--speculative", "lookup", "--draft-max", str(args.draft_max)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    for line in proc.stderr:
        m = re.search(r"at (http://[\d.]+:\d+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
            return proc, m.group(1)
    raise SystemExit(f"bitlm serve did not start ({' '.join(cmd)})")


def counters(http, url: str) -> dict:
    text = http.get(url + "/metrics").text
    return {k: float(v) for k, v in re.findall(r"^(bitlm_\w+) (\S+)$", text, re.M)}


def load(url: str, clients: int, args) -> tuple[float, float | None, list[str]]:
    """(tokens/s of all clients, acceptance rate or None, the texts in request order)."""
    import httpx
    texts: list[list[str]] = [[] for _ in range(clients)]
    n_tokens = [0] * clients

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as c:
            for _ in range(args.requests):
                r = c.post(url + "/v1/completions", json={
                    "model": "shakespeare", "prompt": prompt(k), "max_tokens": args.max_tokens, "temperature": 0,
                    "ignore_eos": True}).json()
                texts[k].append(r["choices"][0]["text"])
                n_tokens[k] += r["usage"]["completion_tokens"]

    with httpx.Client(timeout=30) as http:
        before = counters(http, url)
        wall = run_clients(client, clients)
        after = counters(http, url)
    drafted = after["bitlm_speculative_draft_tokens_total"] - before["bitlm_speculative_draft_tokens_total"]
    accepted = after["bitlm_speculative_accepted_tokens_total"] - before["bitlm_speculative_accepted_tokens_total"]
    return sum(n_tokens) / wall, (accepted / drafted if drafted else None), [t for ts in texts for t in ts]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", help="the model (default: the bundled one)")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--draft-max", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    servers = {False: start(False, args), True: start(True, args)}
    try:
        for url in (u for _, u in servers.values()):  # warm-up: first pages of weights and KV
            load(url, 1, argparse.Namespace(**{**vars(args), "requests": 1, "max_tokens": 8}))
        print(f"bundled model, -t {args.threads}, {args.requests} requests per client of {args.max_tokens} tokens, "
              f"--draft-max {args.draft_max}, medians of {args.rounds} rounds")
        print("| clients | plain tokens/s | lookup tokens/s | lookup / plain | acceptance | same text |")
        print("|---|---|---|---|---|---|")
        for c in args.clients:
            plain, spec, ratio, rate, same = [], [], [], [], True
            for _ in range(args.rounds):
                a, _, ta = load(servers[False][1], c, args)
                b, r, tb = load(servers[True][1], c, args)
                plain.append(a), spec.append(b), ratio.append(b / a), rate.append(r or 0.0)
                same &= ta == tb
            print(f"| {c} | {statistics.median(plain):.0f} | {statistics.median(spec):.0f} | "
                  f"{statistics.median(ratio):.2f}x | {statistics.median(rate):.1%} | {'yes' if same else 'NO'} |")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
