"""Anatomical landmarks estimated from the CT itself, and the plausibility rules for kidney components.

Whatever a network outputs, a kidney component (its kidney, tumor and cyst voxels, 26-connected)
must be anatomically plausible to be kept:

* **volume** between ``min_volume_ml`` and ``max_volume_ml`` (kidney *with its lesions*; a
  component touching the image border - cut by the field of view - is exempt from the minimum);
* **beside the spine**: its centroid ``min_lateral_mm``..``max_lateral_mm`` from the spine axis
  along patient left-right (the maximum is also capped at ``max_lateral_body_fraction`` of the
  body's half-width on that side at that level, so the rule scales with a small body), unless the
  component reaches ``HORSESHOE_EXTENT_MM`` to both sides of the spine (a horseshoe kidney, whose
  centroid lies on the midline), and not more than ``max_anterior_mm`` anterior of the spine;
* **not in the chest**: at most ``max_fraction_above_lung_base`` of its volume above the lung
  bases, when the lungs are in the field of view.

Landmarks come from a 4 mm copy of the CT on the canonical (closest-to-LPS) working grid of
:mod:`geometry`; every landmark and centroid is then expressed in physical LPS mm (x = patient
left, y = posterior, z = superior), so any direction matrix works:

* body: the largest 26-connected region above -500 HU, its holes filled slice by slice;
* spine: per axial slice, the bone (> 250 HU) inside the body within 50 mm of the body's
  left-right centre and in its posterior half (from 10 mm anterior of its antero-posterior
  centre); its median position is the spine point of that slice. Found when at least half of the
  body's slices have >= 150 mm^2 of it; the axis is the median-smoothed points, interpolated along z;
* lung bases: per slice, the air (< -500 HU) enclosed by the body in the body's posterior half
  (supine patients' bowel gas rises anteriorly; the lung bases and their posterior recesses are
  posterior); a slice is a lung slice when that air is >= 20 % of the posterior half and >= 10 cm^2.
  The lung base is the inferior end of the most superior run (>= 16 mm) of lung slices; when that run
  reaches the bottom of the field of view the base is not in view.

When a landmark is not found (a small field of view, a phantom without a spine, no lungs in view)
the rules needing it are skipped, and the result says so in its notes - never a guess.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import SimpleITK as sitk

from . import geometry as geo
from .labels import connected_components, voxel_volume_mm3

LANDMARK_SPACING_MM = 4.0
BODY_MIN_HU = -500.0
BONE_MIN_HU = 250.0
SPINE_BAND_MM = 50.0
SPINE_ANTERIOR_ALLOWANCE_MM = 10.0
SPINE_MIN_AREA_MM2 = 150.0
SPINE_MIN_SLICE_FRACTION = 0.5
LUNG_MIN_POSTERIOR_AIR_FRACTION = 0.2
LUNG_MIN_AREA_MM2 = 1000.0
LUNG_MIN_RUN_MM = 16.0
#: a component reaching this far to both sides of the spine axis is horseshoe-like: no minimum lateral distance
HORSESHOE_EXTENT_MM = 30.0
#: a component whose centroid is this far above/below the levels where the spine was found is not judged by position
SPINE_EXTRAPOLATION_MM = 50.0
#: at most this many voxels per component are used for the position statistics (a strided sample)
_POSITION_SAMPLE = 400_000


# -- settings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlausibilityConfig:
    """Anatomical plausibility of kidney components (see the module doc); off unless ``enabled``.

    Defaults (anatomy literature; checked against every real KiTS23 kidney, see benchmarks/README.md):
    an adult kidney is ~100-250 mL and 11 x 6 x 3 cm, its centroid ~4-10 cm lateral of the midline
    at L1-L2, in the retroperitoneum beside the vertebral bodies and below the diaphragm.
    """

    enabled: bool = False
    min_volume_ml: float = 20.0
    max_volume_ml: float = 3500.0
    min_lateral_mm: float = 15.0
    max_lateral_mm: float = 150.0
    max_lateral_body_fraction: float = 0.85
    max_anterior_mm: float = 80.0
    max_fraction_above_lung_base: float = 0.5

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _checked(f.name, getattr(self, f.name)))
        if self.min_volume_ml >= self.max_volume_ml:
            raise ValueError(f"min_volume_ml ({self.min_volume_ml:g}) must be below max_volume_ml ({self.max_volume_ml:g})")
        if self.min_lateral_mm >= self.max_lateral_mm:
            raise ValueError(f"min_lateral_mm ({self.min_lateral_mm:g}) must be below max_lateral_mm ({self.max_lateral_mm:g})")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "plausibility") -> "PlausibilityConfig":
        """Build from a manifest block; missing keys take their defaults; errors name ``where``, the key and the value."""
        if isinstance(d, PlausibilityConfig):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"{where} must be an object with keys {_valid_keys()}; got {type(d).__name__} {d!r}")
        unknown = sorted(str(k) for k in d if k not in _names())
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; valid keys are {_valid_keys()}")
        try:
            return cls(**dict(d))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _names() -> tuple:
    return tuple(f.name for f in dataclasses.fields(PlausibilityConfig))


def _valid_keys() -> str:
    return ", ".join(_names())


def _checked(name: str, value: Any) -> Any:
    def fail(expected: str) -> ValueError:
        return ValueError(f"'{name}' must be {expected}; got {value!r} ({type(value).__name__})")

    if name == "enabled":
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail("a finite number")
    if name in ("max_lateral_body_fraction", "max_fraction_above_lung_base"):
        if not 0.0 < value <= 1.0:
            raise fail("a number in (0, 1]")
    elif name in ("max_volume_ml", "max_lateral_mm", "max_anterior_mm"):
        if value <= 0:
            raise fail("a number > 0")
    elif value < 0:
        raise fail("a number >= 0")
    return float(value)


# -- landmarks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Landmarks:
    """Landmarks of one CT in LPS mm. ``spine_z/x/y``: the spine axis sampled along z (ascending), or
    None with ``spine_reason``; ``body_x_min/max``: the body's left-right extent at those levels;
    ``lung_base_z``: the level of the lung bases, or None with ``lung_reason``."""

    spine_z: Optional[np.ndarray] = None
    spine_x: Optional[np.ndarray] = None
    spine_y: Optional[np.ndarray] = None
    body_x_min: Optional[np.ndarray] = None
    body_x_max: Optional[np.ndarray] = None
    spine_reason: str = ""
    lung_base_z: Optional[float] = None
    lung_reason: str = ""

    @property
    def has_spine(self) -> bool:
        return self.spine_z is not None

    def spine_at(self, z: float) -> tuple[float, float, float, float]:
        """Spine (x, y) and body left-right extent (x_min, x_max) at level ``z`` (LPS mm)."""
        return tuple(float(np.interp(z, self.spine_z, a)) for a in (self.spine_x, self.spine_y, self.body_x_min, self.body_x_max))


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Holes of each axial slice (axis 0) of ``mask`` filled, in one 2D call: the slices are laid side
    by side with a background column between them, so no hole can leak from one slice into the next."""
    nz, ny, nx = mask.shape
    mosaic = np.zeros((ny, nz, nx + 1), dtype=np.uint8)
    mosaic[:, :, :nx] = np.moveaxis(mask, 0, 1)
    img = sitk.GetImageFromArray(mosaic.reshape(ny, nz * (nx + 1)))
    filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(img, False, 1)).reshape(ny, nz, nx + 1)[:, :, :nx]
    return np.ascontiguousarray(np.moveaxis(filled, 1, 0)) > 0


def _runs(flags: np.ndarray, max_gap: int = 1) -> list[tuple[int, int]]:
    """Runs (first, last) of True in ``flags``, bridging gaps of up to ``max_gap`` False entries."""
    idx = np.flatnonzero(flags)
    if idx.size == 0:
        return []
    runs, start, prev = [], int(idx[0]), int(idx[0])
    for i in idx[1:]:
        if i - prev > max_gap + 1:
            runs.append((start, prev))
            start = int(i)
        prev = int(i)
    runs.append((start, prev))
    return runs


def _median_smooth(v: np.ndarray, width: int = 5) -> np.ndarray:
    r = width // 2
    padded = np.pad(v, r, mode="edge")
    return np.asarray([np.median(padded[i:i + width]) for i in range(v.size)])


def estimate_landmarks(image: sitk.Image) -> Landmarks:
    """Body, spine axis and lung bases of a CT (HU), in LPS mm; see the module doc."""
    c, _, _ = geo.canonical_axes(image.GetDirection())
    spacing = (LANDMARK_SPACING_MM,) * 3
    grid = geo.grid_for_box(geo.image_box(image), spacing, c)
    hu = sitk.GetArrayFromImage(geo.resample(geo.shrink_for_spacing(image, spacing), grid, sitk.sitkLinear, -1024.0, sitk.sitkFloat32))
    s = LANDMARK_SPACING_MM
    origin, matrix = np.asarray(grid.origin), c * s   # LPS = origin + matrix @ (i, j, k)

    def lps(i, j, k):
        return origin[:, None] + matrix @ np.vstack([np.atleast_1d(i), np.atleast_1d(j), np.atleast_1d(k)]).astype(float)

    raw = hu > BODY_MIN_HU
    cc = connected_components(raw)
    counts = np.bincount(cc.ravel())
    counts[0] = 0
    if counts.size < 2 or counts.max() * s ** 3 < 500_000:   # < 0.5 L of tissue: no body to speak of
        why = "no body found in the CT"
        return Landmarks(spine_reason=why, lung_reason=why)
    body = cc == int(np.argmax(counts))
    filled = _fill_slices(body)
    inside_air = filled & ~body

    n_slices = hu.shape[0]
    body_slices = 0
    spine_pts, extents, lung = [], [], np.zeros(n_slices, dtype=bool)
    jj, ii = np.mgrid[0:hu.shape[1], 0:hu.shape[2]]
    for k in range(n_slices):
        f = filled[k]
        if not f.any():
            continue
        body_slices += 1
        js, is_ = jj[f], ii[f]
        jc, ic = 0.5 * (js.min() + js.max()), 0.5 * (is_.min() + is_.max())
        posterior = f & (jj >= jc)
        post_area = posterior.sum() * s * s
        air_area = (inside_air[k] & posterior).sum() * s * s
        lung[k] = air_area >= LUNG_MIN_AREA_MM2 and air_area >= LUNG_MIN_POSTERIOR_AIR_FRACTION * post_area
        band = f & (np.abs(ii - ic) * s <= SPINE_BAND_MM) & (jj >= jc - SPINE_ANTERIOR_ALLOWANCE_MM / s) & (hu[k] > BONE_MIN_HU)
        if band.sum() * s * s >= SPINE_MIN_AREA_MM2:
            p = lps(np.median(ii[band]), np.median(jj[band]), k)[:, 0]
            x_body = lps(is_, js, np.full(is_.shape, k))[0]
            spine_pts.append(p)
            extents.append((x_body.min() - s / 2, x_body.max() + s / 2))

    fields = {}
    if len(spine_pts) >= max(3, SPINE_MIN_SLICE_FRACTION * body_slices):
        pts = np.asarray(spine_pts)
        ext = np.asarray(extents)
        order = np.argsort(pts[:, 2])
        pts, ext = pts[order], ext[order]
        fields.update(spine_z=pts[:, 2], spine_x=_median_smooth(pts[:, 0]), spine_y=_median_smooth(pts[:, 1]),
                      body_x_min=ext[:, 0], body_x_max=ext[:, 1])
    else:
        fields["spine_reason"] = (f"no spine found in the CT (bone near the posterior midline in {len(spine_pts)} of "
                                  f"{body_slices} body slices, fewer than half)")
    runs = [r for r in _runs(lung) if (r[1] - r[0] + 1) * s >= LUNG_MIN_RUN_MM]
    if not runs:
        fields["lung_reason"] = "no lung bases in the field of view"
    else:
        first = max(runs, key=lambda r: r[1])[0]   # the most superior run (canonical z points superior)
        if first == 0:
            fields["lung_reason"] = "the lungs reach the bottom of the field of view (lung bases not in view)"
        else:
            fc = filled[first]
            js, is_ = jj[fc], ii[fc]
            fields["lung_base_z"] = float(lps(0.5 * (is_.min() + is_.max()), 0.5 * (js.min() + js.max()), first)[2, 0])
    return Landmarks(**fields)


# -- the rules ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentVerdict:
    """One component's measurements and the rule it broke (None: plausible)."""

    label: int
    volume_ml: float
    centroid_lps: tuple
    cut_by_fov: bool
    reason: Optional[str] = None

    @property
    def keep(self) -> bool:
        return self.reason is None

    def note(self, where: str) -> str:
        x, y, z = self.centroid_lps
        return (f"{where}: dropped an implausible kidney component ({self.volume_ml:.0f} mL, centroid at LPS "
                f"({x:.0f}, {y:.0f}, {z:.0f}) mm): {self.reason}")


def judge_components(cc: np.ndarray, reference: sitk.Image, fov: geo.Box, landmarks: Optional[Landmarks],
                     config: PlausibilityConfig) -> tuple[list[ComponentVerdict], list[str]]:
    """Judge each component of ``cc`` (component ids on ``reference``'s grid, (z, y, x), 0 = none).

    ``fov``: the input image's box (canonical frame, :func:`geometry.image_box`): a component within
    one voxel of its faces is cut by the field of view. ``landmarks`` None: position rules skipped.
    Returns the verdicts (by id, ascending) and notes on the rules that could not be applied.
    """
    n = int(cc.max()) if cc.size else 0
    skipped: list[str] = []
    if n == 0:
        return [], skipped
    vmm3 = voxel_volume_mm3(reference)
    img = sitk.GetImageFromArray(cc.astype(np.uint32, copy=False))
    img.CopyInformation(reference)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(img)
    tol = max(reference.GetSpacing())
    flo, fhi = np.asarray(fov.lower), np.asarray(fov.upper)
    use_spine = landmarks is not None and landmarks.has_spine
    use_lungs = landmarks is not None and landmarks.lung_base_z is not None
    if landmarks is None:
        skipped.append("kidney position rules skipped: no CT to find the spine and lungs in")
    else:
        if not landmarks.has_spine:
            skipped.append(f"kidney position rules (beside the spine) skipped: {landmarks.spine_reason}")
        if not use_lungs:
            skipped.append(f"kidney rule 'below the lung bases' skipped: {landmarks.lung_reason}")
    need_points = use_spine or use_lungs
    if need_points:
        nz = np.nonzero(cc)
        ids = cc[nz]
        per = np.bincount(ids, minlength=n + 1)
        # an equal-rate strided sample keeps at most ~_POSITION_SAMPLE voxels in all
        stride = max(1, int(math.ceil(ids.size / _POSITION_SAMPLE)))
        sel = slice(None, None, stride)
        index = np.vstack([nz[2][sel], nz[1][sel], nz[0][sel]]).astype(float)  # (x, y, z) index
        matrix = np.asarray(reference.GetDirection()).reshape(3, 3) @ np.diag(reference.GetSpacing())
        points = np.asarray(reference.GetOrigin())[:, None] + matrix @ index
        sample_ids = ids[sel]
        del nz, index
    verdicts = []
    for label in range(1, n + 1):
        if not stats.HasLabel(label):
            continue
        volume = stats.GetNumberOfPixels(label) * vmm3 / 1000.0
        centroid = tuple(float(v) for v in stats.GetCentroid(label))
        bb = stats.GetBoundingBox(label)
        box = geo.index_box_to_box(reference, bb[:3], [bb[k] + bb[k + 3] - 1 for k in range(3)])
        cut = bool(np.any(np.asarray(box.lower) - flo <= tol) or np.any(fhi - np.asarray(box.upper) <= tol))
        reason = None
        if volume > config.max_volume_ml:
            reason = f"{volume:.0f} mL is more than the plausible {config.max_volume_ml:g} mL for a kidney with its lesions"
        elif volume < config.min_volume_ml and not cut:
            reason = f"{volume:.1f} mL is less than the plausible {config.min_volume_ml:g} mL for a kidney (not cut by the field of view)"
        if reason is None and need_points:
            mine = points[:, sample_ids == label]
            if mine.shape[1] == 0:   # a component too small to be sampled: use its centroid
                mine = np.asarray(centroid, dtype=float)[:, None]
            if use_spine:
                reason = _position_reason(centroid, mine, landmarks, config)
            if reason is None and use_lungs:
                above = float(np.mean(mine[2] > landmarks.lung_base_z))
                if above > config.max_fraction_above_lung_base:
                    reason = (f"{100 * above:.0f} % of it lies above the lung bases (z = {landmarks.lung_base_z:.0f} mm; "
                              f"at most {100 * config.max_fraction_above_lung_base:.0f} %): in the chest")
        verdicts.append(ComponentVerdict(label, volume, centroid, cut, reason))
    return verdicts, skipped


def _position_reason(centroid, points: np.ndarray, landmarks: Landmarks, config: PlausibilityConfig) -> Optional[str]:
    cx, cy, cz = centroid
    if cz < landmarks.spine_z[0] - SPINE_EXTRAPOLATION_MM or cz > landmarks.spine_z[-1] + SPINE_EXTRAPOLATION_MM:
        return None   # beyond the levels where the spine was seen: no position judgement
    sx, sy, bmin, bmax = landmarks.spine_at(cz)
    offset = cx - sx                       # LPS x: + = patient left
    lateral = abs(offset)
    d = points[0] - np.interp(points[2], landmarks.spine_z, landmarks.spine_x)
    horseshoe = min(float(d.max()), float(-d.min())) >= HORSESHOE_EXTENT_MM
    half_width = (bmax - sx) if offset >= 0 else (sx - bmin)
    max_lateral = min(config.max_lateral_mm, config.max_lateral_body_fraction * max(half_width, 0.0))
    side = "left" if offset >= 0 else "right"
    if lateral < config.min_lateral_mm and not horseshoe:
        return f"its centroid is {lateral:.0f} mm from the spine axis (a kidney lies at least {config.min_lateral_mm:g} mm to the side)"
    if lateral > max_lateral:
        return (f"its centroid is {lateral:.0f} mm {side} of the spine axis (at most {max_lateral:.0f} mm: "
                f"{config.max_lateral_mm:g} mm, or {config.max_lateral_body_fraction:g} of the body's half-width there)")
    anterior = sy - cy                     # LPS y: + = posterior, so spine y - centroid y = how far anterior
    if anterior > config.max_anterior_mm:
        return f"its centroid is {anterior:.0f} mm anterior of the spine (at most {config.max_anterior_mm:g} mm: kidneys are retroperitoneal)"
    return None


#: rejected components under this volume are summarised in one note instead of one note each
NOTE_MIN_ML = 1.0


def verdict_notes(verdicts: list[ComponentVerdict], where: str, ignore_below_ml: float = 0.0) -> list[str]:
    """Notes for the rejected components: one each from ``NOTE_MIN_ML`` up, one summary for the smaller
    fragments; components under ``ignore_below_ml`` (ignored by the caller anyway) get none."""
    rejected = [v for v in verdicts if not v.keep and v.volume_ml >= ignore_below_ml]
    notes = [v.note(where) for v in rejected if v.volume_ml >= NOTE_MIN_ML]
    small = [v for v in rejected if v.volume_ml < NOTE_MIN_ML]
    if small:
        notes.append(f"{where}: dropped {len(small)} implausible kidney fragment(s) under {NOTE_MIN_ML:g} mL "
                     f"({sum(v.volume_ml for v in small):.1f} mL in all)")
    return notes


def implausible_mask(cc: np.ndarray, verdicts: list[ComponentVerdict]) -> np.ndarray:
    """Boolean (z, y, x) mask of the voxels of the components ``verdicts`` rejected."""
    drop = np.zeros(int(cc.max()) + 1 if cc.size else 1, dtype=bool)
    for v in verdicts:
        if not v.keep:
            drop[v.label] = True
    return drop[cc]
