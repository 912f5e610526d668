"""Progress reporting and cancellation shared by the pipeline stages and the commands.

``progress`` callbacks take ``(fraction, message)`` with fraction in [0, 1] over the whole
run; :class:`ProgressPrinter` is the one the commands (``segment``, ``pacs``, ``demo``, ``models
install``) show on stderr. ``cancel`` is anything with ``is_set()`` (a ``threading.Event``) or a callable returning
True; checking it raises :class:`CancelledError` so no partial result escapes.
"""

from __future__ import annotations

import json
import sys
from typing import Callable, Optional

from .errors import CancelledError

ProgressCallback = Callable[[float, str], None]


def is_cancelled(cancel) -> bool:
    """True when ``cancel`` (an Event-like object, a callable or None) says stop."""
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def check_cancel(cancel) -> None:
    """Raise ``CancelledError`` when the caller asked to stop."""
    if is_cancelled(cancel):
        raise CancelledError("segmentation cancelled by the caller")


class ProgressSpan:
    """Maps progress inside one step onto its share ``[start, end]`` of the whole run."""

    def __init__(self, callback: Optional[ProgressCallback], start: float, end: float, message: str):
        self.callback, self.start, self.end, self.message = callback, start, end, message

    def __call__(self, fraction: float, message: Optional[str] = None) -> None:
        if self.callback is not None:
            f = self.start + (self.end - self.start) * min(max(fraction, 0.0), 1.0)
            self.callback(f, message or self.message)


class ProgressPrinter:
    """Progress on stderr: a redrawn bar on a terminal, a line per step otherwise, or JSON lines
    (``mode`` "bar" or "json"; any other mode prints nothing)."""

    def __init__(self, mode: str, prefix: str = ""):
        self.mode, self.prefix = mode, prefix
        self.tty = sys.stderr.isatty()
        self._last_message, self._last_percent = None, -1

    def __call__(self, fraction: float, message: str) -> None:
        percent = int(round(100 * fraction))
        if self.mode == "json":
            print(json.dumps({"progress": round(fraction, 4), "message": message}), file=sys.stderr, flush=True)
        elif self.mode == "bar" and self.tty:
            bar = "#" * (percent // 4) + "." * (25 - percent // 4)
            print(f"\r{self.prefix}[{bar}] {percent:3d}% {message:<40.40}", end="", file=sys.stderr, flush=True)
            if fraction >= 1.0:
                print(file=sys.stderr)
        elif self.mode == "bar" and (message != self._last_message or percent >= self._last_percent + 25):
            # without a terminal: a line when the step changes or every quarter, not a flood
            print(f"{self.prefix}{percent:3d}% {message}", file=sys.stderr, flush=True)
        self._last_message, self._last_percent = message, percent
