"""A text progress bar for long commands (stderr; redraws in place on a terminal, else prints
a line every 10 %). Library code reports progress through callbacks; only the CLI draws."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class ProgressBar:
    """``bar = ProgressBar(total, "phantoms"); bar.update(1, "case_00003"); bar.close()``."""

    def __init__(self, total: int, label: str, stream: Optional[TextIO] = None, enabled: bool = True):
        self.total = max(1, int(total))
        self.label = label
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_decile = -1

    def update(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        fraction = self.done / self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        text = f"{self.label} {self.done}/{self.total} [{'#' * int(30 * fraction):<30}] {elapsed:.0f}s<{eta:.0f}s {note}"
        if self.tty:
            self.stream.write("\r" + text[:160].ljust(100))
            self.stream.flush()
        else:
            decile = int(fraction * 10)
            if decile != self._last_decile or self.done == self.total:
                self._last_decile = decile
                self.stream.write(text + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
