"""A PNG overview a person can look at: axial, coronal and sagittal slices through each kidney
(through its largest tumor when it has one) with the segmentation outlined (kidney green, tumor red, cyst blue; a second label map, e.g. the
truth, in yellow dashes is optional).

Slices are resampled in physical space (1 mm pixels, radiological display: patient's right
on the left of the image, anterior / superior at the top), so the picture is right whatever
the storage order of the input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from . import geometry as geo

WINDOW_HU = (-160.0, 240.0)
COLOURS = {1: (40, 220, 60), 2: (240, 40, 40), 3: (60, 120, 255)}
TRUTH_COLOUR = (255, 230, 0)


def _slice(image: sitk.Image, centre_u: np.ndarray, canonical: np.ndarray, plane: str, half_mm: float,
           interpolator, default: float) -> np.ndarray:
    """2D array (rows, cols) of ``image`` on a 1 mm plane through ``centre_u`` (canonical frame)."""
    extent = np.array([half_mm, half_mm, half_mm])
    extent[{"sagittal": 0, "coronal": 1, "axial": 2}[plane]] = 0.5
    box = geo.Box(tuple(centre_u - extent), tuple(centre_u + extent))
    grid = geo.grid_for_box(box, (1.0, 1.0, 1.0), canonical)
    arr = sitk.GetArrayFromImage(geo.resample(image, grid, interpolator, default))  # (z, y, x)
    if plane == "axial":
        return arr[0]                      # rows: anterior -> posterior, cols: right -> left
    if plane == "coronal":
        return arr[:, 0, :][::-1]          # rows: superior -> inferior, cols: right -> left
    return arr[:, :, 0][::-1]              # sagittal - rows: superior -> inferior, cols: anterior -> posterior


def _outline(mask: np.ndarray) -> np.ndarray:
    edge = np.zeros_like(mask)
    edge[1:, :] |= mask[1:, :] != mask[:-1, :]
    edge[:-1, :] |= mask[1:, :] != mask[:-1, :]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge[:, :-1] |= mask[:, 1:] != mask[:, :-1]
    return edge & mask


def _panel(ct2d: np.ndarray, lab2d: np.ndarray, truth2d: Optional[np.ndarray]) -> np.ndarray:
    lo, hi = WINDOW_HU
    grey = (np.clip((ct2d - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if truth2d is not None:
        edge = _outline(truth2d > 0)
        dashes = (np.add.outer(np.arange(edge.shape[0]), np.arange(edge.shape[1])) // 3) % 2 == 0
        rgb[edge & dashes] = TRUTH_COLOUR
    for value, colour in COLOURS.items():
        rgb[_outline(lab2d == value)] = colour
    return rgb


def write_overview_png(ct: sitk.Image, labels: sitk.Image, path: Path, truth: Optional[sitk.Image] = None,
                       half_mm: float = 80.0) -> Path:
    """Write ``path`` (PNG): one row per kidney component (up to two; the volume centre if none),
    axial, coronal and sagittal panels through the kidney's largest tumor (its centre if it has
    none). ``ct`` in HU, ``labels`` (and ``truth``) on any grid; ``truth`` is drawn dashed."""
    from .stages import component_boxes, label_mask

    canonical, _, _ = geo.canonical_axes(ct.GetDirection())
    kidneys = component_boxes(label_mask(labels, ("kidney", "tumor", "cyst")), 0.0, 2)
    tumors = component_boxes(label_mask(labels, ("tumor",)), 0.0, 16)
    centres = []
    for kidney in sorted(kidneys, key=lambda b: b.center[0]):
        inside = [t for t in tumors if kidney.overlaps(t)]  # biggest first
        centres.append(np.asarray(inside[0].center if inside else kidney.center))
    if not centres:
        centres = [np.asarray(geo.image_box(ct).center)]
    rows = []
    for centre in centres:
        panels = []
        for plane in ("axial", "coronal", "sagittal"):
            ct2d = _slice(ct, centre, canonical, plane, half_mm, sitk.sitkLinear, -1024.0)
            lab2d = _slice(labels, centre, canonical, plane, half_mm, sitk.sitkNearestNeighbor, 0)
            truth2d = None if truth is None else _slice(truth, centre, canonical, plane, half_mm, sitk.sitkNearestNeighbor, 0)
            panels.append(_panel(ct2d, lab2d, truth2d))
        height = max(p.shape[0] for p in panels)
        padded = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0))) for p in panels]
        rows.append(np.concatenate(padded, axis=1))
    width = max(r.shape[1] for r in rows)
    picture = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    picture = picture.repeat(2, axis=0).repeat(2, axis=1)  # 0.5 mm display pixels: outlines readable
    from .imageio import atomic_write, native_stderr_to_log

    image = sitk.GetImageFromArray(picture, isVector=True)

    def write(tmp: Path) -> None:
        with native_stderr_to_log(f"writing {path}"):
            sitk.WriteImage(image, str(tmp))

    def verify(tmp: Path) -> None:
        from .errors import OutputError

        try:
            back = sitk.ReadImage(str(tmp))
        except RuntimeError:
            back = None
        if back is None or back.GetSize() != image.GetSize():
            raise OutputError(f"Cannot write {path}: what was written is incomplete; is the disk full?")

    return atomic_write(Path(path), write, verify, overwrite=True)
