"""Volumes, sides, centroids and diameters of the structures in a label map.

Everything is measured in physical LPS space (spacing AND direction), so KiTS19's permuted
direction matrices give the same answers as an axial identity-direction volume.

Choices where the brief leaves room:
- Kidneys are the 26-connected components of ``label > 0`` (kidney with its lesions);
  tumors and cysts are the 26-connected components of label 2 and of label 3.
- Side: +x in LPS is the patient's left. The midline is the x centre of the image's extent
  (voxel centres of its corners); when the two largest kidney components lie on opposite
  sides of it, the midline becomes the mean of their centroid x, which is closer to the
  patient's own midline than the field of view's centre. A component with at least
  ``MIDLINE_FRACTION`` of its volume on each side (a horseshoe kidney) is "midline";
  otherwise its centroid x decides. A lesion takes the side of the kidney component holding it.
- Max diameter (3D Feret): the largest distance between the physical centres of two voxels of
  the lesion. Only convex-hull vertices can realise it, and a hull vertex is never strictly
  between two voxels of the lesion on a grid line, so the candidates are the voxels that are
  first or last on their grid line along all three axes (an exact reduction). Up to
  ``EXACT_MAX_POINTS`` candidates the maximum over all pairs is exact; above it the candidates
  are narrowed to the extremes along ``N_DIRECTIONS`` directions, which underestimates by at
  most D*(1 - cos(angular gap)) < 0.1 %.
- Confidence (only when the model's lesion probability is given): the mean, over a lesion's
  voxels, of the probability the segment stage gave the lesion classes (tumor + cyst, so a
  lesion the model hesitated between calling tumor or cyst is not "unsure" of being a lesion).
  It is what the model said, not a calibrated chance of being right: on scans unlike its
  training data a model can be confidently wrong.
"""

from __future__ import annotations

import logging
from typing import List, Optional

import numpy as np
import SimpleITK as sitk

from KidneyTumorSegLib.labels import (CYST, TUMOR, check_label_image, connected_components, label_bounding_box,
                                      voxel_volume_mm3)

logger = logging.getLogger(__name__)

#: a component with at least this fraction of its volume on each side of the midline is "midline"
MIDLINE_FRACTION = 0.2
#: up to this many hull candidates the Feret diameter is computed over all pairs
EXACT_MAX_POINTS = 4000
#: directions (on a half sphere) used to narrow larger candidate sets
N_DIRECTIONS = 2000

#: lesions from this volume (mL) up get a note of their own when the model is unsure of them
NOTE_MIN_LESION_ML = 1.0

_SIDE_ORDER = {"right": 0, "midline": 1, "left": 2}


def measure(labels: sitk.Image, lesion_probability: Optional[np.ndarray] = None) -> dict:
    """Measure kidneys, tumors and cysts of a 3D label map (0 bg, 1 kidney, 2 tumor, 3 cyst).

    ``lesion_probability`` (optional): the model's lesion probability on the label map's grid,
    an array (z, y, x) of the label map's shape, uint8 as round(255 p) or float in [0, 1]; with
    it each lesion item gets ``confidence``, its mean over the lesion (see the module doc).

    Returns a JSON-serialisable dict:
    ``kidneys``: list of {side, volume_ml (kidney + its lesions), tumor_volume_ml,
    cyst_volume_ml, centroid_lps_mm [x, y, z]}, sorted right, midline, left (then by volume);
    ``tumors`` and ``cysts``: {count, total_volume_ml, largest_diameter_mm, items: [{volume_ml,
    max_diameter_mm, centroid_lps_mm, side[, confidence]}] sorted by volume, largest first};
    ``labels_present``: sorted non-zero label values found;
    ``midline_x_lps_mm``: the x position used to split right from left.
    """
    check_label_image(labels)
    probability = _checked_probability(lesion_probability, labels)
    geometry = _Geometry(labels)
    midline = geometry.image_centre_x()
    view = sitk.GetArrayViewFromImage(labels)
    box = label_bounding_box(view)
    if box is None:
        return _result([], _lesion_summary([]), _lesion_summary([]), [], midline)

    crop = np.asarray(view[box])
    offset = np.array([s.start for s in box])  # numpy (z, y, x) index of crop[0, 0, 0]
    present = [int(v) for v in np.unique(crop) if v != 0]

    kidney_cc = connected_components(crop > 0)
    zyx = np.argwhere(kidney_cc > 0)
    ids = kidney_cc[tuple(zyx.T)]
    points = geometry.physical(zyx + offset)
    n_kidneys = int(ids.max())
    counts = np.bincount(ids, minlength=n_kidneys + 1)
    centroids = np.stack([np.bincount(ids, weights=points[:, c], minlength=n_kidneys + 1) for c in range(3)], 1)
    centroids[1:] /= counts[1:, None]
    values = crop[tuple(zyx.T)]

    largest_two = np.argsort(-counts[1:], kind="stable")[:2] + 1
    if largest_two.size == 2:
        xs = centroids[largest_two, 0]
        if (xs[0] - midline) * (xs[1] - midline) < 0:
            midline = float(xs.mean())
    left_fraction = np.bincount(ids, weights=points[:, 0] > midline, minlength=n_kidneys + 1)[1:] / counts[1:]
    sides = ["none"] + [
        _side(centroids[k, 0], left_fraction[k - 1], midline) for k in range(1, n_kidneys + 1)
    ]

    voxel_ml = voxel_volume_mm3(labels) / 1000.0
    tumor_counts = np.bincount(ids[values == TUMOR], minlength=n_kidneys + 1)
    cyst_counts = np.bincount(ids[values == CYST], minlength=n_kidneys + 1)
    kidneys = [
        {
            "side": sides[k],
            "volume_ml": float(counts[k] * voxel_ml),
            "tumor_volume_ml": float(tumor_counts[k] * voxel_ml),
            "cyst_volume_ml": float(cyst_counts[k] * voxel_ml),
            "centroid_lps_mm": [float(v) for v in centroids[k]],
        }
        for k in range(1, n_kidneys + 1)
    ]
    kidneys.sort(key=lambda d: (_SIDE_ORDER[d["side"]], -d["volume_ml"]))

    crop_probability = None if probability is None else probability[box]
    lesions = {
        label: _lesion_summary(_lesions(crop == label, offset, kidney_cc, sides, geometry, voxel_ml, crop_probability))
        for label in (TUMOR, CYST)
    }
    return _result(kidneys, lesions[TUMOR], lesions[CYST], present, midline)


def low_confidence_notes(stats: dict, below: float) -> List[str]:
    """A note on each tumor and cyst of :func:`measure`'s ``stats`` of at least ``NOTE_MIN_LESION_ML`` whose
    ``confidence`` is under ``below``, largest first (0 switches the notes off; items without a confidence get
    none). Smaller fragments get no note: on most scans some exist, and a note on every scan is one nobody reads
    (their confidence stays in ``stats``)."""
    if below <= 0:
        return []
    notes = []
    for key, name in (("tumors", "tumor"), ("cysts", "cyst")):
        for item in (stats.get(key) or {}).get("items", []):
            confidence = item.get("confidence")
            if confidence is None or confidence >= below or item["volume_ml"] < NOTE_MIN_LESION_ML:
                continue
            side = item.get("side")
            where = f" at the {side} kidney" if side in ("right", "left") else ""
            notes.append(f"the model is unsure of the {item['volume_ml']:.1f} mL {name}{where} (mean probability "
                         f"{confidence:.2f}, under {below:.2f}): check whether it is a lesion at all")
    return notes


def summarize(stats: dict) -> str:
    """One line of :func:`measure`'s result for people: per kidney its side and volume, tumors' count,
    volume and largest diameter, cysts' count and volume ("no kidney found" when empty)."""
    def ml(v: float) -> str:
        # two significant digits below 1 mL, so a small component does not read "0.0 mL"
        return f"{v:.1f} mL" if v >= 1 or v == 0 else f"{v:.2g} mL"

    parts = []
    kidneys = stats.get("kidneys", [])
    sides = [k["side"] for k in kidneys]
    seen = {}
    for k in kidneys:
        side = k["side"]
        seen[side] = seen.get(side, 0) + 1
        name = f"{side} kidney" if sides.count(side) == 1 else f"{side} kidney component {seen[side]} of {sides.count(side)}"
        parts.append(f"{name} {ml(k['volume_ml'])}")
    t = stats.get("tumors", {})
    if t.get("count"):
        parts.append(f"{t['count']} tumor(s) {ml(t['total_volume_ml'])}, largest diameter {t['largest_diameter_mm']:.1f} mm")
    c = stats.get("cysts", {})
    if c.get("count"):
        parts.append(f"{c['count']} cyst(s) {ml(c['total_volume_ml'])}")
    return "; ".join(parts) if parts else "no kidney found"


def feret_diameter_mm(mask: np.ndarray, index_to_mm: np.ndarray) -> float:
    """3D Feret diameter of a boolean (z, y, x) mask: max distance between voxel centres in mm.

    ``index_to_mm`` is the 3x3 matrix direction @ diag(spacing) taking an (x, y, z) index step
    to an LPS displacement. Exact up to ``EXACT_MAX_POINTS`` hull candidates, otherwise an
    underestimate by < 0.1 % (see module doc). Returns 0.0 for zero or one voxel.
    """
    candidates = mask.astype(bool, copy=True)
    for axis in range(3):
        before = np.logical_or.accumulate(mask, axis=axis)
        after = np.flip(np.logical_or.accumulate(np.flip(mask, axis), axis=axis), axis)
        # interior along this axis: some voxel strictly before AND strictly after on the line
        inner = np.zeros_like(candidates)
        lead = [slice(None)] * 3
        lag = [slice(None)] * 3
        mid = [slice(None)] * 3
        lead[axis], lag[axis], mid[axis] = slice(None, -2), slice(2, None), slice(1, -1)
        inner[tuple(mid)] = before[tuple(lead)] & after[tuple(lag)]
        candidates &= ~inner
    zyx = np.argwhere(candidates)
    if len(zyx) < 2:
        return 0.0
    pts = zyx[:, ::-1].astype(np.float64) @ np.asarray(index_to_mm, dtype=np.float64).T
    if len(pts) > EXACT_MAX_POINTS:
        pts = pts[_directional_extremes(pts)]
    return _max_pairwise_distance(pts)


class _Geometry:
    """Index -> LPS mapping of an image: p = origin + direction @ diag(spacing) @ index_xyz."""

    def __init__(self, img: sitk.Image) -> None:
        self.size = np.array(img.GetSize())
        self.origin = np.array(img.GetOrigin(), dtype=np.float64)
        direction = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
        self.matrix = direction @ np.diag(img.GetSpacing())

    def physical(self, zyx: np.ndarray) -> np.ndarray:
        """(N, 3) numpy (z, y, x) indices -> (N, 3) LPS points in mm."""
        return self.origin + zyx[:, ::-1].astype(np.float64) @ self.matrix.T

    def image_centre_x(self) -> float:
        corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (self.size - 1)
        xs = self.origin[0] + corners @ self.matrix[0]
        return float((xs.min() + xs.max()) / 2.0)


def _side(centroid_x: float, left_fraction: float, midline: float) -> str:
    if min(left_fraction, 1.0 - left_fraction) >= MIDLINE_FRACTION or centroid_x == midline:
        return "midline"
    return "left" if centroid_x > midline else "right"


def _checked_probability(probability, labels: sitk.Image) -> Optional[np.ndarray]:
    """``probability`` checked: the label map's array shape, and uint8 (round(255 p)) or float in [0, 1]."""
    if probability is None:
        return None
    array = np.asarray(probability)
    shape = tuple(reversed(labels.GetSize()))
    if array.shape != shape:
        raise ValueError(f"lesion_probability must have the label map's array shape (z, y, x) {shape}, got {array.shape}")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating) or array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1):
        raise ValueError(f"lesion_probability must be uint8 (round(255 p)) or float in [0, 1], got {array.dtype}")
    return array


def _mean_probability(values: np.ndarray) -> float:
    mean = float(np.mean(values, dtype=np.float64))
    return round(mean / 255.0 if values.dtype == np.uint8 else mean, 3)


def _lesions(
    mask: np.ndarray, offset: np.ndarray, kidney_cc: np.ndarray, sides: List[str],
    geometry: _Geometry, voxel_ml: float, probability: Optional[np.ndarray] = None,
) -> List[dict]:
    if not mask.any():
        return []
    cc = connected_components(mask)
    zyx = np.argwhere(cc > 0)
    ids = cc[tuple(zyx.T)]
    order = np.argsort(ids, kind="stable")
    zyx, ids = zyx[order], ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    items = []
    for start, end in zip(starts, ends):
        voxels = zyx[start:end]
        lo, hi = voxels.min(0), voxels.max(0) + 1
        sub = cc[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == ids[start]
        item = {
            "volume_ml": float(len(voxels) * voxel_ml),
            "max_diameter_mm": feret_diameter_mm(sub, geometry.matrix),
            "centroid_lps_mm": [float(v) for v in geometry.physical(voxels + offset).mean(0)],
            "side": sides[int(kidney_cc[tuple(voxels[0])])],
        }
        if probability is not None:
            item["confidence"] = _mean_probability(probability[tuple(voxels.T)])
        items.append(item)
    items.sort(key=lambda d: -d["volume_ml"])
    return items


def _lesion_summary(items: List[dict]) -> dict:
    return {
        "count": len(items),
        "total_volume_ml": float(sum(d["volume_ml"] for d in items)),
        "largest_diameter_mm": float(max((d["max_diameter_mm"] for d in items), default=0.0)),
        "items": items,
    }


def _result(kidneys: list, tumors: dict, cysts: dict, present: list, midline: float) -> dict:
    return {
        "kidneys": kidneys,
        "tumors": tumors,
        "cysts": cysts,
        "labels_present": present,
        "midline_x_lps_mm": float(midline),
    }


def _directional_extremes(pts: np.ndarray) -> np.ndarray:
    """Indices of the points extreme (min and max) along N_DIRECTIONS directions."""
    dirs = _half_sphere_directions(N_DIRECTIONS)
    keep = set()
    for chunk in np.array_split(dirs, max(1, len(dirs) // 250)):
        proj = pts @ chunk.T
        keep.update(np.argmax(proj, 0).tolist())
        keep.update(np.argmin(proj, 0).tolist())
    return np.array(sorted(keep))


def _half_sphere_directions(n: int) -> np.ndarray:
    """n near-uniform unit vectors with z >= 0 (Fibonacci lattice); +-v cover the sphere."""
    i = np.arange(n) + 0.5
    z = i / n
    r = np.sqrt(1.0 - z * z)
    phi = np.pi * (1.0 + 5.0 ** 0.5) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], 1)


def _max_pairwise_distance(pts: np.ndarray, chunk: int = 1024) -> float:
    centred = pts - pts.mean(0)  # smaller magnitudes keep the expansion below accurate
    sq = np.einsum("ij,ij->i", centred, centred)
    best = 0.0
    for start in range(0, len(centred), chunk):
        block = centred[start:start + chunk]
        d2 = sq[start:start + chunk, None] + sq[None, :] - 2.0 * block @ centred.T
        best = max(best, float(d2.max()))
    return float(np.sqrt(max(best, 0.0)))
