"""KidneyTumorSegLib: kidney, kidney tumor and cyst segmentation in contrast-enhanced CT.

Public API (small and stable):

* :func:`segment` - segment one CT (a path or a ``SimpleITK.Image`` in HU) with a model
  package, returning a :class:`SegmentationResult` (uint8 label map on the input grid:
  0 background, 1 kidney, 2 tumor, 3 cyst; measurements; per-stage timings).
* :func:`load_model` / :func:`list_models` - model packages (bundled and installed).
* the exception types in :mod:`KidneyTumorSegLib.errors`.

torch is imported only when a segmentation runs, so importing this package is cheap.
"""

from __future__ import annotations

from .errors import (CancelledError, DeviceError, InputError, InsufficientMemoryError, KidneyTumorSegError,
                     ModelPackageError, NotCTLikeError, OutputError)

__version__ = "0.1.0"

__all__ = ["segment", "load_model", "list_models", "__version__", "KidneyTumorSegError", "InputError",
           "InsufficientMemoryError", "NotCTLikeError", "OutputError", "ModelPackageError", "CancelledError",
           "DeviceError"]


def load_model(name_or_path=None, verify: bool = True):
    """A verified model package (``None`` = the bundled default) - see :mod:`KidneyTumorSegLib.models`."""
    from .models import load_package

    return load_package(name_or_path, verify=verify)


def list_models():
    """``ModelInfo`` of every bundled and installed model package."""
    from .models import list_models as _list

    return _list()


def segment(image_or_path, model=None, device: str = "auto", tta: bool = False, force: bool = False,
            progress=None, cancel=None, series_uid=None):
    """Segment kidneys, tumors (and cysts) in a contrast-enhanced CT.

    Args:
        image_or_path: a ``SimpleITK.Image`` (3D, HU) or a path (NIfTI, NRRD, MetaImage,
            or a folder holding a DICOM series; ``series_uid`` picks one of several).
        model: a model package name, a package folder, a loaded ``ModelPackage``, or None
            for the bundled default.
        device: ``auto``, ``cuda``, ``mps`` or ``cpu``.
        tta: mirror test-time augmentation (slower, slightly more robust).
        force: accept images whose intensities do not look like CT in HU.
        progress: callback ``(fraction, message)``; cancel: ``threading.Event``-like
            (``is_set()``) or callable; when set the run stops with ``CancelledError``.

    Returns:
        ``SegmentationResult`` with ``labels`` (uint8 ``sitk.Image`` on exactly the
        input's grid), ``stats``, ``timings`` (seconds per stage), ``model_name``, ``device``.
    """
    import SimpleITK as sitk

    from .imageio import read_image, read_image_information
    from .models import ModelPackage, load_package
    from .pipeline import Segmenter
    from .validation import check_memory, validate_ct_header

    package = model if isinstance(model, ModelPackage) else load_package(model)
    if not isinstance(image_or_path, sitk.Image):
        info = read_image_information(image_or_path, series_uid=series_uid)  # size, spacing, memory: before reading
        validate_ct_header(info)
        check_memory(info, manifest=package.manifest)
        image_or_path = read_image(image_or_path, series_uid=series_uid)
    # Segmenter.segment validates the image (the one CT check every entry point passes through)
    return Segmenter(package, device=device, tta=tta).segment(image_or_path, progress=progress, cancel=cancel, force=force)
