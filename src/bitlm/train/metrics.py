"""Metrics of a run: a JSONL file (one row per logged step and per validation), a progress bar with
tokens/s, loss, learning rate and ETA, and a PNG of the train and validation loss curves."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class MetricsLog:
    """Appends rows to a JSONL file. A fresh run truncates it; a resumed run keeps the rows up to the
    checkpoint's step and drops any written after it (they will be written again)."""

    def __init__(self, path: Path, enabled: bool = True, keep_until: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        kept = []
        if keep_until is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_until]
        with open(self.path, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """tqdm over steps: loss, lr and tokens/s in the postfix; tqdm supplies the ETA."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                 tok_s=f"{row['tok_per_s']:.0f}", refresh=False)
            self.bar.update(1)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_losses(metrics: Path, png: Path, title: str | None = None) -> Path | None:
    """Train loss per step and validation loss per evaluation, against steps; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bitlm: matplotlib is not installed (pip install 'bitlm[train]'); no loss plot", file=sys.stderr)
        return None
    rows = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]
    val = [(r["step"], r["loss"]) for r in rows if r.get("split") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or Path(metrics).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)
