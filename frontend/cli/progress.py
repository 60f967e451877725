"""A one-line progress bar on stderr for long work (weight upload), quiet when not a terminal."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self._last = 0.0
        self._t0 = time.perf_counter()
        self._shown = False

    def update(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        mib = done / 2**20
        rate = mib / max(now - self._t0, 1e-9)
        if self.tty:
            bar = "#" * int(frac * self.width)
            self.stream.write(f"\r{self.label} [{bar:<{self.width}}] {frac * 100:5.1f}% {mib:8.1f} MiB {rate:7.1f} MiB/s")
            self.stream.flush()
            self._shown = True
        elif done >= total:
            self.stream.write(f"{self.label}: {mib:.1f} MiB in {now - self._t0:.2f} s\n")

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
