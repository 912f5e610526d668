"""A KiTS19-layout phantom dataset built on the real KiTS19 label maps.

For each selected ``case_XXXXX/segmentation.nii.gz`` (real kidney and tumor shapes on their real
CT grid, slices stored along the first axis with a permuted direction matrix) it writes
``OUT/case_XXXXX/imaging.nii.gz`` (a synthetic contrast-enhanced CT from
:func:`Training.phantoms.synthesize_ct`, int16 HU) and ``segmentation.nii.gz`` (uint8) on
exactly the same grid - or on a reduced grid that spans the same physical region:

* ``downsample_inplane`` F: the two in-plane axes (the image axes closest to patient x and y,
  found from the direction matrix) get ``round(n / F)`` voxels; spacing grows so the physical
  extent stays exactly the same, and the origin moves to the centre of the new first voxel.
* ``max_slices`` N: a case with more slices keeps the N slices centred on its labelled region
  (plus 10 mm); when the labelled region is longer than N slices, the slice spacing grows until
  it fits. Geometry stays physical: direction unchanged, origin and spacing recomputed.
* ``slice_mm`` S: slices at least S mm apart (thicker slices, e.g. 5 mm for a robustness set).
* ``fov_fraction`` F (0 < F <= 1): after synthesis, image and labels keep the central F of each
  in-plane axis - a smaller reconstruction field of view that may cut the body (and a kidney).
* ``noise_scale``: multiplies the synthesizer's 10-25 HU noise.

Labels are resampled with nearest neighbour. ``cysts``: some cases (60 %) get 1-2 cyst-like
lesions (label 3): spheres of 4-15 mm radius centred near the kidney surface, never over a tumor.
Every random draw comes from ``numpy.random.default_rng([seed, case number])``, so a case does not
depend on which other cases are built. The KiTS19 labels are CC BY-NC-SA 4.0 (Heller et al.,
arXiv:1904.00445); ``phantoms.json`` records that with the options used.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from KidneyTumorSegLib import geometry as geo
from KidneyTumorSegLib.errors import InputError, OutputError
from KidneyTumorSegLib.imageio import write_image_atomic
from KidneyTumorSegLib.labels import CYST, KIDNEY, TUMOR

from .dataset import IMAGE_NAME, LABELS_NAME, case_name, list_cases, make_dataset_folder, read_labels

logger = logging.getLogger(__name__)

PHANTOMS_JSON = "phantoms.json"
SLICE_MARGIN_MM = 10.0
CYST_CASE_FRACTION = 0.6


def reduce_grid(labels: sitk.Image, downsample_inplane: float = 1.0, max_slices: Optional[int] = None,
                slice_mm: Optional[float] = None) -> sitk.Image:
    """``labels`` on a coarser in-plane grid and/or fewer or thicker slices (see the module text); same
    image axes, direction and physical extent per axis (except the slices cropped away)."""
    if slice_mm is not None and not slice_mm > 0:
        raise InputError(f"--slice-mm must be > 0, got {slice_mm}")
    if downsample_inplane < 1.0:
        raise InputError(f"--downsample-inplane must be >= 1, got {downsample_inplane}")
    if max_slices is not None and max_slices < 1:
        raise InputError(f"--max-slices must be >= 1, got {max_slices}")
    _, perm, _ = geo.canonical_axes(labels.GetDirection())
    size = list(labels.GetSize())
    spacing = list(labels.GetSpacing())
    lo, hi = [0, 0, 0], list(size)  # index ranges [lo, hi) kept, per image axis
    factor = [1.0, 1.0, 1.0]
    for a in (perm[0], perm[1]):
        factor[a] = float(downsample_inplane)
    zaxis = perm[2]
    if max_slices is not None and size[zaxis] > max_slices:
        arr = sitk.GetArrayViewFromImage(labels)
        array_axis = 2 - zaxis
        occupied = np.nonzero(np.any(arr > 0, axis=tuple(k for k in range(3) if k != array_axis)))[0]
        margin = int(math.ceil(SLICE_MARGIN_MM / spacing[zaxis]))
        if occupied.size:
            f_lo, f_hi = max(0, int(occupied[0]) - margin), min(size[zaxis], int(occupied[-1]) + 1 + margin)
        else:
            f_lo, f_hi = 0, size[zaxis]
        span = f_hi - f_lo
        if span <= max_slices:
            start = (f_lo + f_hi) // 2 - max_slices // 2
            start = min(max(0, start), size[zaxis] - max_slices)
            lo[zaxis], hi[zaxis] = start, start + max_slices
        else:
            lo[zaxis], hi[zaxis] = f_lo, f_hi
            factor[zaxis] = span / max_slices
    if slice_mm is not None:
        factor[zaxis] = max(factor[zaxis], float(slice_mm) / spacing[zaxis])
    new_size, new_spacing, first = [], [], []
    for a in range(3):
        extent = hi[a] - lo[a]
        n = max(1, int(round(extent / factor[a])))
        if max_slices is not None and a == zaxis:
            n = min(n, max_slices)
        f = extent / n  # exact factor: the new voxels tile the kept extent
        new_size.append(n)
        new_spacing.append(spacing[a] * f)
        first.append(lo[a] - 0.5 + f / 2.0)  # continuous old index of the new first voxel's centre
    if new_size == size and lo == [0, 0, 0]:
        return labels
    grid = geo.Grid(tuple(new_size), tuple(new_spacing), tuple(labels.TransformContinuousIndexToPhysicalPoint(first)),
                    tuple(labels.GetDirection()))
    return geo.resample(labels, grid, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def add_cysts(labels: sitk.Image, rng: np.random.Generator, count: int) -> sitk.Image:
    """``count`` cyst spheres (label 3, radius 4-15 mm) centred near the kidney surface, in physical
    space; tumor voxels are never overwritten. Returns a new uint8 image on the same grid."""
    arr = sitk.GetArrayFromImage(labels).astype(np.uint8)
    kidney = sitk.GetImageFromArray((arr == KIDNEY).astype(np.uint8))
    kidney.CopyInformation(labels)
    rim = sitk.GetArrayViewFromImage(kidney) & ~sitk.GetArrayViewFromImage(sitk.BinaryErode(kidney, [1, 1, 1]))
    candidates = np.argwhere(rim.astype(bool))
    if count <= 0 or candidates.size == 0:
        return labels
    spacing = np.asarray(labels.GetSpacing())
    matrix = np.asarray(labels.GetDirection()).reshape(3, 3) @ np.diag(spacing)  # index (x, y, z) -> LPS offset
    origin = np.asarray(labels.GetOrigin())
    inverse = np.linalg.inv(matrix)
    size = np.asarray(labels.GetSize())
    for _ in range(count):
        z, y, x = candidates[int(rng.integers(len(candidates)))]
        radius = float(rng.uniform(4.0, 15.0))
        offset = rng.normal(0.0, 1.0, 3)
        centre = origin + matrix @ np.array([x, y, z], float) + offset / np.linalg.norm(offset) * radius * rng.uniform(0.0, 0.5)
        centre_idx = inverse @ (centre - origin)
        half = np.abs(inverse).sum(axis=1) * radius + 1  # index half-widths of the sphere's box
        lo = np.maximum(np.floor(centre_idx - half).astype(int), 0)
        hi = np.minimum(np.ceil(centre_idx + half).astype(int) + 1, size)
        if np.any(hi <= lo):
            continue
        ix, iy, iz = np.meshgrid(*(np.arange(lo[k], hi[k]) for k in range(3)), indexing="ij")
        idx = np.stack([ix, iy, iz], axis=-1).reshape(-1, 3).astype(float)
        inside = np.linalg.norm(origin + idx @ matrix.T - centre, axis=1) <= radius
        sel = idx[inside].astype(int)
        view = arr[sel[:, 2], sel[:, 1], sel[:, 0]]
        arr[sel[:, 2], sel[:, 1], sel[:, 0]] = np.where(view == TUMOR, TUMOR, CYST)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(labels)
    return out


def crop_fov(image: sitk.Image, fraction: float) -> sitk.Image:
    """The central ``fraction`` of ``image``'s two in-plane axes (those closest to patient x and y), all
    slices; geometry kept physical (origin moves to the first kept voxel)."""
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"--fov-fraction must be in (0, 1], got {fraction}")
    _, perm, _ = geo.canonical_axes(image.GetDirection())
    size, start = list(image.GetSize()), [0, 0, 0]
    for a in (perm[0], perm[1]):
        n = max(1, int(round(size[a] * fraction)))
        start[a], size[a] = (size[a] - n) // 2, n
    return sitk.RegionOfInterest(image, size, start)


def make_phantom(labels: sitk.Image, case_number: int, seed: int = 0, downsample_inplane: float = 1.0,
                 max_slices: Optional[int] = None, cysts: bool = False, intensity_shift_hu: float = 0.0,
                 noise_scale: float = 1.0, slice_mm: Optional[float] = None, fov_fraction: float = 1.0):
    """One phantom case: ``(ct, labels)`` (int16 HU, uint8) from a real label map, deterministic in
    ``(seed, case_number)``."""
    from .phantoms import synthesize_ct

    rng = np.random.default_rng([int(seed), int(case_number)])
    reduced = reduce_grid(labels, downsample_inplane, max_slices, slice_mm)
    if cysts and rng.random() < CYST_CASE_FRACTION:
        reduced = add_cysts(reduced, rng, int(rng.integers(1, 3)))
    ct, out_labels = synthesize_ct(reduced, rng=rng, intensity_shift_hu=intensity_shift_hu, noise_scale=noise_scale,
                                   cyst_as_label=True)
    if fov_fraction < 1.0:
        ct, out_labels = crop_fov(ct, fov_fraction), crop_fov(out_labels, fov_fraction)
    return ct, out_labels


def make_phantom_dataset(labels_dir: Path, out_dir: Path, cases: Optional[Sequence[int]] = None, seed: int = 0,
                         downsample_inplane: float = 1.0, max_slices: Optional[int] = None, cysts: bool = False,
                         intensity_shift_hu: float = 0.0, noise_scale: float = 1.0, slice_mm: Optional[float] = None,
                         fov_fraction: float = 1.0, overwrite: bool = False,
                         progress: Optional[Callable[[int, int, str], None]] = None) -> dict:
    """Write the phantom dataset (see the module text); returns the ``phantoms.json`` record.

    Existing case folders are kept (so an interrupted run continues) unless ``overwrite``.
    ``progress(done, total, case_name)`` is called after each case.
    """
    if not 0.0 < float(fov_fraction) <= 1.0:
        raise InputError(f"--fov-fraction must be in (0, 1], got {fov_fraction}")
    if noise_scale < 0:
        raise InputError(f"--noise-scale must be >= 0, got {noise_scale}")
    sources = list_cases(Path(labels_dir), cases, need_labels=True, image_name=LABELS_NAME)
    out_dir = make_dataset_folder(out_dir)
    options = {"seed": int(seed), "downsample_inplane": float(downsample_inplane), "max_slices": max_slices,
               "cysts": bool(cysts), "intensity_shift_hu": float(intensity_shift_hu)}
    # recorded only when used, so datasets written before these options existed still match
    for key, value, default in (("noise_scale", noise_scale, 1.0), ("slice_mm", slice_mm, None),
                                ("fov_fraction", fov_fraction, 1.0)):
        if value != default:
            options[key] = float(value)
    record_path = out_dir / PHANTOMS_JSON
    if record_path.is_file() and not overwrite:
        previous = json.loads(record_path.read_text())
        if previous.get("options") != options:
            raise OutputError(f"{out_dir} holds phantoms made with other options {previous.get('options')}; "
                              "choose another --out or pass --overwrite")
    written = []
    t0 = time.perf_counter()
    for i, case in enumerate(sources):
        folder = out_dir / case.name
        if overwrite or not ((folder / IMAGE_NAME).is_file() and (folder / LABELS_NAME).is_file()):
            ct, labels = make_phantom(read_labels(case), case.number, **options)
            write_image_atomic(labels, folder / LABELS_NAME, overwrite=True)
            write_image_atomic(ct, folder / IMAGE_NAME, overwrite=True)
        written.append(case.number)
        if progress is not None:
            progress(i + 1, len(sources), case.name)
    record = {
        "kind": "kits19-label phantoms",
        "source_labels": str(Path(labels_dir).resolve()),
        "cases": sorted(set(written) | set(_existing(out_dir))),
        "options": options,
        "synthesizer": "Training.phantoms.synthesize_ct",
        "licence": "CC BY-NC-SA 4.0 (derived from the KiTS19 label maps, Heller et al., arXiv:1904.00445)",
        "note": "synthetic CT on real KiTS19 label maps; not patient images",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    logger.info("wrote %d phantom cases to %s", len(written), out_dir)
    return record


def _existing(out_dir: Path) -> list[int]:
    numbers = []
    for p in out_dir.glob("case_*"):
        if (p / IMAGE_NAME).is_file() and (p / LABELS_NAME).is_file():
            try:
                numbers.append(int(p.name.split("_")[1]))
            except (IndexError, ValueError):
                continue
    return numbers


def is_phantom_dataset(data_dir: Path) -> bool:
    """True when ``data_dir`` was written by :func:`make_phantom_dataset`."""
    return (Path(data_dir) / PHANTOMS_JSON).is_file()


__all__ = ["reduce_grid", "add_cysts", "crop_fov", "make_phantom", "make_phantom_dataset", "is_phantom_dataset", "case_name"]
