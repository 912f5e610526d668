"""Physical-space grids: the working grid of a stage, boxes in millimetres, resampling.

Every stage of a model runs on a *working grid*: the input's voxel axes, permuted and
flipped so that they point as closely as possible along the LPS axes (x = patient
left, y = posterior, z = superior), with the stage's spacing. The permutation only
re-indexes the input (no rotation), so an oblique input stays oblique and nothing is
interpolated that would not be anyway. The numpy array of a working-grid image is
therefore ordered (S-I, A-P, R-L) by construction, whatever the input's storage order
(KiTS19 stores slices along its first axis with a permuted direction matrix).

Boxes are axis-aligned in the *canonical frame* ``u = C^T p`` where ``p`` is an LPS
point in mm and ``C`` the canonical direction (columns = working-grid axes). Box
coordinates are in mm, in (x, y, z) order along those axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in the canonical frame: ``lower``/``upper`` in mm, (x, y, z)."""

    lower: tuple[float, float, float]
    upper: tuple[float, float, float]

    @property
    def size_mm(self) -> tuple[float, float, float]:
        return tuple(float(u - l) for l, u in zip(self.lower, self.upper))

    @property
    def center(self) -> tuple[float, float, float]:
        return tuple(float((u + l) / 2) for l, u in zip(self.lower, self.upper))

    def expanded(self, margin_mm: float | Sequence[float]) -> "Box":
        m = np.broadcast_to(np.asarray(margin_mm, dtype=float), (3,))
        return Box(tuple(np.asarray(self.lower) - m), tuple(np.asarray(self.upper) + m))

    def intersection(self, other: "Box") -> Optional["Box"]:
        lo = np.maximum(self.lower, other.lower)
        hi = np.minimum(self.upper, other.upper)
        if np.any(hi < lo):
            return None
        return Box(tuple(lo), tuple(hi))

    def union(self, other: "Box") -> "Box":
        return Box(tuple(np.minimum(self.lower, other.lower)), tuple(np.maximum(self.upper, other.upper)))

    def overlaps(self, other: "Box") -> bool:
        return bool(np.all(np.asarray(self.lower) <= other.upper) and np.all(np.asarray(other.lower) <= self.upper))


@dataclass(frozen=True)
class Grid:
    """A voxel grid: size and spacing in (x, y, z) order, origin in LPS mm, direction row-major 3x3."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def canonical_axes(direction: Sequence[float]) -> tuple[np.ndarray, tuple[int, int, int], tuple[int, int, int]]:
    """Closest-to-LPS re-indexing of a direction matrix.

    Takes a row-major 3x3 direction (columns = image axes in LPS). Returns
    ``(C, perm, signs)``: ``C`` is the canonical direction (3x3 array), whose column
    ``k`` is ``signs[k] * D[:, perm[k]]``, chosen so that column k points mostly along
    LPS axis k with a positive component.
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
        raise ValueError(f"direction matrix is not orthonormal: {tuple(direction)}")
    best, best_score = None, -1.0
    for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        score = sum(abs(d[k, perm[k]]) for k in range(3))
        if score > best_score + 1e-9:
            best, best_score = perm, score
    signs = tuple(1 if d[k, best[k]] >= 0 else -1 for k in range(3))
    c = np.stack([signs[k] * d[:, best[k]] for k in range(3)], axis=1)
    return c, best, signs


def canonical_spacing(image: sitk.Image) -> tuple[float, float, float]:
    """The image's spacing along the canonical (x, y, z) axes, in mm."""
    _, perm, _ = canonical_axes(image.GetDirection())
    sp = image.GetSpacing()
    return tuple(float(sp[perm[k]]) for k in range(3))


def image_box(image: sitk.Image) -> Box:
    """Canonical-frame box spanned by the image's voxels (their full extent, centres +- half a voxel)."""
    c, _, _ = canonical_axes(image.GetDirection())
    size = np.asarray(image.GetSize())
    corners = []
    for corner in np.ndindex(2, 2, 2):
        idx = np.where(np.asarray(corner) == 1, size - 0.5, -0.5)
        corners.append(np.asarray(image.TransformContinuousIndexToPhysicalPoint(idx.tolist())))
    u = np.asarray(corners) @ c
    return Box(tuple(u.min(axis=0)), tuple(u.max(axis=0)))


def index_box_to_box(image: sitk.Image, lower_index: Sequence[int], upper_index: Sequence[int]) -> Box:
    """Canonical-frame box covering voxels ``lower_index..upper_index`` (inclusive, (x, y, z) image index)."""
    c, _, _ = canonical_axes(image.GetDirection())
    lo = np.asarray(lower_index, dtype=float) - 0.5
    hi = np.asarray(upper_index, dtype=float) + 0.5
    corners = [
        np.asarray(image.TransformContinuousIndexToPhysicalPoint(np.where(np.asarray(k) == 1, hi, lo).tolist()))
        for k in np.ndindex(2, 2, 2)
    ]
    u = np.asarray(corners) @ c
    return Box(tuple(u.min(axis=0)), tuple(u.max(axis=0)))


def grid_for_box(box: Box, spacing: Sequence[float], canonical_direction: np.ndarray,
                 min_size: Sequence[int] = (1, 1, 1)) -> Grid:
    """Working grid covering ``box`` at ``spacing`` ((x, y, z) mm) along the canonical axes.

    Voxels are centred in the box; the size along an axis is ``ceil(extent / spacing)``
    (at least ``min_size``), so the grid covers the box completely.
    """
    spacing = np.asarray(spacing, dtype=float)
    extent = np.asarray(box.size_mm)
    size = np.maximum(np.ceil(extent / spacing - 1e-6).astype(int), np.asarray(min_size, dtype=int))
    size = np.maximum(size, 1)
    first_centre_u = np.asarray(box.center) - (size - 1) * spacing / 2.0
    origin = canonical_direction @ first_centre_u
    return Grid(tuple(int(s) for s in size), tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                tuple(float(v) for v in canonical_direction.ravel()))


def stage_spacing(image: sitk.Image, spacing: Sequence[Optional[float]]) -> tuple[float, float, float]:
    """Resolve a stage spacing whose ``None`` entries mean "keep the input's spacing on that axis"."""
    native = canonical_spacing(image)
    return tuple(float(native[k] if spacing[k] is None else spacing[k]) for k in range(3))


def resample(image: sitk.Image, grid: Grid, interpolator: int = sitk.sitkLinear,
             default_value: float = 0.0, pixel_type: Optional[int] = None) -> sitk.Image:
    """Resample ``image`` (scalar or vector) onto ``grid``; outside the image gets ``default_value``."""
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in grid.size])
    f.SetOutputSpacing(grid.spacing)
    f.SetOutputOrigin(grid.origin)
    f.SetOutputDirection(grid.direction)
    f.SetInterpolator(interpolator)
    f.SetDefaultPixelValue(float(default_value))
    f.SetOutputPixelType(image.GetPixelID() if pixel_type is None else pixel_type)
    return f.Execute(image)


def shrink_for_spacing(image: sitk.Image, target_spacing: Sequence[float]) -> sitk.Image:
    """Block-average ``image`` by integer factors before a large down-sampling.

    Linear interpolation from 0.8 mm to 6 mm would alias (it reads 8 voxels out of
    ~500 per output voxel); averaging blocks first is cheap, keeps the pixel type and
    keeps geometry exact (ITK's BinShrink updates origin and spacing).
    ``target_spacing`` is in canonical (x, y, z) order; factors are applied per image axis.
    """
    _, perm, _ = canonical_axes(image.GetDirection())
    factors = [1, 1, 1]
    for k in range(3):
        axis = perm[k]
        factor = int(math.floor(target_spacing[k] / image.GetSpacing()[axis] + 1e-6))
        factors[axis] = max(1, min(factor, image.GetSize()[axis]))
    if factors == [1, 1, 1]:
        return image
    return sitk.BinShrink(image, factors)


def region_index_range(reference: sitk.Image, box: Box) -> Optional[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """Index range ``(start, size)`` ((x, y, z)) of the voxels of ``reference`` whose centres lie in ``box``.

    Returns None when no voxel centre is inside.
    """
    c, _, _ = canonical_axes(reference.GetDirection())
    lo_idx = np.full(3, np.inf)
    hi_idx = np.full(3, -np.inf)
    for corner in np.ndindex(2, 2, 2):
        u = np.where(np.asarray(corner) == 1, box.upper, box.lower)
        idx = np.asarray(reference.TransformPhysicalPointToContinuousIndex((c @ u).tolist()))
        lo_idx = np.minimum(lo_idx, idx)
        hi_idx = np.maximum(hi_idx, idx)
    size = np.asarray(reference.GetSize())
    start = np.maximum(np.ceil(lo_idx - 1e-6), 0).astype(int)
    stop = np.minimum(np.floor(hi_idx + 1e-6), size - 1).astype(int)
    if np.any(stop < start):
        return None
    return tuple(int(v) for v in start), tuple(int(v) for v in stop - start + 1)


def array_to_image(array: np.ndarray, grid: Grid, is_vector: bool = False) -> sitk.Image:
    """Wrap a (z, y, x) array (or (z, y, x, C) with ``is_vector``) as an image on ``grid``."""
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    return grid.apply_to(image)
