"""Progress on a terminal: bytes done, rate, ETA, redrawn a few times a second.

Silent when stderr is not a terminal or when output is JSON, so scripts and
logs never see carriage-return noise.  Thread-safe: the pipelines call
``advance`` from their main thread only, but restores may report from
several.
"""

from __future__ import annotations

import sys
import threading
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, label: str, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.total = 0
        self.done = 0
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._lock = threading.Lock()

    def set_total(self, total: int) -> None:
        self.total = total

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.enabled and now - self._last_draw >= 0.2:
                self._last_draw = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        line = f"\r{self.label}: {human_bytes(self.done)}"
        if self.total:
            pct = 100.0 * self.done / self.total
            line += f" / {human_bytes(self.total)} ({pct:.0f}%)"
        line += f"  {human_bytes(rate)}/s"
        if self.total and rate > 0 and self.done < self.total:
            line += f"  ETA {_clock((self.total - self.done) / rate)}"
        self.stream.write(line.ljust(78))
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
