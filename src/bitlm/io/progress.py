"""A progress bar on stderr for long file work (conversions): tqdm when it is installed, else one
plain line redrawn in place; nothing when stderr is not a terminal (logs and pipes stay clean)."""

from __future__ import annotations

import sys
import time


class Progress:
    """`with Progress(total, "converting") as bar: ... bar.update(n)`; enabled=False: no bar at all."""

    def __init__(self, total: int, desc: str, unit: str = "tensor", stream=None, enabled: bool = True):
        self.total, self.desc, self.unit = max(int(total), 1), desc, unit
        self.stream = stream or sys.stderr
        self.n = 0
        self._tqdm = None
        self._last = 0.0
        self.enabled = enabled and bool(getattr(self.stream, "isatty", lambda: False)())

    def __enter__(self):
        if self.enabled:
            try:
                from tqdm import tqdm
                self._tqdm = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=self.stream,
                                  leave=False, dynamic_ncols=True)
            except ImportError:
                self._draw(force=True)
        return self

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif self.enabled:
            self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.1 and self.n < self.total:
            return
        self._last = now
        width = 30
        done = int(width * min(self.n, self.total) / self.total)
        self.stream.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total}")
        self.stream.flush()

    def __exit__(self, *exc):
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.enabled:
            self.stream.write("\r" + " " * (len(self.desc) + 50) + "\r")
            self.stream.flush()
        return False
