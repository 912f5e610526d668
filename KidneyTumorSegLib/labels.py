"""Label values of the output label maps (KiTS19 convention plus cyst), and the checks and
array helpers that the post-processing, measurements and enhancement check share."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

BACKGROUND = 0
KIDNEY = 1
TUMOR = 2
CYST = 3

#: name -> value, the vocabulary model manifests use for their classes.
LABEL_VALUES = {"background": BACKGROUND, "kidney": KIDNEY, "tumor": TUMOR, "cyst": CYST}


def check_label_image(labels: sitk.Image) -> None:
    """Raise TypeError / ValueError unless ``labels`` is a 3D scalar SimpleITK image of an integer type."""
    if not isinstance(labels, sitk.Image):
        raise TypeError(f"labels must be a SimpleITK.Image; got {type(labels).__name__}")
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"labels must be a 3D scalar image; got dimension {labels.GetDimension()} with "
            f"{labels.GetNumberOfComponentsPerPixel()} component(s) per pixel"
        )
    if labels.GetPixelID() not in (
        sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
        sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64,
    ):
        raise ValueError(f"labels must have an integer pixel type; got {labels.GetPixelIDTypeAsString()}")


def label_bounding_box(arr: np.ndarray) -> Optional[Tuple[slice, slice, slice]]:
    """Bounding box of ``arr != 0`` (a label array, any axis order) grown by one voxel (clipped), as numpy
    slices in ``arr``'s axis order; None if empty.

    Max-projections avoid a full-size boolean temporary. Also rejects values outside 0..3.
    """
    proj_yx = arr.max(axis=0)
    hi_val = proj_yx.max()
    lo_val = arr.min() if np.issubdtype(arr.dtype, np.signedinteger) else 0
    if lo_val < 0 or hi_val > CYST:
        raise ValueError(f"labels must hold values 0..{CYST}; got values from {lo_val} to {hi_val}")
    if hi_val == 0:
        return None
    proj_z = arr.max(axis=(1, 2))
    slices = []
    for proj in (proj_z, proj_yx.max(axis=1), proj_yx.max(axis=0)):
        nz = np.flatnonzero(proj)
        slices.append(slice(max(int(nz[0]) - 1, 0), min(int(nz[-1]) + 2, proj.size)))
    return tuple(slices)  # type: ignore[return-value]


def voxel_volume_mm3(img: sitk.Image) -> float:
    """Physical volume of one voxel of ``img`` in mm^3."""
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    return float(np.prod(img.GetSpacing()) * abs(np.linalg.det(direction)))


def connected_components(mask: np.ndarray) -> np.ndarray:
    """26-connected component ids (0 = background) of a boolean (z, y, x) array."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(img, True))
