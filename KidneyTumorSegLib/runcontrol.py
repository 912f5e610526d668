"""Progress reporting and cancellation shared by the pipeline stages.

``progress`` callbacks take ``(fraction, message)`` with fraction in [0, 1] over the whole
run. ``cancel`` is anything with ``is_set()`` (a ``threading.Event``) or a callable returning
True; checking it raises :class:`CancelledError` so no partial result escapes.
"""

from __future__ import annotations

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
