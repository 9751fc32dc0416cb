"""Converting a packed Hugging Face checkpoint into bitlm's native file, the two ways: convert_packed
(numpy, from the mapped safetensors, no torch) beside convert_via_torch (through bitlm's torch model),
each in its own process, so that its time and peak RSS (VmHWM) are its own; then whether the two files
are the same, byte for byte.

    python benchmarks/convert_checkpoint.py [--model DIR] [--head q6] [--rounds 1]

--model defaults to the random checkpoint of the 2B4T shape that benchmarks/cpu_inference.py writes
(~/.cache/bitlm/bench/random-2b4t-hf). Never imported by the tests.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WAYS = ("convert_packed", "convert_via_torch")


def worker(way: str, model: str, dest: str, head: str) -> None:
    import time

    from bitlm.engine.bench import peak_rss_bytes
    from bitlm.io import native
    t = time.perf_counter()
    getattr(native, way)(model, dest, head)
    print(json.dumps({"s": time.perf_counter() - t, "peak_rss_gb": peak_rss_bytes() / 1e9,
                      "torch": "torch" in sys.modules}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/bitlm/bench/random-2b4t-hf"))
    ap.add_argument("--head", default="q6", choices=("q8", "q6", "f32", "bf16"))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.model, args.worker[1], args.head)
        return
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"{args.model}: no checkpoint there; run benchmarks/cpu_inference.py once, or pass --model")
    runs = {w: [] for w in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for way in WAYS:
                dest = str(Path(tmp) / f"{way}.safetensors")
                p = subprocess.run([sys.executable, __file__, "--model", args.model, "--head", args.head,
                                    "--worker", way, dest], capture_output=True, text=True, check=True)
                runs[way].append(json.loads(p.stdout.strip().splitlines()[-1]))
        same = filecmp.cmp(Path(tmp) / "convert_packed.safetensors", Path(tmp) / "convert_via_torch.safetensors",
                           shallow=False)
    print(f"{args.model}, head {args.head}, {args.rounds} round(s), medians\n")
    print("| converter | seconds | peak RSS GB | imports torch |")
    print("| --- | ---: | ---: | --- |")
    for way, r in runs.items():
        print(f"| {way} | {statistics.median(x['s'] for x in r):.1f} | "
              f"{statistics.median(x['peak_rss_gb'] for x in r):.2f} | {r[0]['torch']} |")
    print(f"\nthe two files are {'the same, byte for byte' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
