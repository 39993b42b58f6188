"""Progress on a terminal: bytes done, rate, ETA, redrawn a few times a second.

Silent when stderr is not a terminal or when output is JSON, so scripts and
logs never see carriage-return noise.  Thread-safe: the pipelines call
``advance`` from their main thread only, but restores may report from
several.

The line never wraps (it is cut to the terminal's width, measured at each
redraw), and it never shares a line with a message: the CLI's log handler
calls ``end_line()`` before it writes, which ends the progress line with a
newline; the next redraw starts a fresh one below the message.  Once every
byte is read the work is not over (packs and LMDB are synced, a restored
file is fsynced and renamed), so the line then says ``syncing`` and counts
the seconds instead of sitting at 99 or 100%.
"""

from __future__ import annotations

import os
import sys
import threading
import time

# The one Progress drawing on the terminal, if any (see end_line).
_active: "Progress | None" = None
_active_lock = threading.Lock()

SYNC_TICK = 1.0  # seconds between redraws of the syncing stage


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def terminal_width(stream, fallback: int = 80) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or fallback
    except (AttributeError, OSError, ValueError):
        return fallback


def end_line() -> None:
    """End the progress line on the terminal (if one is drawn) before a message."""
    with _active_lock:
        progress = _active
    if progress is not None:
        progress.break_line()


class Progress:
    def __init__(self, label: str, enabled: bool | None = None, stream=None, width: int | None = None,
                 finishing: str = "syncing"):
        self.stream = stream or sys.stderr
        self.finishing = finishing  # what the work after the last byte is
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.total = 0
        self.done = 0
        self.width = width  # None: the terminal's, at each redraw
        self._start = time.monotonic()
        self._synced_from: float | None = None
        self._finished = False
        self._last_draw = 0.0
        self._drawn = False  # a partial line is on the terminal
        self._lock = threading.RLock()
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        if self.enabled:
            global _active
            with _active_lock:
                _active = self

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def set_total(self, total: int) -> None:
        self.total = total

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            reading_done = self.total and self.done >= self.total
            if reading_done and self._synced_from is None:
                self._syncing(now)
            elif self.enabled and now - self._last_draw >= 0.2:
                self._draw(now)

    def _syncing(self, now: float) -> None:
        """Everything is read: from now on the line shows the syncing stage."""
        self._synced_from = now
        if not self.enabled:
            return
        self._draw(now)
        self._ticker = threading.Thread(target=self._tick, name="bv-progress", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(SYNC_TICK):
            with self._lock:
                if not self._stop.is_set():
                    self._draw(time.monotonic())

    def line(self, now: float) -> str:
        """The progress text (without carriage return or padding)."""
        elapsed = max(now - self._start, 1e-6)
        if self._finished:
            return f"{self.label}: {human_bytes(self.done)} in {_clock(elapsed)}, done"
        if self._synced_from is not None:
            reading = max(self._synced_from - self._start, 1e-6)
            return (f"{self.label}: {human_bytes(self.done)} read in {_clock(reading)}, "
                    f"{self.finishing} {_clock(now - self._synced_from)}")
        rate = self.done / elapsed
        text = f"{self.label}: {human_bytes(self.done)}"
        if self.total:
            pct = 100.0 * self.done / self.total
            text += f" / {human_bytes(self.total)} ({pct:.0f}%)"
        text += f"  {human_bytes(rate)}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f"  ETA {_clock((self.total - self.done) / rate)}"
        return text

    def _draw(self, now: float) -> None:
        self._last_draw = now
        # One column short of the width: writing the last column makes some
        # terminals wrap at once.
        width = max((self.width or terminal_width(self.stream)) - 1, 1)
        text = self.line(now)
        if len(text) > width:
            # The figures matter more than the label: shorten the label first.
            rest = text[len(self.label):]
            keep = width - len(rest) - 1
            text = (self.label[:keep] + "…" + rest) if keep >= 8 else text[:width]
        self.stream.write("\r" + text.ljust(width))
        self.stream.flush()
        self._drawn = True

    def break_line(self) -> None:
        """A message is about to be written: end the drawn line with a newline."""
        with self._lock:
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = False

    def _stop_ticker(self) -> None:
        self._stop.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join()

    def finish(self) -> None:
        """The work is done: draw the last line and end it."""
        self._stop_ticker()
        if self.enabled:
            with self._lock:
                self._finished = True
                self._draw(time.monotonic())
        self.close()

    def close(self) -> None:
        """Stop drawing (after success or failure); the terminal is left on a fresh line."""
        global _active
        self._stop_ticker()
        self.break_line()
        with _active_lock:
            if _active is self:
                _active = None
