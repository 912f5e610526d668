"""Exception types of the library.

Every error a user can cause (bad input, bad model package, output problems)
is a subclass of :class:`KidneyTumorSegError`, whose message is one line that
says what was expected and what came in. The command line prints that line
and exits non-zero instead of showing a traceback.
"""


class KidneyTumorSegError(Exception):
    """Base class of all errors the library raises on purpose."""


class InputError(KidneyTumorSegError):
    """The input image or path is unusable (missing, unreadable, not a 3D CT, ...)."""


class NotCTLikeError(InputError):
    """The intensities do not look like a CT in Hounsfield units; ``force`` segments it anyway.
    (The one error a user may overrule; the CLI's JSON progress stream reports its kind.)"""


class InsufficientMemoryError(InputError):
    """The volume needs more memory than is available."""


class OutputError(KidneyTumorSegError):
    """An output cannot be written (exists without overwrite, folder not writable)."""


class ModelPackageError(KidneyTumorSegError):
    """A model package is missing, corrupt, of the wrong version or inconsistent."""


class CancelledError(KidneyTumorSegError):
    """The caller asked the run to stop; no partial result is returned."""


class DeviceError(KidneyTumorSegError, ValueError):
    """The requested device (``--device``) does not exist or is not available here."""
