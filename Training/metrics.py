"""KiTS19 evaluation metrics, computed in physical space.

* Dice and the KiTS19 structures are the library's (:mod:`KidneyTumorSegLib.metrics`, re-exported
  here): both empty scores 1; "kidney" = every non-background label (cyst included), "tumor" = label 2.
* Surface distances: the surface of a mask is its voxels with a face neighbour outside it
  (the volume is padded by one background voxel first, so a mask touching the image border
  has a surface there). Distances are Euclidean in millimetres between voxel centres, via
  SimpleITK's Maurer distance map with the image spacing (the direction matrix is a rotation,
  so it does not change distances).
* HD95: the larger of the two directed 95th percentiles (prediction surface to truth surface
  and back), numpy's linear percentile. Both empty: 0; one empty: infinity.
* Surface Dice at tolerance tau (Nikolov et al. 2018, counted on surface voxels rather than
  surface-element areas): (#prediction-surface voxels within tau of the truth surface +
  #truth-surface voxels within tau of the prediction surface) / (#both surfaces).
  Both empty: 1; one empty: 0.

Work is cropped to the union bounding box of both masks (plus one voxel), which keeps the
distances exact: the nearest surface voxel of either mask lies inside that box.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from KidneyTumorSegLib.labels import KIDNEY, TUMOR
from KidneyTumorSegLib.metrics import KITS_STRUCTURES as STRUCTURES
from KidneyTumorSegLib.metrics import dice, kits_dice, kits_masks

__all__ = ["SURFACE_TOLERANCE_MM", "STRUCTURES", "dice", "hd95", "kits_metrics", "structure_masks", "surface_dice",
           "surface_distances"]

SURFACE_TOLERANCE_MM = 2.0


def _crop_box(a: np.ndarray, b: np.ndarray):
    either = a | b
    idx = [np.nonzero(np.any(either, axis=tuple(k for k in range(3) if k != ax)))[0] for ax in range(3)]
    return tuple(slice(max(0, int(i[0]) - 1), int(i[-1]) + 2) for i in idx)


def _surface(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask.astype(np.uint8), 1)
    contour = sitk.BinaryContour(sitk.GetImageFromArray(padded), fullyConnected=False, backgroundValue=0, foregroundValue=1)
    return sitk.GetArrayViewFromImage(contour)[1:-1, 1:-1, 1:-1].astype(bool)


def _distance_to(surface: np.ndarray, spacing_zyx) -> np.ndarray:
    img = sitk.GetImageFromArray(surface.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    dist = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.abs(sitk.GetArrayFromImage(dist))


def surface_distances(prediction: np.ndarray, truth: np.ndarray, spacing_xyz) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each prediction-surface voxel to the truth surface, and from each truth-surface
    voxel to the prediction surface. Masks are (z, y, x) boolean arrays; ``spacing_xyz`` in mm, (x, y, z).
    Either array is empty when its mask is empty (or the other mask is)."""
    a, b = np.asarray(prediction, bool), np.asarray(truth, bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    if not a.any() or not b.any():
        return np.zeros(0), np.zeros(0)
    box = _crop_box(a, b)
    a, b = a[box], b[box]
    spacing_zyx = tuple(reversed([float(s) for s in spacing_xyz]))
    sa, sb = _surface(a), _surface(b)
    to_b = _distance_to(sb, spacing_zyx)
    to_a = _distance_to(sa, spacing_zyx)
    return to_b[sa], to_a[sb]


def hd95(prediction: np.ndarray, truth: np.ndarray, spacing_xyz) -> float:
    """95th-percentile Hausdorff distance in mm (max of the two directed 95th percentiles)."""
    a, b = np.asarray(prediction, bool), np.asarray(truth, bool)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return math.inf
    d_ab, d_ba = surface_distances(a, b, spacing_xyz)
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def surface_dice(prediction: np.ndarray, truth: np.ndarray, spacing_xyz, tolerance_mm: float = SURFACE_TOLERANCE_MM) -> float:
    """Surface Dice at ``tolerance_mm``: the fraction of both surfaces lying within the tolerance of the other."""
    a, b = np.asarray(prediction, bool), np.asarray(truth, bool)
    if not a.any() and not b.any():
        return 1.0
    if not a.any() or not b.any():
        return 0.0
    d_ab, d_ba = surface_distances(a, b, spacing_xyz)
    return float((np.count_nonzero(d_ab <= tolerance_mm) + np.count_nonzero(d_ba <= tolerance_mm)) / (d_ab.size + d_ba.size))


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3) and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def kits_metrics(prediction: sitk.Image, truth: sitk.Image, tolerance_mm: float = SURFACE_TOLERANCE_MM) -> dict:
    """KiTS19 metrics of a predicted label map against the truth (both label images, 0..3).

    The prediction is resampled (nearest neighbour) onto the truth's grid when the grids differ.
    Returns ``kidney_dice``, ``tumor_dice``, ``mean_dice`` (their mean, the KiTS19 score),
    ``kidney_hd95_mm``, ``tumor_hd95_mm``, ``kidney_surface_dice``, ``tumor_surface_dice``.
    """
    if not _same_grid(prediction, truth):
        prediction = sitk.Resample(prediction, truth, sitk.Transform(), sitk.sitkNearestNeighbor, 0, prediction.GetPixelID())
    p = sitk.GetArrayViewFromImage(prediction)
    t = sitk.GetArrayViewFromImage(truth)
    spacing = truth.GetSpacing()
    out = kits_dice(p, t)
    pk, tk = kits_masks(p), kits_masks(t)
    for name in STRUCTURES:
        out[f"{name}_hd95_mm"] = hd95(pk[name], tk[name], spacing)
        out[f"{name}_surface_dice"] = surface_dice(pk[name], tk[name], spacing, tolerance_mm)
    return out


def structure_masks(prediction: np.ndarray, truth: np.ndarray, label_values) -> dict:
    """``{structure: (predicted mask, true mask)}`` of two arrays of label values (0..3), for the KiTS19
    structures a stage predicting ``label_values`` can show: kidney (all non-background) needs kidney (1)
    among them, tumor needs tumor (2)."""
    values = set(int(v) for v in label_values)
    shown = {"kidney": KIDNEY in values, "tumor": TUMOR in values}
    p, t = kits_masks(prediction), kits_masks(truth)
    return {name: (p[name], t[name]) for name in STRUCTURES if shown[name]}
