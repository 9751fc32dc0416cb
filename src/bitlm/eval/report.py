"""`bitlm report`: the BitNet b1.58 2B4T report's efficiency table, reproduced on this machine.

Two engines, each measured in its own process so that its peak resident memory is its own:
    ternary    the native runtime on the ternary model (2-bit weights, int8 activations); with --shape,
               the random native file of the preset's shape that `bitlm bench --shape` uses
    bf16 twin  bitlm's torch model with full-precision (nn.Linear) projections of the same shape in
               bfloat16, random weights (speed and memory do not depend on the values)
Both run llama-bench's tests (engine/bench.py): prefill = one batch of n_prompt tokens from an empty
context, decode = n_gen tokens one at a time, each the argmax of the last logits; the median of
`reps` runs after a warm-up, as milliseconds per token.

Energy per token, two ways:
    arithmetic  the papers' 7 nm model (REFERENCE.md): a ternary weight costs one INT8 add per token
                (0.007 pJ; its multiply is a sign), a floating-point weight one FP16 multiply and one
                FP16 add (0.34 + 0.16 pJ). Counted over the non-embedding projections only, every
                weight once (zero weights would skip their add: an upper bound for the ternary
                model); the head, attention and memory traffic are left out, as in the papers' figure.
    measured    package energy from RAPL (/sys/class/powercap/intel-rapl:N/energy_uj, the package
                domains), read by each worker around its own prefill and decode runs (warm-up
                included); it counts everything the package ran meanwhile. Where the machine does not
                expose it (a VM usually does not), the table says so and why.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..errors import BitlmError

# REFERENCE.md, "Headline figures": 7 nm arithmetic energy, picojoules per operation
PJ_INT8_ADD, PJ_FP16_ADD, PJ_FP16_MUL = 0.007, 0.16, 0.34
# the 2B4T report's own figures for the ternary model (8-thread laptop CPU, bitnet.cpp)
PAPER_2B4T = {"nonembed_gb": 0.4, "decode_ms": 29.0, "energy_j": 0.028}
POWERCAP = Path("/sys/class/powercap")


# ---- measured energy -----------------------------------------------------------------------------
def rapl_packages(root: Path = POWERCAP) -> tuple[list[Path], str]:
    """The RAPL package domains (intel-rapl:N whose name starts with "package") whose energy_uj can be
    read, or [] and the reason there are none."""
    if not root.is_dir():
        return [], f"no {root} (the kernel exposes no RAPL counters here, as usual in a VM)"
    found = [d for d in sorted(root.glob("intel-rapl:*")) if d.name.count(":") == 1
             and (d / "name").is_file() and (d / "name").read_text().strip().startswith("package")]
    if not found:
        return [], f"{root} has no intel-rapl package domain"
    try:
        for d in found:
            int((d / "energy_uj").read_text())
    except (OSError, ValueError) as e:
        return [], f"{found[0] / 'energy_uj'} is not readable ({e.__class__.__name__}; root only since Linux 5.10)"
    return found, ""


class EnergyMeter:
    """Joules of the RAPL package domains between start() and stop(); the counter wraps at
    max_energy_range_uj, which one wrap per measurement accounts for."""

    def __init__(self, domains: list[Path]):
        self.domains = domains
        self.ranges = [int((d / "max_energy_range_uj").read_text()) if (d / "max_energy_range_uj").is_file()
                       else 0 for d in domains]
        self.begin: list[int] = []

    def _read(self) -> list[int]:
        return [int((d / "energy_uj").read_text()) for d in self.domains]

    def start(self) -> None:
        self.begin = self._read()

    def stop(self) -> float:
        total = 0
        for b, e, r in zip(self.begin, self._read(), self.ranges):
            total += e - b if e >= b else e - b + r
        return total / 1e6


def perf_energy_note() -> str:
    """Whether `perf stat -e power/energy-pkg/` works here (bitlm reads RAPL through sysfs; this says
    whether perf would see anything more)."""
    try:
        r = subprocess.run(["perf", "stat", "-a", "-e", "power/energy-pkg/", "-x,", "--", "true"],
                           capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "perf is not installed"
    except subprocess.TimeoutExpired:
        return "perf stat did not answer in 30 s"
    if r.returncode == 0:
        return "perf stat -e power/energy-pkg/ works"
    lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip() and "Usage" not in ln]
    why = next((ln for ln in lines if "PMU" in ln or "not supported" in ln or "ermission" in ln), lines[0] if lines else "")
    return f"perf stat -e power/energy-pkg/ fails: {why.lstrip(chr(92) + '_ ').rstrip('.')}"


# ---- arithmetic energy -----------------------------------------------------------------------------
def arithmetic_energy_j(n_weights: int, ternary: bool) -> float:
    """Joules per token for the matrix products over n_weights weights (the 7 nm model above)."""
    pj = PJ_INT8_ADD if ternary else PJ_FP16_MUL + PJ_FP16_ADD
    return n_weights * pj * 1e-12


# ---- the workers (each in its own process) -------------------------------------------------------
def _median_ms(fn, n_tokens: int, reps: int) -> tuple[float, float]:
    """(median milliseconds per token over reps runs after a warm-up, seconds of all runs)."""
    t_all = time.perf_counter()
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times) / n_tokens, time.perf_counter() - t_all


def _measure(prefill, decode, spec) -> dict:
    domains, _ = rapl_packages()
    meter = EnergyMeter(domains) if domains else None
    res = {}
    for name, fn, n in (("prefill", prefill, spec["n_prompt"]), ("decode", decode, spec["n_gen"])):
        if meter:
            meter.start()
        res[f"{name}_ms"], _ = _median_ms(fn, n, spec["reps"])
        if meter:  # every run, the warm-up included: (reps + 1) * n tokens
            res[f"{name}_energy_j"] = meter.stop() / ((spec["reps"] + 1) * n)
    return res


def worker_ternary(spec: dict) -> dict:
    """The native runtime: no torch in this process."""
    from ..engine.bench import _TokenSource, peak_rss_bytes
    from ..io.native import open_native
    from ..kernels import set_num_threads
    max_len = spec["n_prompt"] + spec["n_gen"] + 1
    t0 = time.perf_counter()
    nm = open_native(spec["file"], max_len=max_len)
    load_s = time.perf_counter() - t0
    set_num_threads(spec["threads"])
    rng = _TokenSource(0, nm.config.vocab_size)
    prompt = rng.tokens(spec["n_prompt"])

    def prefill():
        nm.reset()
        nm.forward(prompt, n_out=1)

    def decode():
        nm.reset()
        tok = rng.token()
        for _ in range(spec["n_gen"]):
            tok = int(nm.forward([tok], n_out=1)[0].argmax())

    res = _measure(prefill, decode, spec)
    b = nm.nbytes
    res.update(load_s=load_s, peak_rss_bytes=peak_rss_bytes(), nonembed_bytes=b["ternary"] + b["norms"],
               total_bytes=b["ternary"] + b["norms"] + b["embedding"] + b["head"], head_format=nm.head_format)
    return res


def twin_model(config):
    """bitlm's torch model with nn.Linear projections, made directly in bfloat16 (never float32:
    at the 2B4T shape that would be 9.7 GB), random normal weights, unit norms."""
    import torch

    from ..model import BitNetForCausalLM, Rotary
    with torch.device("meta"):
        model = BitNetForCausalLM(config, linear="fp").to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.model.rotary = Rotary(config.head_dim, config.rope_theta, config.max_position_embeddings)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def worker_twin(spec: dict) -> dict:
    import torch

    from ..config import BitNetConfig
    from ..engine.bench import _TokenSource, peak_rss_bytes
    torch.set_num_threads(spec["threads"])
    config = BitNetConfig.from_hf(spec["config"])
    t0 = time.perf_counter()
    model = twin_model(config)
    load_s = time.perf_counter() - t0
    rng = _TokenSource(0, config.vocab_size)
    prompt = torch.from_numpy(rng.tokens(spec["n_prompt"])).long().unsqueeze(0)
    max_len = spec["n_prompt"] + spec["n_gen"] + 1

    @torch.inference_mode()
    def prefill():
        model(prompt, cache=model.new_cache(max_len=max_len), logits_to_keep=1)

    @torch.inference_mode()
    def decode():
        cache = model.new_cache(max_len=max_len)
        tok = torch.tensor([[rng.token()]])
        for _ in range(spec["n_gen"]):
            tok = model(tok, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)

    res = _measure(prefill, decode, spec)
    embed = model.model.embed_tokens.weight
    seen, total = set(), 0
    for p in model.parameters():  # the tied head is the embedding: count it once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    head = 0 if config.tie_word_embeddings else model.lm_head.weight.numel() * 2
    res.update(load_s=load_s, peak_rss_bytes=peak_rss_bytes(), total_bytes=total,
               nonembed_bytes=total - embed.numel() * embed.element_size() - head)
    return res


def _run_worker(kind: str, spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "bitlm.eval.report", kind, json.dumps(spec)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BitlmError(f"bitlm report: the {kind} worker failed: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the report ----------------------------------------------------------------------------------
def make_report(model: str | None = None, shape: str | None = None, out="report", threads: int = 1,
                n_prompt: int = 64, n_gen: int = 32, twin_gen: int = 8, reps: int = 2, head: str = "q8",
                log=sys.stderr) -> dict:
    """Measure both engines, write report.md, report.json and report.png into `out`; return the data."""
    for name, v, low in (("-t/--threads", threads, 1), ("-p/--n-prompt", n_prompt, 1), ("-n/--n-gen", n_gen, 1),
                         ("--twin-n-gen", twin_gen, 1), ("-r/--repetitions", reps, 1)):
        if v < low:
            raise BitlmError(f"bitlm report: {name} must be at least {low}, got {v}")
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        raise BitlmError("bitlm report runs the bf16 twin on PyTorch, which is not installed: "
                         "pip install 'bitlm[torch]'")
    spec = {"threads": threads, "n_prompt": n_prompt, "reps": reps, "head": head}
    if shape:
        from ..config import preset
        from ..engine.bench import synthetic_native_file
        config = preset(shape)
        t0 = time.perf_counter()
        spec["file"] = str(synthetic_native_file(shape, head))  # made once, in the cache
        if time.perf_counter() - t0 > 1:
            print(f"(made the random {shape} model file in {time.perf_counter() - t0:.0f} s, once: {spec['file']})",
                  file=log)
        label = f"{shape} shape, random weights"
    else:  # converted here, once, so that the worker's peak memory is the runtime's, not the converter's
        from ..io.checkpoint import open_checkpoint
        from ..io.native import cache_path, convert
        ck = open_checkpoint(model)
        config, dest = ck.config, cache_path(ck.path, head)
        if not dest.exists():
            print(f"converting {model} for the native runtime (once) ...", file=log, flush=True)
            convert(ck.path, dest, head)
        spec["file"] = str(dest)
        label = model
    if n_prompt + max(n_gen, twin_gen) + 1 > config.max_position_embeddings:
        raise BitlmError(f"bitlm report: {n_prompt} prompt + {max(n_gen, twin_gen)} generated tokens exceed the "
                         f"model's context {config.max_position_embeddings}")
    print("measuring the ternary model (native runtime) ...", file=log, flush=True)
    ternary = _run_worker("ternary", {**spec, "n_gen": n_gen})
    print("measuring the bf16 twin (torch) ...", file=log, flush=True)
    twin = _run_worker("twin", {**spec, "n_gen": twin_gen, "config": config.to_hf()})
    n = config.num_parameters()
    domains, why = rapl_packages()
    data = {
        "label": label, "shape": shape, "model": model, "threads": threads, "n_prompt": n_prompt,
        "n_gen": n_gen, "twin_n_gen": twin_gen, "reps": reps, "cpu": _cpu_name(),
        "params": n, "ternary": ternary, "twin": twin,
        "arithmetic_energy_j": {"ternary": arithmetic_energy_j(n["ternary"], True),
                                "twin": arithmetic_energy_j(n["ternary"], False)},
        "measured_energy": ("RAPL " + ", ".join(str(d) for d in domains)) if domains else
                           f"unavailable: {why}; {perf_energy_note()}",
        "paper": PAPER_2B4T if shape == "2b4t" else None,
    }
    out = Path(out)
    from ..io.files import atomic_file
    md = format_markdown(data)
    for name, text in (("report.md", md), ("report.json", json.dumps(data, indent=2) + "\n")):
        with atomic_file(out / name) as tmp:
            Path(tmp).write_text(text)
    png = write_chart(data, out / "report.png")
    print(md)
    print(f"\nwrote {out / 'report.md'}, {out / 'report.json'}" + (f", {png}" if png else ""), file=log)
    return data


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        import platform
        return platform.processor() or "?"


def _g(v: float, unit: str = "") -> str:
    """Three significant digits, in plain notation where that stays short."""
    s = f"{v:.3g}"
    return (s if "e" not in s else f"{v:.2e}") + unit


def _threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def _size(v: float) -> str:
    return f"{v / 1e9:.3f} GB" if v >= 1e8 else f"{v / 1e6:.3f} MB"


def _count(v: int) -> str:
    return f"{v / 1e9:.3f} B" if v >= 1e8 else f"{v / 1e6:.3f} M"


def format_markdown(d: dict) -> str:
    t, w, e = d["ternary"], d["twin"], d["arithmetic_energy_j"]
    paper = d["paper"]
    head = "| | ternary (bitlm native) | bf16 twin (torch) | twin / ternary |" + (" 2B4T report |" if paper else "")
    rows = [head, "| --- | ---: | ---: | ---: |" + (" ---: |" if paper else "")]

    def row(name, a, b, fmt, pap=None):
        cells = [fmt(a), fmt(b), f"{b / a:.1f}x" if a else "-"]
        if paper:
            cells.append(pap or "")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")

    gb = _size
    ms = lambda v: f"{v:.3g} ms" if v < 1 else f"{v:.2f} ms"  # noqa: E731
    row("weights, non-embedding", t["nonembed_bytes"], w["nonembed_bytes"], gb, paper and f"{paper['nonembed_gb']} GB")
    row("weights, total", t["total_bytes"], w["total_bytes"], gb)
    row("peak RSS", t["peak_rss_bytes"], w["peak_rss_bytes"], gb)
    row(f"prefill latency per token (pp{d['n_prompt']})", t["prefill_ms"], w["prefill_ms"], ms)
    row(f"decode latency per token (tg{d['n_gen']} / tg{d['twin_n_gen']})", t["decode_ms"], w["decode_ms"], ms,
        paper and f"{paper['decode_ms']:.0f} ms")
    row("energy per token, 7 nm arithmetic model", e["ternary"], e["twin"], lambda v: _g(v, " J"),
        paper and f"{paper['energy_j']} J (whole CPU, estimated)")
    if "decode_energy_j" in t and "decode_energy_j" in w:
        row("energy per decoded token, RAPL package", t["decode_energy_j"], w["decode_energy_j"], lambda v: _g(v, " J"))
        row("energy per prefill token, RAPL package", t["prefill_energy_j"], w["prefill_energy_j"], lambda v: _g(v, " J"))
    else:
        rows.append("| energy per token, measured | n/a | n/a | |" + (" |" if paper else ""))
    p = d["params"]
    notes = [
        "",
        f"{d['label']}: {_count(p['total'])} parameters ({_count(p['ternary'])} in the ternary projections); "
        f"{_threads(d['threads'])} on {d['cpu']}; median of {d['reps']} runs after a warm-up, each engine in its own "
        f"process. Ternary: 2-bit packed projections, int8 activations, head {t['head_format']}, f16 KV cache. "
        "Twin: bitlm's torch model with bf16 nn.Linear projections of the same shape, random weights.",
        f"Arithmetic energy: {_count(p['ternary'])} projection weights x {PJ_INT8_ADD} pJ (INT8 add) for the "
        f"ternary model, x ({PJ_FP16_MUL} + {PJ_FP16_ADD}) pJ (FP16 multiply + add) for the twin; head, attention and "
        "memory traffic left out.",
        f"Measured energy: {d['measured_energy']}" + ("" if d["measured_energy"][-1] in ".?!" else "."),
    ]
    return "\n".join(rows + notes) + "\n"


def write_chart(d: dict, path: Path) -> Path | None:
    """Grouped bars, ternary beside the twin: memory, latency, energy (log scales where they span
    orders of magnitude). None, with a note on stderr, when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bitlm report: matplotlib is not installed (pip install matplotlib): no chart, the table is written",
              file=sys.stderr)
        return None
    t, w, e = d["ternary"], d["twin"], d["arithmetic_energy_j"]
    panels = [
        ("memory (GB)", ["non-embedding\nweights", "total\nweights", "peak RSS"],
         [t["nonembed_bytes"] / 1e9, t["total_bytes"] / 1e9, t["peak_rss_bytes"] / 1e9],
         [w["nonembed_bytes"] / 1e9, w["total_bytes"] / 1e9, w["peak_rss_bytes"] / 1e9], False),
        ("latency (ms per token)", ["prefill", "decode"], [t["prefill_ms"], t["decode_ms"]],
         [w["prefill_ms"], w["decode_ms"]], True),
        ("energy (J per token)", ["7 nm arithmetic"], [e["ternary"]], [e["twin"]], True),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), dpi=110, gridspec_kw={"width_ratios": [3, 2, 1.2]})
    for ax, (title, labels, a, b, log) in zip(axes, panels):
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], a, 0.4, label="ternary (bitlm native)", color="#2a7ab9")
        ax.bar([x + 0.2 for x in xs], b, 0.4, label="bf16 twin (torch)", color="#d9822b")
        ax.set_xticks(list(xs), labels)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{d['label']}, {_threads(d['threads'])}", fontsize=10)
    fig.tight_layout()
    from ..io.files import atomic_file
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


if __name__ == "__main__":  # a worker: python -m bitlm.eval.report ternary|twin SPEC_JSON
    kind, spec_json = sys.argv[1], sys.argv[2]
    result = {"ternary": worker_ternary, "twin": worker_twin}[kind](json.loads(spec_json))
    print(json.dumps(result))
