"""Synthetic contrast-enhanced abdominal CT (HU) from a kidney/tumor/cyst label map.

One intensity synthesizer, :func:`synthesize_ct`, for every source of shapes: procedural label maps
(:func:`procedural_labels`, wrapped by :func:`procedural_phantom`) and real KiTS19 label maps on their
own grids. It works in physical LPS space, so KiTS19's permuted direction matrices are handled.

Intensity model (HU, each value drawn uniformly per case from ``rng``; [+shift] marks the
contrast-enhanced tissues that ``intensity_shift_hu`` moves):

- kidney cortex 150..250 [+shift]; medulla 80..min(150, cortex-30) [+shift]; renal sinus fat + 20..50
  with brighter vessel spots;
- tumor 40..min(120, cortex-40) [+shift] with texture; necrotic core 10..30; cyst 0..15, homogeneous;
- liver 90..140, spleen 100..160, aorta 150..350, IVC 70..180, heart blood 0.7..1.0 x aorta, bowel wall
  40..90 [all +shift]; bowel content 0..40 (15 % of cases: oral contrast 150..300), bowel gas
  -1000..-950;
- fat -120..-85, muscle 40..65, cancellous bone 150..300, cortical bone 500..900, disc 70..110,
  CSF 0..20, lung -880..-800, air outside the body -1000.

Kidneys are split into cortex (outer ``5-8 mm x scale``), medullary pyramids (a random pattern in the
deeper zone) and renal sinus fat near the hilum; tumors get smooth low- and high-frequency texture and,
in 40 % of cases with a large tumor, a necrotic core; cysts are homogeneous. Background organs get a
smooth texture. Finally a partial-volume blur (Gaussian, sigma a random 0.45-0.75 of each axis's
spacing, so thick slices blur more along the slice axis) is applied to the image plus white noise,
which makes the noise correlated; its standard deviation after the blur is 10-25 HU x ``noise_scale``.

Speed and memory: the background is drawn on an axis-aligned coarse grid (<= ~16 M voxels), the kidney
and tumor fields on a grid around the labelled region (<= ~3 M voxels), and both are interpolated onto
the label grid; the full-resolution work (compositing, noise, blur, rounding) runs slab by slab.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import SimpleITK as sitk

from KidneyTumorSegLib.errors import InputError
from KidneyTumorSegLib.labels import CYST, KIDNEY, TUMOR

from .dataset import checked_labels
from .phantom_anatomy import (ADULT_KIDNEY_VOLUME_ML, BodyFrame, Grid, Tissue, body_tissues, estimate_frame,
                              frame_from_grid, hilum_quadrics, procedural_labels, smooth_noise)

__all__ = ["procedural_labels", "synthesize_ct", "procedural_phantom", "draw_intensities"]

logger = logging.getLogger(__name__)

_ENHANCED = ("cortex", "medulla", "tumor", "liver", "spleen", "aorta", "ivc", "heart", "bowel_wall")
_COARSE_VOXELS = 16e6
_ORGAN_VOXELS = 3e6
_SLAB_VOXELS = 4e6
_HU_MIN, _HU_MAX = -1024.0, 3071.0


def draw_intensities(rng: np.random.Generator, intensity_shift_hu: float = 0.0) -> dict:
    """One case's tissue HU values (see the module table); ``intensity_shift_hu`` is added to the
    contrast-enhanced tissues."""
    u = rng.uniform
    hu = {"air": -1000.0, "fat": u(-120, -85), "muscle": u(40, 65), "lung": u(-880, -800), "liver": u(90, 140),
          "spleen": u(100, 160), "aorta": u(150, 350), "ivc": u(70, 180), "bowel_wall": u(40, 90)}
    hu["heart"] = hu["aorta"] * u(0.7, 1.0)
    oral_contrast = rng.random() < 0.15
    hu["bowel_content"] = u(150, 300) if oral_contrast else u(0, 40)
    hu.update(bowel_gas=u(-1000, -950), bone=u(150, 300), cortical=u(500, 900), disc=u(70, 110), csf=u(0, 20))
    hu["cortex"] = u(150, 250)
    hu["medulla"] = u(80, min(150.0, hu["cortex"] - 30))
    hu["sinus"] = hu["fat"] + u(20, 50)
    hu["tumor"] = u(40, min(120.0, hu["cortex"] - 40))
    hu["necrosis"] = u(10, 30)
    hu["cyst"] = u(0, 15)
    for k in _ENHANCED:
        hu[k] += float(intensity_shift_hu)
    return {k: float(v) for k, v in hu.items()}


def _check_labels(labels):
    """uint8 label image, the foreground labels present, and the index box (x, y, z start/stop) of the
    labelled voxels (None when all background)."""
    labels = checked_labels(labels)
    lab = sitk.GetArrayViewFromImage(labels)
    proj = lab.max(axis=2)  # (z, y); max projections find the labelled box in one cheap pass
    zs, ys = np.flatnonzero(proj.max(axis=1)), np.flatnonzero(proj.max(axis=0))
    if zs.size == 0:
        return labels, set(), None
    z0, z1, y0, y1 = zs[0], zs[-1] + 1, ys[0], ys[-1] + 1
    xs = np.flatnonzero(lab[z0:z1, y0:y1].max(axis=(0, 1)))
    x0, x1 = xs[0], xs[-1] + 1
    crop = lab[z0:z1, y0:y1, x0:x1]
    present = {v for v in (KIDNEY, TUMOR, CYST) if (crop == v).any()}
    return labels, present, (np.array([x0, y0, z0]), np.array([x1, y1, z1]))


def _tissue_tables(hu: dict, rng: np.random.Generator):
    lut = np.zeros(len(Tissue), np.float32)
    amp = np.zeros(len(Tissue), np.float32)
    for t, key, a in [(Tissue.AIR, "air", 0), (Tissue.FAT, "fat", 5), (Tissue.MUSCLE, "muscle", 6),
                      (Tissue.LUNG, "lung", 25), (Tissue.LIVER, "liver", 7), (Tissue.SPLEEN, "spleen", 7),
                      (Tissue.HEART, "heart", 5), (Tissue.AORTA, "aorta", 4), (Tissue.IVC, "ivc", 5),
                      (Tissue.BOWEL_WALL, "bowel_wall", 10), (Tissue.BOWEL_CONTENT, "bowel_content", 15),
                      (Tissue.BOWEL_GAS, "bowel_gas", 5), (Tissue.BONE, "bone", 35),
                      (Tissue.CORTICAL_BONE, "cortical", 60),
                      (Tissue.DISC, "disc", 8), (Tissue.CSF, "csf", 3)]:
        lut[t] = hu[key]
        amp[t] = a * rng.uniform(0.6, 1.4)
    return lut, amp


def _background(grid: Grid, frame: BodyFrame, hu: dict, rng: np.random.Generator) -> sitk.Image:
    """Background HU (float32) on a coarse axis-aligned grid covering ``grid``."""
    corners = grid.corners()
    lo, hi = corners.min(0), corners.max(0)
    c = max(min(grid.spacing), (float(np.prod(hi - lo)) / _COARSE_VOXELS) ** (1 / 3))
    coarse = Grid.aligned(lo, hi, c, margin=2)
    tissues = body_tissues(coarse, frame, rng)
    lut, amp = _tissue_tables(hu, rng)
    texture = smooth_noise(coarse, max(4.0 * frame.scale, c), rng)
    values = lut[tissues]
    values += amp[tissues] * texture
    return coarse.image(values)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class _OrganRegion:
    """The labelled part of the image: its index box on the label grid (with a margin) and the labels
    resampled onto an axis-aligned grid around it, where distance-based fields are cheap."""

    def __init__(self, labels_u8: sitk.Image, grid: Grid, box):
        start = np.maximum(np.asarray(box[0]) - 2, 0)
        stop = np.minimum(np.asarray(box[1]) + 2, np.asarray(grid.size))
        self.start, self.stop = start, stop
        self.crop = Grid(tuple(int(v) for v in stop - start), grid.spacing, tuple(grid.to_physical(start)),
                         grid.direction)
        corners = self.crop.corners()
        lo, hi = corners.min(0), corners.max(0)
        ck = max(min(grid.spacing), (float(np.prod(hi - lo)) / _ORGAN_VOXELS) ** (1 / 3))
        self.grid = Grid.aligned(lo, hi, ck, margin=3)
        self.labels = self.grid.resample(labels_u8, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)

    def to_crop(self, field: np.ndarray) -> np.ndarray:
        """A field on the organ grid interpolated onto the label grid's crop, array (z, y, x)."""
        img = self.crop.resample(self.grid.image(field), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(img)


def _inside_depth(mask: sitk.Image) -> np.ndarray:
    """Distance (mm) inside ``mask`` to its surface, negative outside."""
    return sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(mask, insideIsPositive=True, squaredDistance=False,
                                                               useImageSpacing=True)).astype(np.float32)


def _kidney_field(region: _OrganRegion, frame: BodyFrame, hu: dict, fine: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """Kidney HU on the organ grid: cortex, medullary pyramids, renal sinus near each hilum, texture
    (``fine``: a unit random field with ~2 mm correlation, also used for vessels in the sinus)."""
    s, g = frame.scale, region.grid
    ck = g.spacing[0]
    lab = sitk.GetArrayViewFromImage(region.labels)
    depth = _inside_depth(region.labels > 0)
    cortex_mm = rng.uniform(5, 8) * s
    pattern = smooth_noise(g, max(3.5 * s, ck), rng)
    pyramid_level = rng.uniform(-0.6, -0.1)  # ~55-75 % of the deep zone is medulla
    w_med = _sigmoid((depth - cortex_mm) / max(0.6 * s, 0.5 * ck)) * _sigmoid((pattern - pyramid_level) / 0.25)
    del pattern
    field = hu["cortex"] + (hu["medulla"] - hu["cortex"]) * w_med
    del w_med

    sinus_hu = hu["sinus"] + rng.uniform(30, 60) * np.clip(fine, 0, None)
    x, y, z = g.axis_coords()
    tissue = (lab == KIDNEY) | (lab == CYST)
    for _, _, _, q in hilum_quadrics(tissue, x, y, z, frame.x, ck ** 3 / 1000.0,
                                     0.1 * ADULT_KIDNEY_VOLUME_ML * s ** 3, ck):
        w_s = _sigmoid((1.0 - q) / 0.2) * _sigmoid((depth - 0.8 * cortex_mm) / max(0.5 * s, 0.5 * ck))
        field += (sinus_hu - field) * w_s
    field += rng.uniform(4, 10) * fine
    return field.astype(np.float32)


def _tumor_field(region: _OrganRegion, frame: BodyFrame, hu: dict, fine: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """Tumor HU on the organ grid: heterogeneous texture (``fine`` plus a smoother field) and, sometimes,
    a necrotic low-density core."""
    s, g = frame.scale, region.grid
    ck = g.spacing[0]
    field = hu["tumor"] + rng.uniform(6, 15) * smooth_noise(g, max(8.0 * s, ck), rng) + rng.uniform(8, 22) * fine
    if rng.random() < 0.4:
        depth = _inside_depth(region.labels == TUMOR)
        deepest = float(depth.max())
        level = rng.uniform(0.35, 0.6) * deepest
        if deepest > 6.0 * s:
            w_n = _sigmoid((depth + 2.5 * s * fine - level) / max(1.0 * s, 0.5 * ck))
            field += (hu["necrosis"] + 4.0 * fine - field) * w_n
    return field.astype(np.float32)


def _blur_weight(sigma_vox: float) -> float:
    """Side weight ``a`` of the 3-tap sampled Gaussian ``(a, 1-2a, a)``."""
    g = math.exp(-1.0 / (2.0 * sigma_vox ** 2))
    return g / (1.0 + 2.0 * g)


def _blur_axis(x: np.ndarray, axis: int, a: float) -> np.ndarray:
    """3-tap blur along ``axis`` with edge replication."""
    if a <= 0 or x.shape[axis] == 1:
        return x
    y = x * np.float32(1.0 - 2.0 * a)
    xv, yv = np.moveaxis(x, axis, 0), np.moveaxis(y, axis, 0)
    a = np.float32(a)
    yv[1:] += a * xv[:-1]
    yv[:-1] += a * xv[1:]
    yv[0] += a * xv[0]
    yv[-1] += a * xv[-1]
    return y


def synthesize_ct(labels: sitk.Image, *, rng: np.random.Generator, intensity_shift_hu: float = 0.0,
                  noise_scale: float = 1.0, cyst_as_label: bool = True) -> tuple[sitk.Image, sitk.Image]:
    """Synthetic contrast-enhanced CT for a label map.

    ``labels``: 3D integer SimpleITK image (0 background, 1 kidney, 2 tumor, 3 cyst) on any grid and
    direction (e.g. a KiTS19 ``segmentation.nii.gz``). Background anatomy is placed around the kidneys'
    physical (LPS) positions. ``rng`` draws everything random; ``intensity_shift_hu`` is added to the
    contrast-enhanced tissues; ``noise_scale`` multiplies the 10-25 HU noise (0: no noise).

    Returns ``(ct, labels)``: ct an int16 HU image with exactly the label map's geometry, labels uint8 on
    the same grid with cysts kept as 3 when ``cyst_as_label`` else folded into kidney (1), as KiTS19 does.
    Raises InputError for non-integer, non-3D or out-of-range label images.
    """
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    t0 = time.perf_counter()
    labels_u8, present, box = _check_labels(labels)
    grid = Grid.of(labels_u8)
    hu = draw_intensities(rng, intensity_shift_hu)
    region = _OrganRegion(labels_u8, grid, box) if box is not None else None
    frame = estimate_frame(region.labels, grid) if region is not None else frame_from_grid(grid)
    logger.debug("body frame %s, HU %s", frame, hu)

    coarse = _background(grid, frame, hu, rng)
    t1 = time.perf_counter()
    background = grid.resample(coarse, sitk.sitkLinear, hu["air"], sitk.sitkFloat32)
    del coarse
    t2 = time.perf_counter()
    crop_fields = {}
    if region is not None:
        fine = smooth_noise(region.grid, max(2.0 * frame.scale, region.grid.spacing[0]), rng)
        if KIDNEY in present or CYST in present:
            crop_fields[KIDNEY] = region.to_crop(_kidney_field(region, frame, hu, fine, rng))
        if TUMOR in present:
            crop_fields[TUMOR] = region.to_crop(_tumor_field(region, frame, hu, fine, rng))
        del fine

    t3 = time.perf_counter()
    blur = [_blur_weight(rng.uniform(0.45, 0.75)) for _ in range(3)]  # numpy axes (z, y, x)
    noise_sd = rng.uniform(10, 25) * noise_scale
    gain = noise_sd / math.prod(math.sqrt((1 - 2 * a) ** 2 + 2 * a * a) for a in blur)

    bg = sitk.GetArrayViewFromImage(background)
    lab = sitk.GetArrayViewFromImage(labels_u8)
    nz, ny, nx = bg.shape
    rows = max(1, int(_SLAB_VOXELS // (ny * nx)))
    ct = np.empty(bg.shape, np.float32)
    for za in range(0, nz, rows):
        zb = min(nz, za + rows)
        dst = ct[za:zb]
        np.copyto(dst, bg[za:zb])
        if region is not None:
            (x0, y0, z0), (x1, y1, z1) = region.start, region.stop
            ra, rb = max(za, z0), min(zb, z1)
            if ra < rb:
                sub = dst[ra - za:rb - za, y0:y1, x0:x1]
                sub_lab = lab[ra:rb, y0:y1, x0:x1]
                for value, field in crop_fields.items():
                    f = field[ra - z0:rb - z0]
                    m = sub_lab == value
                    if value == KIDNEY:  # cysts sit in kidney tissue; their value is set below
                        m |= sub_lab == CYST
                    sub[m] = f[m]
                sub[sub_lab == CYST] = hu["cyst"]
        if gain > 0:
            buf = rng.standard_normal(dst.shape, dtype=np.float32)
            buf *= np.float32(gain)
            dst += buf
    del bg, background, crop_fields
    t4 = time.perf_counter()

    out = np.empty(ct.shape, np.int16)
    for za in range(0, nz, rows):
        zb = min(nz, za + rows)
        blk = ct[np.clip(np.arange(za - 1, zb + 1), 0, nz - 1)]
        blk = _blur_axis(_blur_axis(_blur_axis(blk, 2, blur[2]), 1, blur[1]), 0, blur[0])[1:-1]
        np.clip(blk, _HU_MIN, _HU_MAX, out=blk)
        np.rint(blk, out=blk)
        out[za:zb] = blk
    del ct
    logger.debug("synthesize_ct %s: frame+background %.2f s, resample %.2f s, organ fields %.2f s, "
                 "compose+noise %.2f s, blur %.2f s", grid.size, t1 - t0, t2 - t1, t3 - t2, t4 - t3,
                 time.perf_counter() - t4)
    ct_img = sitk.GetImageFromArray(out)
    ct_img.CopyInformation(labels_u8)
    if cyst_as_label or CYST not in present:
        labels_out = sitk.Image(labels_u8)
    else:
        labels_out = sitk.ChangeLabel(labels_u8, changeMap={CYST: KIDNEY})
    return ct_img, labels_out


_LABEL_KEYS = {"direction", "origin", "kidneys", "tumors", "cysts", "cut_by_fov"}
_SYNTH_KEYS = {"intensity_shift_hu", "noise_scale", "cyst_as_label"}


def procedural_phantom(size=(96, 96, 64), spacing=(2.0, 2.0, 2.5), *, seed: int = 0,
                       **kwargs) -> tuple[sitk.Image, sitk.Image]:
    """A procedural phantom: :func:`procedural_labels` then :func:`synthesize_ct`, both from one
    generator seeded with ``seed``. ``size``/``spacing`` in SimpleITK (x, y, z) order (voxels, mm);
    ``kwargs`` go to whichever of the two accepts them. Returns (ct int16 HU, labels uint8), same grid."""
    unknown = set(kwargs) - _LABEL_KEYS - _SYNTH_KEYS
    if unknown:
        raise TypeError(f"procedural_phantom got unexpected arguments {sorted(unknown)}")
    rng = np.random.default_rng(seed)
    labels = procedural_labels(size, spacing, rng=rng, **{k: v for k, v in kwargs.items() if k in _LABEL_KEYS})
    return synthesize_ct(labels, rng=rng, **{k: v for k, v in kwargs.items() if k in _SYNTH_KEYS})
