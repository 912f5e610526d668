"""Validation phantoms: synthetic abdominal CT on kidney label maps, from a generator that is independent
of the training synthesizer. **Never feed these to training** (no ``preprocess``, no ``train``, no
fingerprint of a training set): they exist to check that a model learned kidneys, not our synthesizer.

:func:`synthesize_validation_ct` turns a label map (0 background, 1 kidney, 2 tumor, 3 cyst, on any grid
and direction, e.g. a KiTS ``segmentation.nii.gz`` stored slice-axis-first with a permuted direction) into
an int16 HU CT on exactly that grid; :func:`make_validation_dataset` (the ``validation-phantoms`` command)
writes a KiTS-layout folder of them plus ``validation_phantoms.json`` (marked ``"never_train": true``).

How it differs from the training synthesizer (:mod:`Training.phantoms` + :mod:`Training.phantom_anatomy`),
whose code, tissue tables and noise fields it does not import or reuse:

* **Anatomy construction.** Training: a superellipse body, organs as single ellipsoids, bowel as thresholded
  Gaussian random fields, ribs as a periodic pattern in the body wall, periodic vertebrae. Here: a body
  outline from an ellipse perturbed by a random smooth radial (Fourier) profile that drifts along z, cut
  flat by a curved patient table with a foam mattress; subcutaneous fat of varying thickness around the
  circumference, skin, an abdominal wall with a linea alba; optional arms beside the body; vertebrae built
  level by level (T5-S3: body with cortex and endplates, discs, pedicles, laminae, spinous processes,
  transverse processes, sacral alae, canal with thecal sac and epidural fat, lordosis, sacral tilt and a
  slight scoliosis); iliac wings with iliacus and gluteal muscles; ribs 5-12 as curved tubes that leave
  the transverse processes and follow the body wall downwards, with costal cartilage; erector spinae,
  quadratus lumborum and a caudally thickening psoas; a diaphragm dome with lung bases and the heart; a liver made of a union of smooth random blobs (metaball
  field) reaching down beside the right kidney, with a vessel tree from intersecting noise iso-surfaces
  and an optional gallbladder; a crescent spleen; a J-shaped stomach with rugae and an air-fluid level; a
  pancreas; the colon along its frame with haustra, stool and gas; small bowel as random-walk tubes
  (wall, fluid or oral-contrast lumen, gas on the non-dependent side); aorta (tortuous, calcified
  plaques, iliac bifurcation), IVC (intrahepatic course), SMA/SMV, renal arteries (the right one behind
  the IVC) and veins (the left one between aorta and SMA) running to each kidney hilum, ureters along
  the psoas; perirenal fat with bridging septa inside Gerota's fascia. Everything is placed from the
  label map's own kidneys (midline, kidney positions and hila, estimated here; one kidney and a cut field
  of view are handled) in physical LPS space (+x patient left, +y posterior, +z superior).
* **Intensity model.** Training: one intensity table of independent uniform draws for a single
  contrast-enhanced look. Here: a contrast phase per case (unenhanced, arterial/corticomedullary,
  portal-venous/nephrographic, delayed/excretory) and HU = unenhanced value + a per-case contrast dose x
  the tissue's enhancement in that phase (blood, kidney cortex and medulla, liver, spleen with arciform
  arterial enhancement, pancreas, bowel mucosa, veins with early renal-vein return, excreted contrast in
  the collecting systems and ureters in the delayed phase).
* **Kidneys.** Training: cortex by distance, medulla by a thresholded random field, a sinus ellipsoid.
  Here: 8-14 radial medullary pyramids (cones with their apex, the papilla, pointing at the renal sinus,
  columns of Bertin between them), papillae with one calyx each (urine, bright when excreting) and small
  vessels towards the sinus, lognormal parenchymal speckle; the sinus fat itself (outside the label, as
  KiTS annotates it) holds branches of the renal artery and vein and the renal pelvis.
* **Lesions.** Tumors get a histotype (clear-cell: hyper/iso-enhancing, heterogeneous, often necrotic;
  papillary: hypo-enhancing, homogeneous; chromophobe/oncocytoma: intermediate with a central scar;
  fat-containing angiomyolipoma), a pseudocapsule, some with calcification; cysts 0-20 HU.
* **Texture.** Multi-octave value noise (random lattice values, trilinearly interpolated) with per-tissue
  amplitudes, fields of their own for the liver vessels, rugae, pancreatic lobulation, kidneys and lesions,
  lognormal speckle and fatty infiltration of muscle - no Gaussian random fields.
* **Scanner model.** Training: white noise, then a 3-tap Gaussian blur. Here: a reconstruction kernel
  (Gaussian MTF with optional edge enhancement) applied in the in-plane Fourier domain; quantum noise with a
  ramp-shaped (FBP-like) noise power spectrum, anisotropic along the patient's width, whose standard
  deviation follows each slice's water-equivalent diameter (partial tube-current modulation), is higher in
  the body centre and in dense tissue and lower in air; beam-hardening / photon-starvation streaks through
  the spine (and the arms when they are down) whose strength follows each slice's bone content; a slice
  sensitivity profile (rect x Gaussian of a drawn reconstructed slice thickness) along the slice axis.

Speed: the background is drawn on an axis-aligned grid of <= ~4 M voxels, the kidney and lesion fields on
the labelled region only; a KiTS case reduced to 256 x 256 x <= 128 takes about 3 s of CPU on one core.
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

from .dataset import (IMAGE_NAME, LABELS_NAME, VALIDATION_ONLY_MARKER, checked_labels, list_cases, make_dataset_folder,
                      read_labels)

__all__ = ["PHASES", "TUMOR_TYPES", "synthesize_validation_ct", "make_validation_case", "make_validation_dataset",
           "VALIDATION_JSON"]

logger = logging.getLogger(__name__)

PHASES = ("unenhanced", "arterial", "portal", "delayed")
PHASE_PROBABILITIES = (0.12, 0.3, 0.4, 0.18)
TUMOR_TYPES = ("clear_cell", "papillary", "chromophobe", "angiomyolipoma")
TUMOR_TYPE_PROBABILITIES = (0.55, 0.2, 0.15, 0.1)
VALIDATION_JSON = VALIDATION_ONLY_MARKER  # preprocess and synth-preprocess refuse such a folder

_COARSE_VOXELS = 4.0e6
_REGION_VOXELS = 1.2e6
_CHUNK_VOXELS = 4.0e6
_HU_MIN, _HU_MAX = -1024.0, 3071.0

# background tissue codes of the anatomy map
_NAMES = ("air", "subq_fat", "visc_fat", "peri_fat", "fascia", "skin", "muscle", "cancellous", "cortical",
          "disc", "csf", "epidural_fat", "liver", "liver_vessel", "spleen", "gi_wall", "stomach_content", "gas",
          "bowel_fluid", "stool", "aorta", "artery", "ivc", "vein", "renal_vein", "plaque", "lung", "heart",
          "pancreas", "bile", "urine", "table_shell", "table_core", "pad", "cartilage", "marrow_fat")
T = {n: i for i, n in enumerate(_NAMES)}
_N = len(_NAMES)


# ----------------------------------------------------------------------------------------------------------
# geometry helpers


class _Geom:
    """A grid: size/spacing (x, y, z), origin, 3x3 direction (columns = index axes)."""

    def __init__(self, size, spacing, origin, direction):
        self.size = tuple(int(v) for v in size)
        self.spacing = tuple(float(v) for v in spacing)
        self.origin = np.asarray(origin, float)
        self.dir = np.asarray(direction, float).reshape(3, 3)

    @property
    def shape(self):
        return self.size[::-1]

    @property
    def matrix(self):
        return self.dir @ np.diag(self.spacing)

    def corners(self):
        lo, hi = -0.5 * np.ones(3), np.asarray(self.size, float) - 0.5
        idx = np.array([[(lo, hi)[(c >> a) & 1][a] for a in range(3)] for c in range(8)])
        return self.origin + idx @ self.matrix.T

    def image(self, arr):
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        img.SetSpacing(self.spacing)
        img.SetOrigin(tuple(self.origin))
        img.SetDirection(tuple(self.dir.ravel()))
        return img

    def sample(self, img, interp=sitk.sitkLinear, default=0.0, pixel=sitk.sitkFloat32):
        out = sitk.Resample(img, self.size, sitk.Transform(), interp, tuple(self.origin), self.spacing,
                            tuple(self.dir.ravel()), float(default), pixel)
        return sitk.GetArrayFromImage(out)

    def coords(self, start=(0, 0, 0), stop=None):
        """Physical X, Y, Z float32 arrays (z, y, x) of an index range."""
        stop = self.size if stop is None else stop
        m = self.matrix.astype(np.float32)
        i = np.arange(start[0], stop[0], dtype=np.float32)[None, None, :]
        j = np.arange(start[1], stop[1], dtype=np.float32)[None, :, None]
        k = np.arange(start[2], stop[2], dtype=np.float32)[:, None, None]
        return tuple(np.float32(self.origin[r]) + m[r, 0] * i + m[r, 1] * j + m[r, 2] * k for r in range(3))


def _aligned(lo, hi, spacing, margin=1):
    spacing = np.broadcast_to(np.asarray(spacing, float), (3,))
    lo = np.asarray(lo, float) - margin * spacing
    size = np.ceil((np.asarray(hi, float) + margin * spacing - lo) / spacing).astype(int) + 1
    return _Geom(size, spacing, lo, np.eye(3))


def _value_noise(ref: _Geom, cell_mm: float, rng, octaves: int = 3, gain: float = 0.5, pad: Optional[tuple] = None):
    """Multi-octave value noise (random lattice values, trilinear interpolation), roughly unit variance,
    sampled on ``ref`` (any direction); float32 array (z, y, x)."""
    c = ref.corners()
    lo, hi = c.min(0) - 2 * cell_mm, c.max(0) + 2 * cell_mm
    while octaves > 1 and cell_mm / 2 ** (octaves - 1) < 0.75 * min(ref.spacing):  # finer than the grid: no use
        octaves -= 1
    h = cell_mm / 2 ** (octaves - 1)
    fine = _aligned(lo, hi, h, margin=1)
    total = np.zeros(fine.shape, np.float32)
    norm = 0.0
    for k in range(octaves):
        ck = cell_mm / 2 ** k
        lat = _aligned(lo, hi, ck, margin=2)
        vals = rng.uniform(-1.0, 1.0, lat.shape).astype(np.float32)
        up = vals if k == octaves - 1 and lat.shape == fine.shape else fine.sample(lat.image(vals))
        total += np.float32(gain ** k) * up[:fine.shape[0], :fine.shape[1], :fine.shape[2]]
        norm += (gain ** k) ** 2
    total *= np.float32(1.0 / math.sqrt(norm * 0.2))  # uniform(-1, 1) has variance 1/3, interpolation lowers it
    return ref.sample(fine.image(total))


def _sig(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _unit(v):
    v = np.asarray(v, float)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


# ----------------------------------------------------------------------------------------------------------
# input checks and the canonical (z, y, x) view of the label grid


def _check(labels) -> sitk.Image:
    labels = checked_labels(labels)
    if min(labels.GetSize()) < 1 or min(labels.GetSpacing()) <= 0:
        raise InputError(f"expected a non-empty grid with positive spacing, got size {labels.GetSize()} "
                         f"spacing {labels.GetSpacing()}")
    try:
        geo.canonical_axes(labels.GetDirection())
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return labels


class _Canonical:
    """The label grid re-indexed (permuted / flipped, no interpolation) so that the numpy array is ordered
    (S-I, A-P, R-L) with ascending z, y, x: the same voxel centres as the label grid."""

    def __init__(self, img: sitk.Image):
        c, perm, signs = geo.canonical_axes(img.GetDirection())
        size, sp = img.GetSize(), img.GetSpacing()
        idx0 = [0, 0, 0]
        for a in range(3):
            idx0[perm[a]] = 0 if signs[a] > 0 else size[perm[a]] - 1
        self.geom = _Geom([size[perm[a]] for a in range(3)], [sp[perm[a]] for a in range(3)],
                          img.TransformIndexToPhysicalPoint(idx0), c)
        self.axes = (2 - perm[2], 2 - perm[1], 2 - perm[0])
        self.flips = tuple(2 - a for a in range(3) if signs[a] < 0)

    def to(self, arr):
        out = np.transpose(arr, self.axes)
        for ax in self.flips:
            out = np.flip(out, axis=ax)
        return np.ascontiguousarray(out)

    def back(self, arr):
        for ax in self.flips:
            arr = np.flip(arr, axis=ax)
        return np.ascontiguousarray(np.transpose(arr, np.argsort(self.axes)))


# ----------------------------------------------------------------------------------------------------------
# where the kidneys are


class _Kidney:
    def __init__(self, centroid, axes, extent_lo, extent_hi, volume_ml, side):
        self.c = np.asarray(centroid, float)
        self.long = _unit(axes)
        self.lo, self.hi = np.asarray(extent_lo, float), np.asarray(extent_hi, float)
        self.ml = float(volume_ml)
        self.side = int(side)  # +1 patient left, -1 right
        self.medial = None
        self.hilum = None
        self.sinus = None
        self.virtual = False


class _Frame:
    """Midline x, kidneys' mean A-P y and S-I z (mm), scale, the kidneys, and the region grid used for
    distances to the labelled tissue."""

    def __init__(self, x, y, z, s, kidneys, region=None, region_lab=None):
        self.x, self.y, self.z, self.s = float(x), float(y), float(z), float(s)
        self.kidneys = kidneys
        self.region, self.region_lab = region, region_lab

    def side(self, side):
        for k in self.kidneys:
            if k.side == side:
                return k
        return None


def _estimate_frame(labels: sitk.Image, canon: _Canonical, lab_c: np.ndarray, box, rng) -> _Frame:
    g = canon.geom
    fov_c = g.origin + g.matrix @ ((np.asarray(g.size) - 1) / 2.0)
    if box is None:
        return _Frame(fov_c[0], fov_c[1] - 40.0, fov_c[2], 1.0, [])
    (x0, y0, z0), (x1, y1, z1) = box
    sub = _Geom((x1 - x0, y1 - y0, z1 - z0), g.spacing, g.origin + g.matrix @ np.array([x0, y0, z0], float), g.dir)
    cor = sub.corners()
    lo, hi = cor.min(0) - 70.0, cor.max(0) + 70.0
    sp = max(min(g.spacing), min(3.0, max(g.spacing)), (float(np.prod(hi - lo)) / _REGION_VOXELS) ** (1 / 3))
    region = _aligned(lo, hi, sp, margin=0)
    rlab = region.sample(labels, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    fg = rlab > 0
    cc = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(region.image(fg.astype(np.uint8))),
                                                      sortByObjectSize=True))
    counts = np.bincount(cc.ravel())[1:]
    voxel_ml = sp ** 3 / 1000.0
    keep = [i + 1 for i in range(min(3, counts.size)) if counts[i] >= max(0.12 * counts[0], 2.0 / voxel_ml)]
    if not keep and counts.size:
        keep = [1]
    comps = []
    for lab_id in keep:
        zz, yy, xx = np.nonzero(cc == lab_id)
        pts = np.stack([region.origin[0] + xx * sp, region.origin[1] + yy * sp, region.origin[2] + zz * sp], 1)
        cen = pts.mean(0)
        cov = np.cov((pts - cen).T) if len(pts) > 3 else np.eye(3)
        _, v = np.linalg.eigh(cov)
        ax = v[:, -1] * (1 if v[2, -1] >= 0 else -1)
        comps.append(_Kidney(cen, ax, pts.min(0), pts.max(0), len(pts) * voxel_ml, 0))
    comps = comps[:2]
    if len(comps) == 2 and abs(comps[0].c[0] - comps[1].c[0]) > 0.3 * (
            (comps[0].hi[0] - comps[0].lo[0]) + (comps[1].hi[0] - comps[1].lo[0])) / 2:
        a, b = sorted(comps, key=lambda k: k.c[0])
        a.side, b.side = -1, 1
        mid = (a.c + b.c) / 2
        s = float(np.clip(abs(b.c[0] - a.c[0]) / 145.0, 0.45, 1.35))
        kid = [a, b]
        x_mid = mid[0]
    else:
        k = max(comps, key=lambda k: k.ml)
        width = k.hi[0] - k.lo[0]
        if width > 1.6 * (k.hi[1] - k.lo[1]) and width > 110:  # horseshoe: one mass across the midline
            k.side = 0
            s = float(np.clip((k.ml / 300.0) ** (1 / 3), 0.45, 1.35))
            return _finish_frame(k.c[0], k.c[1], k.c[2], s, [k], region, rlab, lab_c, canon, rng)
        s = float(np.clip((k.ml / 160.0) ** (1 / 3), 0.45, 1.35))
        d = k.c[0] - fov_c[0]
        if abs(d) > 25.0 * s:
            side = 1 if d > 0 else -1
        else:  # near the FOV centre: the upper pole leans medially
            side = 1 if k.long[0] < 0 else -1
        k.side = side
        offset = float(np.clip(abs(d), 55.0 * s, 85.0 * s)) if abs(d) > 25.0 * s else 72.0 * s
        x_mid = k.c[0] - side * offset
        kid = [k]
        mid = k.c
    return _finish_frame(x_mid, mid[1], mid[2], s, kid, region, rlab, lab_c, canon, rng)


def _finish_frame(x, y, z, s, kidneys, region, rlab, lab_c, canon, rng):
    """Medial direction, hilum and sinus centre of each kidney (rays through the region labels)."""
    fg = rlab > 0
    sp = region.spacing[0]

    def inside(p):
        i = np.rint((np.asarray(p) - region.origin) / sp).astype(int)
        if np.any(i < 0) or np.any(i >= np.asarray(region.size)):
            return False
        return bool(fg[i[2], i[1], i[0]])

    for k in kidneys:
        if k.side == 0:
            m = np.array([0.0, -1.0, 0.0])
        else:
            ang = math.radians(rng.uniform(15, 35))
            m = np.array([-k.side * math.cos(ang), -math.sin(ang), 0.0])
        m = _unit(m - m.dot(k.long) * k.long)
        t = 0.0
        while t < 120 and inside(k.c + (t + sp) * m):
            t += sp * 0.5
        k.medial = m
        k.hilum = k.c + (t + 2.0) * m
        k.sinus = k.c + 0.3 * t * m
    frame = _Frame(x, y, z, s, kidneys, region, rlab)
    # a missing kidney: a virtual one mirrored across the midline places the liver / spleen / colon
    if len(kidneys) == 1 and kidneys[0].side != 0:
        k = kidneys[0]
        v = _Kidney(np.array([2 * x - k.c[0], k.c[1], k.c[2] + 10.0 * k.side]), k.long * np.array([-1, 1, 1]),
                    k.lo, k.hi, k.ml, -k.side)
        v.virtual = True
        v.medial = k.medial * np.array([-1, 1, 1])
        v.hilum = np.array([2 * x - k.hilum[0], k.hilum[1], k.hilum[2]])
        v.sinus = v.c
        frame.kidneys = kidneys + [v]
    return frame


# ----------------------------------------------------------------------------------------------------------
# the case's draw: phase, HU, tumor type, scanner


def _draw_case(rng, phase=None) -> dict:
    u = rng.uniform
    if phase is None:
        phase = PHASES[int(rng.choice(len(PHASES), p=PHASE_PROBABILITIES))]
    elif phase not in PHASES:
        raise InputError(f"phase must be one of {PHASES}, got {phase!r}")
    pi = PHASES.index(phase)
    dose = u(0.8, 1.2) if pi else 0.0

    def enh(a, p, d):
        return dose * (0.0, u(*a), u(*p), u(*d))[pi]

    fat = u(-118, -88)
    blood = u(35, 50)
    case = {"phase": phase, "dose": round(float(dose), 3)}
    hu = np.zeros(_N, np.float32)
    hu[T["air"]] = -1000.0
    hu[T["subq_fat"]] = fat
    hu[T["visc_fat"]] = fat + u(0, 18)
    hu[T["peri_fat"]] = fat + u(-4, 12)
    hu[T["epidural_fat"]] = fat + u(10, 30)
    hu[T["marrow_fat"]] = fat + u(10, 40)
    hu[T["fascia"]] = u(0, 40) + enh((0, 10), (5, 20), (5, 15))
    hu[T["skin"]] = u(20, 50)
    hu[T["muscle"]] = u(44, 60) + enh((4, 12), (8, 20), (8, 15))
    hu[T["cancellous"]] = u(110, 260)
    hu[T["cortical"]] = u(450, 950)
    hu[T["disc"]] = u(65, 100)
    hu[T["cartilage"]] = u(90, 170)
    hu[T["csf"]] = u(0, 15)
    hu[T["liver"]] = u(48, 66) + enh((8, 25), (45, 75), (28, 45))
    hu[T["liver_vessel"]] = blood + enh((20, 70), (110, 170), (45, 80))
    hu[T["spleen"]] = u(40, 52) + enh((55, 110), (65, 100), (40, 60))
    hu[T["pancreas"]] = u(35, 50) + enh((60, 110), (40, 75), (25, 40))
    hu[T["gi_wall"]] = u(35, 48) + enh((40, 90), (35, 65), (20, 40))
    oral = rng.random() < 0.25
    case["oral_contrast"] = bool(oral)
    hu[T["stomach_content"]] = u(150, 450) if oral and rng.random() < 0.6 else u(-10, 25)
    hu[T["bowel_fluid"]] = u(150, 550) if oral else u(2, 25)
    hu[T["stool"]] = u(-60, 20)
    hu[T["gas"]] = u(-1000, -960)
    art = blood + enh((180, 340), (90, 150), (40, 80))
    hu[T["aorta"]] = art
    hu[T["artery"]] = art * u(0.85, 1.0)
    hu[T["ivc"]] = blood + enh((5, 40), (90, 140), (40, 80))
    hu[T["vein"]] = blood + enh((10, 50), (110, 170), (40, 80))
    hu[T["renal_vein"]] = blood + enh((80, 160), (100, 150), (40, 80))
    hu[T["plaque"]] = u(400, 1100)
    hu[T["lung"]] = u(-890, -820)
    hu[T["heart"]] = blood + enh((150, 290), (95, 150), (40, 75))
    hu[T["bile"]] = u(0, 20)
    urine = u(0, 15)
    excreted = u(300, 1300) if phase == "delayed" else urine
    hu[T["urine"]] = excreted
    hu[T["table_shell"]] = u(80, 400)
    hu[T["table_core"]] = u(-970, -850)
    hu[T["pad"]] = u(-920, -600)
    amp = np.zeros((2, _N), np.float32)  # (coarse, fine) texture amplitudes (HU)
    for name, lo_a, hi_a in [("subq_fat", 5, 5), ("visc_fat", 8, 6), ("peri_fat", 6, 5), ("muscle", 4, 6),
                             ("skin", 3, 4), ("liver", 5, 4), ("spleen", 6, 5), ("pancreas", 8, 8),
                             ("gi_wall", 5, 8), ("stomach_content", 10, 12), ("bowel_fluid", 6, 5),
                             ("stool", 30, 45), ("gas", 5, 5), ("cancellous", 35, 45), ("cortical", 80, 60),
                             ("disc", 6, 6), ("lung", 20, 25), ("heart", 8, 6), ("aorta", 3, 3),
                             ("ivc", 12, 5) if phase == "arterial" else ("ivc", 3, 3), ("fascia", 6, 6),
                             ("table_core", 10, 10), ("pad", 40, 30), ("marrow_fat", 15, 10), ("cartilage", 15, 10)]:
        amp[0, T[name]] = lo_a * u(0.6, 1.4)
        amp[1, T[name]] = hi_a * u(0.6, 1.4)
    case["hu"], case["amp"] = hu, amp
    # kidney and lesions
    base_k = u(28, 42)
    cortex_e = enh((110, 190), (105, 160), (65, 105))
    medulla_e = enh((15, 55), (100, 160), (85, 135))
    case["kidney"] = {"base": base_k, "cortex": base_k + cortex_e, "medulla": base_k + medulla_e,
                      "urine": excreted, "vessel": art, "rvein": hu[T["renal_vein"]],
                      "cortex_mm": u(4.5, 7.5), "pyramids": int(rng.integers(8, 15)), "papilla": u(0.25, 0.4),
                      "speckle": u(0.03, 0.09), "asym": u(0.93, 1.07)}
    ttype = TUMOR_TYPES[int(rng.choice(len(TUMOR_TYPES), p=TUMOR_TYPE_PROBABILITIES))]
    paren_e = (cortex_e + medulla_e) / 2 if phase != "arterial" else cortex_e
    factor = {"clear_cell": (u(0.5, 1.05), u(0.45, 0.8), u(0.3, 0.6)),
              "papillary": (u(0.1, 0.3), u(0.12, 0.3), u(0.15, 0.35)),
              "chromophobe": (u(0.4, 0.8), u(0.45, 0.75), u(0.4, 0.65)),
              "angiomyolipoma": (u(0.3, 0.6), u(0.3, 0.6), u(0.3, 0.5))}[ttype]
    f = factor[pi - 1] if pi else 0.0
    case["tumor"] = {"type": ttype, "hu": u(22, 45) + f * paren_e,
                     "hetero": {"clear_cell": u(15, 35), "papillary": u(5, 12), "chromophobe": u(8, 16),
                                "angiomyolipoma": u(10, 25)}[ttype],
                     "necrosis": rng.random() < {"clear_cell": 0.55, "papillary": 0.2, "chromophobe": 0.15,
                                                 "angiomyolipoma": 0.05}[ttype],
                     "necrosis_hu": u(8, 30), "necrosis_level": u(0.35, 0.65),
                     "calcified": rng.random() < 0.12, "calc_hu": u(250, 900),
                     "scar": ttype == "chromophobe" and rng.random() < 0.5,
                     "fat": ttype == "angiomyolipoma", "fat_hu": fat + u(10, 60),
                     "capsule": u(5, 20) if pi else 0.0}
    case["cyst_hu"] = (u(0, 20), u(0, 20))
    # scanner
    kernel = str(rng.choice(["soft", "standard", "sharp"], p=[0.35, 0.45, 0.2]))
    case["scanner"] = {"kernel": kernel, "psf_mm": {"soft": u(0.7, 1.0), "standard": u(0.5, 0.75), "sharp": u(0.35, 0.55)}[kernel],
                       "boost": {"soft": 0.0, "standard": u(0.0, 0.2), "sharp": u(0.3, 0.8)}[kernel],
                       "noise_mm": {"soft": u(1.1, 1.6), "standard": u(0.8, 1.2), "sharp": u(0.5, 0.8)}[kernel],
                       "noise_hu": u(7, 16) * (1.3 if kernel == "sharp" else 1.0), "modulation": u(0.3, 0.8),
                       "aniso": u(1.0, 1.5), "thickness": u(1.0, 1.5), "streaks": int(rng.integers(2, 7))}
    return case


# ----------------------------------------------------------------------------------------------------------
# background anatomy on an axis-aligned grid


class _Canvas:
    """The tissue map (uint8 codes, (z, y, x)) of an axis-aligned grid with helpers that paint shapes
    restricted to their bounding boxes and to the tissues they may overwrite."""

    def __init__(self, geom: _Geom, frame: _Frame):
        self.g, self.f = geom, frame
        self.x = (geom.origin[0] + geom.spacing[0] * np.arange(geom.size[0])).astype(np.float32)
        self.y = (geom.origin[1] + geom.spacing[1] * np.arange(geom.size[1])).astype(np.float32)
        self.z = (geom.origin[2] + geom.spacing[2] * np.arange(geom.size[2])).astype(np.float32)
        self.t = np.zeros(geom.shape, np.uint8)

    def box(self, lo, hi):
        """Index slices (z, y, x) of the physical box lo..hi and the local X (1,1,nx), Y (1,ny,1), Z (nz,1,1)."""
        sl = []
        for a, v in enumerate((self.x, self.y, self.z)):
            i0 = int(np.searchsorted(v, lo[a] - 1e-3))
            i1 = int(np.searchsorted(v, hi[a] + 1e-3))
            sl.append(slice(i0, max(i0, i1)))
        sx, sy, sz = sl
        if sx.stop <= sx.start or sy.stop <= sy.start or sz.stop <= sz.start:
            return None
        return ((sz, sy, sx), self.x[sx][None, None, :], self.y[sy][None, :, None], self.z[sz][:, None, None])

    def paint(self, code, lo, hi, fn, over=None, value_fn=None):
        """Set ``code`` where ``fn(X, Y, Z)`` (bool) holds inside the box, only over tissues ``over``."""
        b = self.box(lo, hi)
        if b is None:
            return None
        sl, X, Y, Z = b
        m = fn(X, Y, Z)
        if m is None:
            return None
        m = np.broadcast_to(m, self.t[sl].shape)
        sub = self.t[sl]
        if over is not None:
            lut = np.zeros(256, bool)
            lut[[T[n] if isinstance(n, str) else n for n in over]] = True
            m = m & lut[sub]
        sub[m] = code
        return m

    def tube(self, points, radii, code, over, wall=None, wall_code=None):
        """A tube along a polyline (points (n, 3), radii (n,)); an optional wall of thickness ``wall``."""
        pts = np.asarray(points, float)
        rad = np.broadcast_to(np.asarray(radii, float), (len(pts),))
        for i in range(len(pts) - 1):
            a, b = pts[i], pts[i + 1]
            ra, rb = rad[i], rad[i + 1]
            rmax = max(ra, rb)
            lo, hi = np.minimum(a, b) - rmax - 1, np.maximum(a, b) + rmax + 1
            box = self.box(lo, hi)
            if box is None:
                continue
            sl, X, Y, Z = box
            ab = b - a
            L2 = max(float(ab @ ab), 1e-6)
            t = np.clip(((X - a[0]) * ab[0] + (Y - a[1]) * ab[1] + (Z - a[2]) * ab[2]) / L2, 0, 1)
            d2 = (X - a[0] - t * ab[0]) ** 2 + (Y - a[1] - t * ab[1]) ** 2 + (Z - a[2] - t * ab[2]) ** 2
            r = ra + t * (rb - ra)
            sub = self.t[sl]
            lut = np.zeros(256, bool)
            lut[[T[n] for n in over]] = True
            ok = lut[sub]
            if wall is not None:
                mw = (d2 <= r * r) & ok
                sub[mw] = wall_code
                ri = np.maximum(r - wall, 0.3)
                lut[wall_code] = True
                mi = (d2 <= ri * ri) & lut[sub]
                sub[mi] = code
            else:
                sub[(d2 <= r * r) & ok] = code


class _TubeSet:
    """Union of tubes that keeps, per voxel, the nearest tube's signed surface distance, its id and the
    A-P position of its centre line (for gas on the non-dependent side)."""

    def __init__(self, cv: _Canvas, lo, hi):
        self.cv = cv
        b = cv.box(lo, hi)
        self.ok = b is not None
        if not self.ok:
            return
        self.sl, self.X, self.Y, self.Z = b
        shape = cv.t[self.sl].shape
        self.sd = np.full(shape, np.inf, np.float32)
        self.id = np.zeros(shape, np.int16)
        self.cy = np.zeros(shape, np.float32)
        self.o = np.array([self.X.ravel()[0], self.Y.ravel()[0], self.Z.ravel()[0]], float)
        self.h = np.asarray(cv.g.spacing)

    def add(self, tube_id, points, radii):
        if not self.ok:
            return
        pts = np.asarray(points, float)
        rad = np.broadcast_to(np.asarray(radii, float), (len(pts),))
        n = np.asarray(self.sd.shape[::-1])
        for i in range(len(pts) - 1):
            a, b = pts[i], pts[i + 1]
            rmax = max(rad[i], rad[i + 1]) + 2
            i0 = np.maximum(np.floor((np.minimum(a, b) - rmax - self.o) / self.h).astype(int), 0)
            i1 = np.minimum(np.ceil((np.maximum(a, b) + rmax - self.o) / self.h).astype(int) + 1, n)
            if np.any(i1 <= i0):
                continue
            X = self.X[:, :, i0[0]:i1[0]]
            Y = self.Y[:, i0[1]:i1[1]]
            Z = self.Z[i0[2]:i1[2]]
            ab = b - a
            L2 = max(float(ab @ ab), 1e-6)
            t = np.clip(((X - a[0]) * ab[0] + (Y - a[1]) * ab[1] + (Z - a[2]) * ab[2]) / L2, 0, 1)
            d = np.sqrt((X - a[0] - t * ab[0]) ** 2 + (Y - a[1] - t * ab[1]) ** 2 + (Z - a[2] - t * ab[2]) ** 2)
            sd = d - (rad[i] + t * (rad[i + 1] - rad[i]))
            sub = (slice(i0[2], i1[2]), slice(i0[1], i1[1]), slice(i0[0], i1[0]))
            cur = self.sd[sub]
            better = sd < cur
            cur[better] = sd[better]
            self.id[sub][better] = tube_id
            cyv = np.broadcast_to(a[1] + t * ab[1], better.shape)
            self.cy[sub][better] = cyv[better]


def _spline(ctrl, step):
    """Catmull-Rom curve through control points, resampled every ``step`` mm."""
    p = np.asarray(ctrl, float)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        n = max(2, int(np.linalg.norm(p2 - p1) / step) + 1)
        for t in np.linspace(0, 1, n, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
    out.append(p[-2])
    return np.asarray(out)


def _build_anatomy(geom: _Geom, frame: _Frame, case: dict, rng, peri_dist: Optional[np.ndarray]):
    """Tissue map and extra fields (vertebral body centre, body centrality, bone content per slice) on
    ``geom``."""
    u, nrm = rng.uniform, rng.normal
    s = frame.s
    cv = _Canvas(geom, frame)
    x0, y0, z0 = frame.x, frame.y, frame.z
    X1, Y1, Z1 = cv.x - np.float32(x0), cv.y - np.float32(y0), cv.z - np.float32(z0)
    X2, Y2 = X1[None, :], Y1[:, None]
    nz = geom.size[2]
    kids = [k for k in frame.kidneys if not k.virtual]
    info = {}

    # --- spine geometry first: it sets how deep the back is
    y_vb = -u(0, 16) * s  # vertebral body centre, relative to the kidneys' A-P level
    wv, dv = u(19, 25) * s, u(14, 18) * s
    rc = u(8, 10.5) * s
    sp_len = u(28, 40) * s
    sc0 = float(np.exp(rng.normal(math.log(16.0), 0.5))) * (0.6 + 0.4 * s)
    sc0 = float(np.clip(sc0, 4.0, 55.0))
    tw0 = u(7, 14) * s
    back = y_vb + dv + 2 * rc + 4 * s + sp_len + u(4, 12) * s + 0.8 * sc0
    lat_need, back_need = 0.0, 0.0
    for k in kids:
        lat_need = max(lat_need, abs(k.lo[0] - x0), abs(k.hi[0] - x0))
        back_need = max(back_need, k.hi[1] - y0)
    back = max(back, back_need + 22 * s + 0.8 * sc0)
    A = max(u(135, 180) * s + 0.8 * sc0, (lat_need + tw0 + sc0 + 18 * s) / 0.9)
    B = u(95, 135) * s + 0.8 * sc0
    bcx = x0 + nrm(0, 3) * s
    bcy = y0 + back - B
    info.update(bcx=bcx, bcy=bcy, A=A, B=B)

    # --- body outline: ellipse x random smooth radial profile drifting along z, cut by the table
    dx, dy = X2 + np.float32(x0 - bcx), Y2 + np.float32(y0 - bcy)
    R = np.sqrt(dx * dx + dy * dy)
    TH = np.arctan2(dy, dx)
    c2, s2 = (np.cos(TH) ** 2).astype(np.float32), (np.sin(TH) ** 2).astype(np.float32)
    H = [np.zeros_like(R), np.zeros_like(R)]
    for k in range(2, 8):
        for j in range(2):
            a, b = nrm(0, 0.026 / (k - 1) ** 0.8, 2)
            H[j] += np.float32(a) * np.cos(k * TH) + np.float32(b) * np.sin(k * TH)
    wz = np.clip(0.5 + 0.5 * np.sin(Z1 / (u(120, 250) * s) + u(0, 6.3)), 0, 1).astype(np.float32)[:, None, None]
    fa = (1 + 0.05 * np.sin(Z1 / (u(80, 160) * s) + u(0, 6.3))).astype(np.float32)[:, None, None]
    fb = (1 + 0.04 * np.sin(Z1 / (u(80, 160) * s) + u(0, 6.3))).astype(np.float32)[:, None, None]
    Az, Bz = np.float32(A) * fa, np.float32(B) * fb
    rb = Az * Bz / np.sqrt(Bz * Bz * c2 + Az * Az * s2) * (1 + H[0] * (1 - wz) + H[1] * wz)
    D = rb - R  # depth below the (unflattened) skin
    del rb
    # table: a cradle curved upwards at the sides, with a foam mattress
    pad_t = u(0, 25) * s
    flat = u(3, 14) * s
    y_top0 = y0 + back - flat + pad_t
    cur = u(0.0004, 0.0012)
    y_top = (y_top0 - cur * (X1 + np.float32(x0 - bcx)) ** 2).astype(np.float32)  # (nx,)
    Dt = (y_top[None, :] - np.float32(pad_t) - (Y2 + np.float32(y0)))  # (ny, nx)
    Deff = np.minimum(D, Dt[None])
    del D
    body = Deff > 0
    t_half = u(200, 250)
    tab_thick = u(35, 60)
    Ya = Y2 + np.float32(y0)
    in_w = np.abs(X2 + np.float32(x0 - bcx)) < t_half
    rel = Ya - y_top[None, :]
    shell = in_w & (((rel >= 0) & (rel < 3)) | ((rel >= tab_thick - 3) & (rel < tab_thick)))
    core = in_w & (rel >= 3) & (rel < tab_thick - 3)
    padm = in_w & (rel < 0) & (rel >= -pad_t)
    cv.t[:] = T["air"]
    cv.t[:, shell] = T["table_shell"]
    cv.t[:, core] = T["table_core"]
    cv.t[:, padm] = T["pad"]
    # subcutaneous fat thicker at the front and the flanks, body-wall muscles, linea alba
    ant = np.float32(-math.pi / 2)
    sc2 = np.float32(sc0) * (1 + 0.3 * np.cos(TH - ant) + 0.2 * np.cos(2 * TH) + 2 * H[1]).astype(np.float32)
    sc2 = np.maximum(sc2, 2.0)
    tw2 = np.float32(tw0) * (1 + 0.25 * np.cos(2 * TH)).astype(np.float32)
    cv.t[body] = T["subq_fat"]
    wall = body & (Deff >= sc2) & (Deff < sc2 + tw2)
    cavity = body & (Deff >= sc2 + tw2)
    cv.t[wall] = T["muscle"]
    cv.t[cavity] = T["visc_fat"]
    cv.t[body & (Deff < 1.6)] = T["skin"]
    alba = (np.abs(X2 + np.float32(x0 - bcx)) < 3.0 * s) & (Ya < bcy)
    cv.t[wall & alba[None]] = T["fascia"]
    cent = np.clip(Deff / np.maximum(R + Deff, 1.0), -1, 1)  # 0 at the skin, ~1 at the centre
    del wall
    info["cent"] = cent.astype(np.float32)

    # --- arms beside the body (arms down)
    info["arms"] = bool(rng.random() < 0.3)
    if info["arms"]:
        for side in (-1, 1):
            ax = bcx + side * (A * (1 + 0.05) + u(5, 40) * s + 40 * s)
            ay = bcy + u(-0.1, 0.4) * B
            aa, ab = u(32, 42) * s, u(36, 50) * s
            bone_r = u(9, 13) * s
            lo, hi = (ax - aa - 2, ay - ab - 2, -1e9), (ax + aa + 2, ay + ab + 2, 1e9)
            ellip = lambda X, Y, Z, e=0.0: ((X - ax) / (aa - e)) ** 2 + ((Y - ay) / (ab - e)) ** 2 <= 1
            under = lambda X, Y, Z: Y < (y_top0 - cur * (X - bcx) ** 2 - pad_t)
            cv.paint(T["subq_fat"], lo, hi, lambda X, Y, Z: ellip(X, Y, Z) & under(X, Y, Z), over=["air", "pad"])
            cv.paint(T["skin"], lo, hi, lambda X, Y, Z: ellip(X, Y, Z) & ~ellip(X, Y, Z, 1.5), over=["subq_fat"])
            cv.paint(T["muscle"], lo, hi, lambda X, Y, Z: ellip(X, Y, Z, u(6, 12) * s), over=["subq_fat"])
            bx, by = ax + nrm(0, 4), ay + nrm(0, 4)
            cv.paint(T["cortical"], lo, hi, lambda X, Y, Z: (X - bx) ** 2 + (Y - by) ** 2 <= bone_r ** 2, over=["muscle"])
            cv.paint(T["marrow_fat"], lo, hi, lambda X, Y, Z: (X - bx) ** 2 + (Y - by) ** 2 <= (bone_r * 0.6) ** 2,
                     over=["cortical"])
            info.setdefault("arm_centres", []).append((ax, ay))

    # --- vertebrae, stacked level by level
    levels = []
    zc = z0 + u(0, 25) * s  # L1 centre
    h_l = lambda: u(25, 30) * s
    names = ["L1", "L2", "L3", "L4", "L5", "S1", "S2", "S3"]
    zz, h = zc, h_l()
    for i, name in enumerate(names):
        levels.append((name, zz, h))
        if i + 1 < len(names):
            disc = u(8, 11) * s if name[0] == "L" else u(1.5, 3) * s  # the sacrum is fused
            h2 = h_l() * {"S1": 1.1, "S2": 0.9, "S3": 0.8}.get(names[i + 1], 1.0)
            zz = zz - h / 2 - disc - h2 / 2
            h = h2
    zz, h = zc, levels[0][2]
    for n in range(12, 4, -1):
        disc = u(5, 8) * s
        h2 = u(20, 25) * s if n > 9 else u(18, 22) * s
        zz = zz + h / 2 + disc + h2 / 2
        h = h2
        levels.append((f"T{n}", zz, h))
    z_l3 = [lv[1] for lv in levels if lv[0] == "L3"][0]
    lord = u(3, 10) * s
    scol = nrm(0, 4) * s
    spine_y = lambda zabs: y0 + y_vb + lord * min(((zabs - z_l3) / (100 * s)) ** 2, 2.0)  # lordosis: L3 most anterior
    spine_x = lambda zabs: x0 + scol * math.sin((zabs - z_l3) / (150 * s))
    info["spine"] = []
    zmin, zmax = float(cv.z[0]), float(cv.z[-1])
    bone_rows = np.zeros(nz, np.float32)
    # muscles around the spine first (bone overwrites them)
    ps_top = z0 + u(25, 50) * s
    es_x, es_y, es_a, es_b = u(24, 34) * s, dv + 2 * rc + u(14, 22) * s, u(22, 30) * s, u(18, 26) * s
    for side in (-1, 1):
        def erector(X, Y, Z, side=side):
            xs = np.float32(x0 + side * es_x)
            return ((X - xs) / es_a) ** 2 + ((Y - (y0 + y_vb + es_y)) / es_b) ** 2 <= 1
        cv.paint(T["muscle"], (x0 + side * es_x - es_a, y0 + y_vb + es_y - es_b, zmin),
                 (x0 + side * es_x + es_a, y0 + y_vb + es_y + es_b, zmax), erector, over=["visc_fat", "subq_fat", "muscle"])
        ql_x, ql_y = side * (wv + u(34, 48) * s), y_vb + dv + u(10, 22) * s
        ql_a, ql_b = u(16, 24) * s, u(6, 10) * s
        cv.paint(T["muscle"], (x0 + ql_x - ql_a, y0 + ql_y - ql_b, zmin), (x0 + ql_x + ql_a, y0 + ql_y + ql_b, z0 + 25 * s),
                 lambda X, Y, Z: ((X - (x0 + ql_x)) / ql_a) ** 2 + ((Y - (y0 + ql_y)) / ql_b) ** 2 <= 1, over=["visc_fat"])
        ps_dy = u(-2, 8) * s

        def psoas(X, Y, Z, side=side, ps_dy=ps_dy):
            r = np.clip(5 * s + 0.2 * (ps_top - Z), 3 * s, 28 * s)
            cx = np.float32(x0) + side * (wv + 0.75 * r)
            cy = np.float32(y0 + y_vb + ps_dy) - 0.15 * r
            return (((X - cx) / r) ** 2 + ((Y - cy) / (0.85 * r)) ** 2 <= 1) & (Z < ps_top)
        cv.paint(T["muscle"], (x0 - 100, y0 + y_vb - 50, zmin), (x0 + 100, y0 + y_vb + 40, ps_top), psoas, over=["visc_fat"])
    # fatty infiltration is done in the texture
    for name, zc_l, hb in levels:
        if zc_l + hb < zmin - 20 or zc_l - hb > zmax + 20:
            continue
        cx, cy = spine_x(zc_l), spine_y(zc_l) + {"S1": 6, "S2": 16, "S3": 28}.get(name, 0) * s  # sacral tilt
        info["spine"].append((name, cx, cy, zc_l))
        lumbar = name[0] in "LS"
        sacral = name[0] == "S"
        wvl, dvl = (wv, dv) if lumbar else (wv * 0.8, dv * 0.95)
        if sacral:
            f_s = {"S1": 1.0, "S2": 0.8, "S3": 0.62}[name]
            wvl, dvl = wvl * f_s, dvl * f_s
        rcl = rc if lumbar else rc * 0.85
        disc_h = (u(8, 11) if lumbar else u(5, 8)) * s
        lo = (cx - 80 * s, cy - dvl - 8, zc_l - hb / 2 - disc_h)
        hi = (cx + 80 * s, cy + dvl + 2 * rcl + sp_len + 10, zc_l + hb / 2)
        b = cv.box(lo, hi)
        if b is None:
            continue
        (szs, sys_, sxs), X, Y, Z = b
        X, Y = X[0], Y[0]
        zl = Z[:, 0, 0] - zc_l  # local z of each slice
        sub = cv.t[szs, sys_, sxs]
        Xc, Yc = X - cx, Y - cy
        vb = (Xc / wvl) ** 2 + (Yc / dvl) ** 2 <= 1
        vb &= ~(((Xc / (0.45 * wvl)) ** 2 + ((Yc - 1.25 * dvl) / (0.5 * dvl)) ** 2) <= 1)  # concave back
        vb_in = (Xc / (wvl - 1.6)) ** 2 + (Yc / (dvl - 1.6)) ** 2 <= 1
        canal_y = dvl + rcl * 0.95
        canal = (Xc / (rcl * 1.1)) ** 2 + ((Yc - canal_y) / rcl) ** 2 <= 1
        sac = (Xc / (rcl * 0.75)) ** 2 + ((Yc - canal_y) / (rcl * 0.7)) ** 2 <= 1
        ped = (np.abs(Xc) > 0.8 * rcl) & (np.abs(Xc) < 0.8 * rcl + u(6, 9) * s) & (Yc > 0.3 * dvl) & (Yc < canal_y + 0.2 * rcl)
        lam_r = rcl + u(4, 6) * s
        lam = ((Xc / (lam_r * 1.15)) ** 2 + ((Yc - canal_y) / lam_r) ** 2 <= 1) & ~canal & (Yc > canal_y - 0.2 * rcl)
        tp_len = (u(18, 32) if lumbar else u(12, 20)) * s
        tp = (np.abs(Xc) < 0.8 * rcl + tp_len) & (np.abs(Xc) > 0.5 * rcl) & (np.abs(Yc - canal_y + 0.2 * rcl) < u(3, 5) * s)
        if name in ("S1", "S2"):  # sacral alae out to the sacro-iliac joints
            tp = (np.abs(Xc) < u(44, 52) * s) & (Yc > -0.4 * dvl) & (Yc < dvl + rcl)
        spw = u(3, 4.5) * s
        spn = (np.abs(Xc) < spw) & (Yc > canal_y + rcl) & (Yc < canal_y + rcl + sp_len)
        over_lut = np.zeros(256, bool)
        over_lut[[T[n] for n in ("visc_fat", "subq_fat", "muscle", "fascia", "peri_fat")]] = True
        for k in range(sub.shape[0]):
            zk = zl[k]
            sl = sub[k]
            ok = over_lut[sl]
            if -hb / 2 <= zk <= hb / 2:
                sl[vb & ok] = T["cortical"]
                if abs(zk) < hb / 2 - 1.5:
                    sl[vb_in & ok] = T["cancellous"]
                sl[canal] = T["epidural_fat"]
                sl[sac] = T["csf"]
                zn = (zk + hb / 2) / hb  # 0 bottom .. 1 top
                if 0.35 < zn < 0.95:
                    sl[ped & ok] = T["cortical"]
                if 0.3 < zn < 0.8:
                    sl[lam & ok] = T["cortical"]
                if sacral and name != "S3":
                    sl[tp & ok] = T["cancellous"] if abs(zk) < hb / 2 - 1.5 else T["cortical"]
                elif 0.4 < zn < 0.75:
                    sl[tp & ok] = T["cortical"]
            elif zk < -hb / 2:  # the disc below this body
                sl[((Xc / (wvl + 1.5)) ** 2 + (Yc / (dvl + 1.0)) ** 2 <= 1) & ok] = T["disc"]
                sl[canal] = T["epidural_fat"]
                sl[sac] = T["csf"]
            # spinous process slopes down behind the next level
            if -hb * 0.9 < zk < hb * 0.3:
                sl[spn & (Yc < canal_y + rcl + sp_len - 0.3 * max(0.0, -zk)) & ok] = T["cortical"]
        rows = np.arange(szs.start, szs.stop)
        bone_rows[rows] += ((sub == T["cortical"]).sum(axis=(1, 2)) * geom.spacing[0] * geom.spacing[1]).astype(np.float32)
    info["y_vb"] = y0 + y_vb

    # --- iliac wings (curved bone plates from the sacro-iliac joints), iliacus inside, gluteal muscles outside
    z_crest = [lv[1] for lv in levels if lv[0] == "L4"][0] - u(0, 15) * s
    z_bot = z_crest - u(90, 120) * s
    if z_bot < zmax and z_crest + 30 > zmin:
        for side in (-1, 1):
            wcx, wcy = x0 + side * u(55, 72) * s, y0 + u(-5, 15) * s
            wa, wb, wt = u(55, 72) * s, u(42, 58) * s, u(6, 11) * s

            def ring(X, Y, Z, wcx=wcx, wcy=wcy, wa=wa, wb=wb, side=side):
                f = 0.55 + 0.45 * np.clip((Z - z_bot) / (z_crest - z_bot), 0, 1)
                q = np.sqrt(((X - wcx) / (wa * f)) ** 2 + ((Y - wcy) / (wb * f)) ** 2)
                th = np.arctan2(Y - wcy, side * (X - wcx))  # 0 lateral, +pi/2 posterior
                top = z_crest + 12 * s * np.cos(th)  # the crest is highest laterally
                return (q - 1) * wa * f, (th > -1.1) & (th < 2.3) & (Z < top) & (Z > z_bot)

            lo, hi = (wcx - wa - 45, wcy - wb - 45, z_bot), (wcx + wa + 45, wcy + wb + 45, z_crest + 15 * s)
            cv.paint(T["cortical"], lo, hi, lambda X, Y, Z, r=ring: (lambda d, m: m & (np.abs(d) < wt / 2))(*r(X, Y, Z)),
                     over=["visc_fat", "muscle", "peri_fat", "fascia", "subq_fat"])
            cv.paint(T["cancellous"], lo, hi, lambda X, Y, Z, r=ring: (lambda d, m: m & (np.abs(d) < wt / 2 - 1.5))(*r(X, Y, Z)),
                     over=["cortical"])
            cv.paint(T["muscle"], lo, hi, lambda X, Y, Z, r=ring: (lambda d, m: m & (d < -wt / 2) & (d > -wt / 2 - 14 * s))(*r(X, Y, Z)),
                     over=["visc_fat"])
            cv.paint(T["muscle"], lo, hi, lambda X, Y, Z, r=ring: (lambda d, m: m & (d > wt / 2) & (d < wt / 2 + 30 * s))(*r(X, Y, Z)),
                     over=["visc_fat", "subq_fat", "muscle", "fascia"])
            rows = slice(int(np.searchsorted(cv.z, z_bot)), int(np.searchsorted(cv.z, z_crest + 15 * s)))
            bone_rows[rows] += 300.0 * s
    info["vb"] = (wv, dv, rc)

    # --- ribs: curved tubes from the transverse processes along the body wall, sloping down anteriorly
    rib_levels = [(int(n[1:]), zc_l, hb) for n, zc_l, hb in levels if n.startswith("T")]
    if rib_levels:
        alpha_end = {12: u(0.9, 1.3), 11: u(1.5, 1.9), 10: u(2.2, 2.5), 9: u(2.5, 2.75), 8: u(2.6, 2.85),
                     7: u(2.7, 2.95), 6: u(2.75, 2.95), 5: u(2.75, 2.95)}
        drop = {12: u(15, 30), 11: u(30, 50), 10: u(60, 90), 9: u(75, 105), 8: u(80, 110), 7: u(80, 110),
                6: u(70, 100), 5: u(60, 90)}
        ra, rbz = u(3.5, 5.0) * s, u(5.0, 7.0) * s
        top = max(zz for _, zz, _ in rib_levels) + 20
        bot = min(zz - drop[n] * s * 1.2 for n, zz, _ in rib_levels) - 20
        b = cv.box((-1e9, -1e9, bot), (1e9, 1e9, top))
        tp_x = wv * 0.8 + u(18, 26) * s
        tp_y = y0 + y_vb + dv + rc - bcy
        a_tp = math.atan2(tp_x, tp_y)
        R_tp = math.hypot(tp_x, tp_y)
        alpha2 = np.arctan2(np.abs(dx), dy)  # 0 posterior, pi/2 lateral, pi anterior (ny, nx)
        deep2 = (alpha2 < a_tp + 0.8) & (np.abs(R - R_tp) < 15)
        if b is not None:
            (szs, _, _), _, _, Zr = b
            sub_t = cv.t[szs]
            De = Deff[szs]
            cand = (sub_t != T["air"]) & (De > 0.5 * sc2) & (((De < sc2 + tw2 + 12) & (alpha2 > a_tp - 0.1)) | deep2)
            flat_idx = np.flatnonzero(cand)
            del cand
            if flat_idx.size:
                kz, rem = np.divmod(flat_idx, sub_t.shape[1] * sub_t.shape[2])
                ky, kx = np.divmod(rem, sub_t.shape[2])
                Rv = R[ky, kx]
                sidev = np.sign(dx[0, kx])
                alpha = alpha2[ky, kx]
                Rw = Rv + De[kz, ky, kx] - sc2[ky, kx] - 0.5 * tw2[ky, kx]  # radius of the mid wall
                del De
                zv = Zr[:, 0, 0][kz]
                wgt = np.clip((alpha - a_tp) / 0.55, 0, 1)
                wgt = wgt * wgt * (3 - 2 * wgt)
                Rr = R_tp * (1 - wgt) + Rw * wgt
                codes = np.zeros(flat_idx.size, np.uint8)
                for n, zc_l, hb in rib_levels:
                    for side in (-1, 1):
                        ae = alpha_end[n] + nrm(0, 0.05)
                        z_o = zc_l + 0.25 * hb
                        dr = drop[n] * s * u(0.85, 1.15)
                        i0, i1 = np.searchsorted(zv, [z_o - dr * 1.3 - 15, z_o + 15])
                        if i1 <= i0:
                            continue
                        seg = slice(i0, i1)
                        sel = (sidev[seg] == side) & (alpha[seg] > a_tp - 0.05) & \
                            (alpha[seg] < ae + (0.3 if 7 <= n <= 10 else 0))
                        if not sel.any():
                            continue
                        idx = np.flatnonzero(sel) + i0
                        aa = alpha[idx]
                        prog = np.clip((aa - a_tp) / (ae - a_tp), 0, 1.3)
                        zr = z_o + 2 * s * np.sin(np.pi * np.clip(prog, 0, 0.4) / 0.4) - dr * prog ** 1.4
                        dR, dZ = Rv[idx] - Rr[idx], zv[idx] - zr
                        q = (dR / ra) ** 2 + (dZ / rbz) ** 2
                        qi = (dR / max(ra - 1.3, 0.5)) ** 2 + (dZ / max(rbz - 1.3, 0.5)) ** 2
                        cc = np.where(q <= 1, np.where(aa > ae, T["cartilage"], np.where(qi <= 1, T["cancellous"],
                                                                                       T["cortical"])), 0)
                        codes[idx] = np.where(cc > 0, cc, codes[idx])
                m = codes > 0
                keep_lut = np.zeros(256, bool)
                keep_lut[[T[nm] for nm in ("muscle", "visc_fat", "subq_fat", "fascia", "lung")]] = True
                flat_t = sub_t.reshape(-1)
                tgt = flat_idx[m]
                okm = keep_lut[flat_t[tgt]]
                flat_t[tgt[okm]] = codes[m][okm]
                bone_rows[szs.start:szs.stop] += np.bincount(kz[m][okm], minlength=szs.stop - szs.start).astype(np.float32) \
                    * geom.spacing[0] * geom.spacing[1]
    info["bone_rows"] = bone_rows

    # --- diaphragm, lung bases, heart
    zt_r = z0 + u(115, 155) * s
    zt_l = zt_r - u(5, 20) * s
    post_drop = u(45, 75) * s
    y_front, y_back = bcy - B, y0 + back

    def dome(X, Y):
        top = zt_r + (zt_l - zt_r) * _sig((X - x0) / 20.0)
        pr = np.clip((Y - y_front) / (y_back - y_front), 0, 1)
        return top - 0.0022 * (np.abs(X - x0) - 60 * s).clip(0) ** 2 - post_drop * pr ** 2

    lung_lo = min(zt_r, zt_l) - post_drop - 0.0022 * (A ** 2) - 10
    dthick = u(4, 7) * s
    cv.paint(T["lung"], (-1e9, -1e9, lung_lo), (1e9, 1e9, 1e9), lambda X, Y, Z: Z > dome(X, Y) + dthick, over=["visc_fat"])
    cv.paint(T["muscle"], (-1e9, -1e9, lung_lo), (1e9, 1e9, 1e9), lambda X, Y, Z: Z > dome(X, Y), over=["visc_fat"])
    hx, hy, hz = x0 + u(5, 25) * s, bcy - u(0, 25) * s, zt_r + u(25, 50) * s
    ha, hb_, hc = u(55, 70) * s, u(45, 55) * s, u(50, 65) * s
    cv.paint(T["heart"], (hx - ha, hy - hb_, hz - hc), (hx + ha, hy + hb_, hz + hc),
             lambda X, Y, Z: ((X - hx) / ha) ** 2 + ((Y - hy) / hb_) ** 2 + ((Z - hz) / hc) ** 2 <= 1,
             over=["lung", "muscle", "visc_fat"])

    # --- great vessels
    ao_dx, r_ao = u(4, 14) * s, u(8, 13) * s
    z_bif = [lv[1] for lv in levels if lv[0] == "L4"][0] + u(-10, 10) * s
    zs_v = np.arange(z_bif, zmax + 40, 8.0)
    tort = nrm(0, 4) * s
    tphase = u(0, 6.3)
    ao_pts = [(spine_x(z) + ao_dx + tort * math.sin(z / 60 + tphase), spine_y(z) - dv - r_ao - u(1, 3), z) for z in zs_v]
    if len(ao_pts) > 1:
        cv.tube(ao_pts, r_ao, T["aorta"], over=["visc_fat", "muscle", "peri_fat", "fascia", "lung"])
        if rng.random() < 0.55:  # wall calcification: plaques on the rim
            for _ in range(int(rng.integers(2, 10))):
                p = np.asarray(ao_pts[int(rng.integers(len(ao_pts)))]) + np.append(_unit(nrm(0, 1, 2)) * r_ao, 0)
                rr = u(1.2, 2.5)
                cv.paint(T["plaque"], p - rr - 3, p + rr + 3,
                         lambda X, Y, Z, p=p, rr=rr: (X - p[0]) ** 2 + (Y - p[1]) ** 2 + ((Z - p[2]) / 2.5) ** 2 <= rr * rr,
                         over=["aorta", "visc_fat"])
    bif = np.array([spine_x(z_bif) + ao_dx, spine_y(z_bif) - dv - r_ao, z_bif])
    for side in (-1, 1):
        pts = [bif + np.array([side * 0.3 * r_ao, 0, 0]), bif + np.array([side * 25 * s, -8 * s, -50 * s]),
               bif + np.array([side * 55 * s, -20 * s, -110 * s])]
        cv.tube(_spline(pts, 6), 0.62 * r_ao, T["artery"], over=["visc_fat", "muscle"])
        vpts = [bif + np.array([-0.7 * r_ao, 8, 5]), bif + np.array([side * 22 * s - 4, 4 * s, -50 * s]),
                bif + np.array([side * 50 * s, -8 * s, -110 * s])]
        cv.tube(_spline(vpts, 6), 0.75 * r_ao, T["vein"], over=["visc_fat", "muscle"])
    ivc_dx, ivc_a = -u(17, 28) * s, u(10, 14) * s
    ivc_pts = []
    for z in np.arange(z_bif, zmax + 40, 8.0):
        up = np.clip((z - z0 - 30 * s) / (60 * s), 0, 1)
        ivc_pts.append((spine_x(z) + ivc_dx - 12 * s * up, spine_y(z) - dv - u(4, 8) * s - 22 * s * up, z))
    if len(ivc_pts) > 1:
        cv.tube(ivc_pts, ivc_a, T["ivc"], over=["visc_fat", "muscle", "peri_fat", "fascia"])
    # SMA / SMV
    z_sma = z0 + u(5, 30) * s
    sma0 = np.array([spine_x(z_sma) + ao_dx, spine_y(z_sma) - dv - 2 * r_ao, z_sma])
    sma = _spline([sma0, sma0 + [0, -18 * s, -12 * s], sma0 + [-5 * s, -30 * s, -60 * s], sma0 + [-12 * s, -45 * s, -140 * s]], 5)
    cv.tube(sma, u(3, 4.2) * s, T["artery"], over=["visc_fat"])
    cv.tube(sma + np.array([-u(10, 15) * s, -2 * s, 0]), u(4, 6) * s, T["vein"], over=["visc_fat"])
    info["aorta"] = (ao_pts, r_ao)
    info["ivc"] = (ivc_pts, ivc_a)

    # --- liver: union of random smooth blobs (metaballs), under the right dome, tip beside the right kidney
    rk = frame.side(-1)
    rk_c = rk.c if rk is not None else np.array([x0 - 70 * s, y0, z0])
    blobs = [((x0 - u(55, 85) * s, y0 - u(15, 45) * s, zt_r - u(60, 80) * s), (u(65, 90), u(60, 80), u(50, 65))),
             ((x0 + u(-10, 30) * s, bcy - u(0.2, 0.45) * B, zt_l - u(45, 65) * s), (u(45, 70), u(30, 45), u(30, 45))),
             ((rk_c[0] - u(10, 30) * s, rk_c[1] - u(30, 50) * s, rk_c[2] + u(0, 25) * s), (u(30, 45), u(25, 35), u(35, 55)))]
    for _ in range(int(rng.integers(1, 4))):
        blobs.append(((x0 - u(20, 90) * s, y0 - u(10, 70) * s, zt_r - u(40, 100) * s), (u(30, 55), u(30, 50), u(30, 45))))
    blobs = [(np.asarray(c, float), np.asarray(a, float) * s) for c, a in blobs]
    lo_l = np.min([c - a * 1.6 for c, a in blobs], axis=0)
    hi_l = np.max([c + a * 1.6 for c, a in blobs], axis=0)
    bl = cv.box(lo_l, hi_l)
    if bl is not None:
        sl, X, Y, Z = bl
        F = np.zeros(cv.t[sl].shape, np.float32)
        for c, a in blobs:
            q = ((X - c[0]) / a[0]) ** 2 + ((Y - c[1]) / a[1]) ** 2 + ((Z - c[2]) / a[2]) ** 2
            F += np.exp(-2.0 * q)
        sub_geom = _Geom(F.shape[::-1], geom.spacing, (X.ravel()[0], Y.ravel()[0], Z.ravel()[0]), np.eye(3))
        F += 0.05 * _value_noise(sub_geom, 35.0 * s, rng, octaves=2)
        m = (F > math.exp(-2.0)) & (Z <= dome(X, Y))
        sub = cv.t[sl]
        m &= sub == T["visc_fat"]
        sub[m] = T["liver"]
        # vessels: where two smooth noise fields both cross zero -> branching tubes
        n1 = _value_noise(sub_geom, 40.0 * s, rng, octaves=2)
        n2 = _value_noise(sub_geom, 40.0 * s, rng, octaves=2)
        ves = m & (np.abs(n1) < 0.09) & (np.abs(n2) < 0.35)
        sub[ves] = T["liver_vessel"]
        del F, n1, n2
    if rng.random() < 0.45:
        gx, gy, gz = x0 - u(30, 55) * s, y0 - u(55, 85) * s, z0 + u(10, 35) * s
        ga, gb, gc = u(13, 20) * s, u(13, 20) * s, u(28, 40) * s
        cv.paint(T["bile"], (gx - ga, gy - gb, gz - gc), (gx + ga, gy + gb, gz + gc),
                 lambda X, Y, Z: ((X - gx) / ga) ** 2 + ((Y - gy) / gb) ** 2 + ((Z - gz) / gc) ** 2 <= 1,
                 over=["liver", "visc_fat", "liver_vessel"])

    # --- spleen: a crescent (outer disc minus an offset inner disc), concave towards the hilum
    lk = frame.side(1)
    lk_c = lk.c if lk is not None else np.array([x0 + 70 * s, y0, z0])
    spx, spy = x0 + u(80, 100) * s, y0 + u(-10, 15) * s
    spz = (lk.hi[2] if lk is not None else z0 + 50 * s) + u(-5, 30) * s
    r_out, hz_s = u(42, 58) * s, u(40, 60) * s
    off = _unit([-1.0, -u(0.3, 1.0)]) * r_out * u(0.55, 0.75)
    r_in = r_out * u(0.75, 0.9)

    def spleen(X, Y, Z):
        env = np.sqrt(np.clip(1 - ((Z - spz) / hz_s) ** 2, 0, 1))
        ro, ri = r_out * env, r_in * env
        return (((X - spx) ** 2 + (Y - spy) ** 2) <= ro * ro) & (((X - spx - off[0]) ** 2 + (Y - spy - off[1]) ** 2) > ri * ri)
    cv.paint(T["spleen"], (spx - r_out, spy - r_out, spz - hz_s), (spx + r_out, spy + r_out, spz + hz_s), spleen,
             over=["visc_fat"])

    # --- stomach: J-shaped tube with rugae and an air-fluid level (patient supine: gas anterior)
    dist = u(0.6, 1.1)
    st_ctrl = np.array([[55, -5, 85], [52, -35, 58], [35, -70, 32], [5, -85, 15], [-22, -72, 20], [-40, -52, 14],
                        [-46, -32, -8]], float) * s + np.array([x0, y0, z0]) + nrm(0, 5 * s, (7, 3))
    st_r = np.array([38, 40, 35, 28, 15, 13, 12], float) * s * np.array([dist] * 4 + [1, 1, 1])
    st_pts = _spline(st_ctrl, max(4.0, 0.8 * min(geom.spacing)))
    st_rad = np.interp(np.linspace(0, 1, len(st_pts)), np.linspace(0, 1, len(st_r)), st_r)
    ts = _TubeSet(cv, st_pts.min(0) - 50 * s, st_pts.max(0) + 50 * s)
    ts.add(1, st_pts, st_rad)
    if ts.ok:
        sub = cv.t[ts.sl]
        ok = (sub == T["visc_fat"]) & (ts.sd < 0)
        wall_t = u(3, 5) * s
        sub_geom = _Geom(sub.shape[::-1], geom.spacing, ts.o, np.eye(3))
        rug = 2.5 * s * _value_noise(sub_geom, 12.0, rng, octaves=2)
        sub[ok] = T["gi_wall"]
        lumen = ok & (ts.sd < -(wall_t + np.abs(rug)))
        level = bcy - B + u(0.3, 0.6) * B
        sub[lumen] = T["stomach_content"]
        sub[lumen & (ts.Y < level)] = T["gas"]
        del rug
    del ts

    # --- pancreas: a lobulated band from the splenic hilum across in front of the aorta to the duodenum
    p_ctrl = np.array([[75, -12, 30], [35, -42, 20], [0, -52, 12], [-28, -45, 2], [-22, -30, -12]], float) * s \
        + np.array([x0, y0, z0]) + nrm(0, 3 * s, (5, 3))
    p_pts = _spline(p_ctrl, max(4.0, 0.8 * min(geom.spacing)))
    p_rad = np.interp(np.linspace(0, 1, len(p_pts)), [0, 0.4, 0.7, 1.0], [9, 10, 15, 11]) * s
    ts = _TubeSet(cv, p_pts.min(0) - 25 * s, p_pts.max(0) + 25 * s)
    ts.add(1, p_pts, p_rad)
    if ts.ok:
        sub = cv.t[ts.sl]
        sub_geom = _Geom(sub.shape[::-1], geom.spacing, ts.o, np.eye(3))
        lob = 3.0 * s * _value_noise(sub_geom, 8.0, rng, octaves=2)
        sub[(ts.sd < lob) & (sub == T["visc_fat"])] = T["pancreas"]
    del ts

    # --- perirenal fat inside Gerota's fascia, septa; kidneys themselves are neutral fat here
    if peri_dist is not None:
        d = peri_dist
        yrel = np.clip(Y1 / 40.0, -1, 1)[None, :, None]  # thicker behind the kidneys
        thick = np.float32(u(8, 16) * s * (0.6 + 0.4 * sc0 / 16.0)) * (1 + 0.5 * yrel)
        carve = np.zeros(256, bool)
        carve[[T[n] for n in ("visc_fat", "liver", "liver_vessel", "spleen", "gi_wall", "stomach_content", "gas",
                              "pancreas", "bile", "lung")]] = True
        near = (d > 0) & (d < thick)
        cv.t[near & carve[cv.t]] = T["peri_fat"]
        cv.t[(d > 0) & (d < 2.0) & (cv.t == T["muscle"])] = T["peri_fat"]
        shell = (np.abs(d - thick) < 0.9) & ((cv.t == T["visc_fat"]) | (cv.t == T["peri_fat"]))
        cv.t[shell] = T["fascia"]
        cv.t[d <= 0] = T["peri_fat"]
        del near, shell

    # --- renal vessels to each hilum, ureters along the psoas
    for k in kids:
        h = k.hilum
        side = k.side if k.side != 0 else (1 if h[0] > x0 else -1)
        zh = h[2]
        ao = np.array([spine_x(zh) + ao_dx, spine_y(zh) - dv - r_ao - 1, zh + u(5, 15) * s])
        ivc = np.array([spine_x(zh) + ivc_dx, spine_y(zh) - dv - 8 * s, zh])
        over_v = ["visc_fat", "peri_fat", "fascia", "muscle", "liver", "pancreas"]
        if side > 0:
            art = _spline([ao + [r_ao * 0.8, 0, 0], (ao + h) / 2 + [0, 3 * s, 0], h], 3)
            vein = _spline([h + [0, -4 * s, 0], [ao[0], ao[1] - r_ao - 5 * s, zh], ivc], 3)
        else:
            art = _spline([ao + [-r_ao * 0.8, 0, 0], [ivc[0], ivc[1] + ivc_a + 4 * s, zh + 3 * s], h], 3)
            vein = _spline([h + [0, -4 * s, 0], ivc], 3)
        cv.tube(art, u(2.5, 3.6) * s, T["artery"], over=over_v)
        cv.tube(vein, u(4, 6) * s, T["renal_vein"], over=over_v + ["artery"])
        inner = k.sinus + 0.5 * (k.c - k.sinus)
        for code, off, rr in ((T["artery"], 3.0, 2.0), (T["renal_vein"], -3.0, 3.0)):  # branches in the sinus
            for _ in range(3):
                tip = inner + _unit(rng.normal(0, 1, 3) + k.long * rng.choice([-1.5, 1.5])) * rng.uniform(10, 25) * s
                cv.tube(_spline([h + [0, off * s, 0], inner, tip], 3), rr * s, code, over=["peri_fat"])
        pel_r = u(4, 9) * s
        pel = h + k.medial * pel_r * 0.5
        cv.paint(T["urine"], pel - pel_r - 2, pel + pel_r + 2,
                 lambda X, Y, Z, pel=pel, pel_r=pel_r: ((X - pel[0]) ** 2 + (Y - pel[1]) ** 2 + ((Z - pel[2]) / 1.4) ** 2)
                 <= pel_r ** 2, over=["peri_fat", "fascia"])
        ur0 = h + np.array([0, 0, -12 * s])
        ps_x = x0 + side * (wv + 12 * s)
        ur = _spline([ur0, [ps_x + side * 10 * s, y0 + y_vb - 18 * s, zh - 60 * s],
                      [ps_x + side * 15 * s, y0 + y_vb - 25 * s, zh - 200 * s]], 5)
        cv.tube(ur, u(2.5, 3.5) * s, T["urine"], over=["visc_fat", "peri_fat", "fascia", "muscle"], wall=1.2, wall_code=T["gi_wall"])

    # --- colon along its frame with haustra; stool and gas
    kx_r = rk_c[0] - x0 if rk is not None else -75 * s
    kx_l = lk_c[0] - x0 if lk is not None else 80 * s
    c_ctrl = np.array([[kx_r - 10, -55, -95], [kx_r - 15, -38, -50], [kx_r - 12, -35, -10], [kx_r, -50, 25],
                       [-30, -95, -5], [20, -100, -15], [55, -80, 15], [kx_l + 10, -35, 55], [kx_l + 20, -15, 10],
                       [kx_l + 20, -22, -40], [kx_l + 10, -28, -90], [50, -55, -125], [0, -60, -140]], float)
    c_ctrl[:, 1:] *= s
    c_ctrl[:, 0] = np.where(np.abs(c_ctrl[:, 0]) < 60, c_ctrl[:, 0] * s, c_ctrl[:, 0])
    c_ctrl += np.array([x0, y0, z0]) + nrm(0, 7 * s, c_ctrl.shape)
    c_pts = _spline(c_ctrl, max(3.0, 0.8 * min(geom.spacing)))
    seg = np.linalg.norm(np.diff(c_pts, axis=0), axis=1)
    arc = np.concatenate([[0], np.cumsum(seg)])
    r0 = u(16, 26) * s
    period = u(22, 34) * s
    haus = u(0.15, 0.35)
    c_rad = r0 * (1 - haus * (0.5 + 0.5 * np.cos(2 * np.pi * arc / period)) ** 6) * (1 + 0.15 * np.sin(arc / 90 + u(0, 6)))
    ts = _TubeSet(cv, c_pts.min(0) - r0 - 5, c_pts.max(0) + r0 + 5)
    ts.add(1, c_pts, c_rad)
    if ts.ok:
        sub = cv.t[ts.sl]
        ok = (sub == T["visc_fat"]) & (ts.sd < 0)
        sub[ok] = T["gi_wall"]
        lumen = ok & (ts.sd < -u(1.5, 2.5))
        sub[lumen] = T["stool"]
        gas_frac = u(0.0, 0.8)
        sub[lumen & (ts.Y < ts.cy - (1 - 2 * gas_frac) * r0 * 0.8)] = T["gas"]
    del ts

    # --- small bowel: random-walk tubes in the free intraperitoneal space
    lo_b = np.array([bcx - A, bcy - B, zmin])
    hi_b = np.array([bcx + A, y0 + 10 * s, zmax])
    ts = _TubeSet(cv, lo_b, hi_b)
    if ts.ok:
        free = cv.t[ts.sl] == T["visc_fat"]
        cand = np.argwhere(free[:, ::3, ::3])
        n_tubes = int(rng.integers(14, 26))
        step = max(6.0 * s, 1.5 * max(geom.spacing[:2]))
        contents = []
        for tid in range(1, n_tubes + 1):
            if cand.size == 0:
                break
            kz, ky, kx = cand[int(rng.integers(len(cand)))]
            p = ts.o + np.array([kx * 3, ky * 3, kz], float) * ts.h
            collapsed = rng.random() < 0.35
            r = (u(4, 7) if collapsed else u(9, 15)) * s
            dirv = _unit(nrm(0, 1, 3))
            pts = [p]
            for _ in range(int(u(240, 660) * s / step)):
                for _try in range(8):
                    nd = _unit(dirv + 0.7 * nrm(0, 1, 3))
                    q = pts[-1] + nd * step
                    iq = np.rint((q - ts.o) / ts.h).astype(int)
                    if np.all(iq >= 0) and np.all(iq < np.asarray(free.shape[::-1])) and free[iq[2], iq[1], iq[0]]:
                        dirv = nd
                        pts.append(q)
                        break
                else:
                    break
            if len(pts) > 2:
                ts.add(tid, np.asarray(pts), r)
                contents.append((tid, collapsed, r, rng.random() < 0.3, u(0.1, 0.5)))
        sub = cv.t[ts.sl]
        inside = (ts.sd < 0) & free
        sub[inside] = T["gi_wall"]
        for tid, collapsed, r, gas, gfrac in contents:
            if collapsed:
                continue
            lum = inside & (ts.id == tid) & (ts.sd < -u(1.5, 2.5) * s)
            sub[lum] = T["bowel_fluid"]
            if gas:
                sub[lum & (ts.Y < ts.cy - (1 - 2 * gfrac) * r)] = T["gas"]
    del ts
    return cv.t, info


# ----------------------------------------------------------------------------------------------------------
# kidney, tumor and cyst fields on the labelled region of the (canonical) label grid


def _organ_fields(lab: np.ndarray, cg: _Geom, frame: _Frame, case: dict, rng):
    """HU for every labelled voxel of the crop ``lab`` (canonical array), float32, same shape."""
    kd = case["kidney"]
    out = np.zeros(lab.shape, np.float32)
    fg = lab > 0
    if not fg.any():
        return out
    X, Y, Z = cg.coords()
    dimg = sitk.GetImageFromArray(fg.astype(np.uint8))
    dimg.SetSpacing(cg.spacing)
    depth = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(dimg, insideIsPositive=True, squaredDistance=False,
                                                                useImageSpacing=True)).astype(np.float32)
    fine = _value_noise(cg, 6.0, rng, octaves=2)
    kid_idx = np.flatnonzero(fg)
    P = np.stack([X.ravel()[kid_idx], Y.ravel()[kid_idx], Z.ravel()[kid_idx]], 1)
    dep = depth.ravel()[kid_idx]
    real = [k for k in frame.kidneys if not k.virtual]
    if real:
        dists = np.stack([np.linalg.norm(P - k.c, axis=1) for k in real], 1)
        owner = np.argmin(dists, 1)
    else:
        owner = np.zeros(len(P), int)
        real = [None]
    vals = np.zeros(len(P), np.float32)
    tc = kd["cortex_mm"] * float(np.clip(frame.s, 0.6, 1.2))
    for ki, k in enumerate(real):
        sel = owner == ki
        if not sel.any():
            continue
        p = P[sel]
        dd = dep[sel]
        sc = k.sinus if k is not None else p.mean(0)
        v = p - sc
        r = np.linalg.norm(v, axis=1) + 1e-3
        uvec = v / r[:, None]
        rho = r / (r + np.maximum(dd, 0))
        # pyramids: cones around the sinus, apex (papilla) towards the sinus, base at the cortex
        npy = kd["pyramids"]
        gold = math.pi * (3 - math.sqrt(5))
        zz = 1 - 2 * (np.arange(npy) + 0.5) / npy
        th = gold * np.arange(npy) + rng.uniform(0, 2 * math.pi)
        axes = np.stack([np.sqrt(1 - zz ** 2) * np.cos(th), np.sqrt(1 - zz ** 2) * np.sin(th), zz], 1)
        axes = axes + rng.normal(0, 0.12, axes.shape)
        axes /= np.linalg.norm(axes, axis=1, keepdims=True)
        if k is not None and k.medial is not None:
            axes = axes[axes @ k.medial < 0.55]
        half = rng.uniform(0.32, 0.5, len(axes))
        cosang = uvec @ axes.T
        j = np.argmax(cosang, 1)
        ang = np.arccos(np.clip(cosang[np.arange(len(j)), j], -1, 1))
        pap = kd["papilla"]
        grow = np.clip((rho - pap) / (1 - pap) * 2.0, 0, 1) ** 0.6
        w_med = _sig((half[j] * grow - ang) / 0.04) * _sig((dd - tc) / 0.6)
        cortex = kd["cortex"] * (kd["asym"] if ki == 0 else 1.0)
        base = cortex + (kd["medulla"] - cortex) * w_med
        enh = base - kd["base"]
        spk = np.exp(kd["speckle"] * 3.0 * fine.ravel()[kid_idx][sel] - 0.5 * (kd["speckle"] * 3.0) ** 2)
        val = kd["base"] + enh * spk
        # the innermost zone (towards the sinus): papillae and calyces (urine, or excreted contrast), small
        # vessels; no fat inside the label (KiTS labels leave the sinus fat out)
        w_in = _sig((pap - 0.02 - rho) / 0.03) * _sig((dd - tc) / 0.7)
        val = val + (kd["base"] + (kd["medulla"] - kd["base"]) * 1.05 - val) * w_in
        ins = w_in > 0.3
        if ins.any() and k is not None:
            segs = []
            for a_j in axes:
                segs.append((sc, sc + a_j * np.median(r[ins]) * 1.5, rng.uniform(0.8, 1.8)))
            pin = p[ins]
            dmin = np.full(len(pin), np.inf)
            for a0, a1, rr in segs:
                ab = a1 - a0
                t = np.clip(((pin - a0) @ ab) / max(ab @ ab, 1e-6), 0, 1)
                dseg = np.linalg.norm(pin - a0 - t[:, None] * ab, axis=1) - rr
                dmin = np.minimum(dmin, dseg)
            vv = val[ins]
            vv = np.where(dmin < 0, kd["urine"], vv)
            vs = fine.ravel()[kid_idx][sel][ins]
            vv = np.where((dmin >= 0) & (np.abs(vs) < 0.1), kd["vessel"] * 0.5 + kd["rvein"] * 0.5, vv)
            val[ins] = vv
        vals[sel] = val
    out.ravel()[kid_idx] = vals

    # tumors
    tm = lab == TUMOR
    if tm.any():
        td = case["tumor"]
        cc = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(tm.astype(np.uint8))))
        timg = sitk.GetImageFromArray(tm.astype(np.uint8))
        timg.SetSpacing(cg.spacing)
        tdep = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(timg, insideIsPositive=True, squaredDistance=False,
                                                                   useImageSpacing=True)).astype(np.float32)
        coarse_n = _value_noise(cg, 14.0, rng, octaves=3)
        val = td["hu"] + td["hetero"] * (0.6 * coarse_n + 0.4 * fine)
        ids = np.unique(cc[tm])
        maxd = np.zeros(int(ids.max()) + 1, np.float32)
        np.maximum.at(maxd, cc[tm], tdep[tm])
        offs = rng.normal(0, 0.06, len(maxd)).astype(np.float32)
        val = val * (1 + offs[cc])
        dn = tdep / np.maximum(maxd[cc], 1e-3)
        if td["necrosis"]:
            nec = (dn + 0.25 * coarse_n > td["necrosis_level"] + 0.25) & (maxd[cc] > 6.0)
            val = np.where(nec, td["necrosis_hu"] + 4 * fine, val)
        if td["scar"]:
            val = np.where((dn > 0.7) & (np.abs(fine) < 0.5) & (maxd[cc] > 8.0), td["hu"] * 0.5 + 10, val)
        if td["fat"]:
            val = np.where(coarse_n > 0.4, td["fat_hu"] + 8 * fine, val)
        if td["calcified"]:
            val = np.where((fine > 1.6) & (coarse_n > 0.2), td["calc_hu"], val)
        val = val - td["capsule"] * (tdep < 1.5)
        out[tm] = val[tm]
    cy = lab == CYST
    if cy.any():
        cc = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(cy.astype(np.uint8))))
        a, b = case["cyst_hu"]
        per = np.array([a] + [b if i % 2 else a for i in range(1, int(cc.max()) + 1)], np.float32)
        out[cy] = per[cc[cy]] + 1.5 * fine[cy]
    return out


# ----------------------------------------------------------------------------------------------------------
# scanner model


def _slice_kernel(spacing: float, thickness: float):
    """Slice sensitivity profile: rect of width ``thickness`` convolved with a Gaussian (sigma 0.2 x
    thickness), sampled at slice offsets; normalised to sum 1."""
    sig = 0.2 * thickness
    n = int(math.ceil((thickness / 2 + 3 * sig) / spacing))
    k = np.arange(-n, n + 1) * spacing
    w = np.array([0.5 * (math.erf((x + thickness / 2) / (sig * math.sqrt(2))) - math.erf((x - thickness / 2) / (sig * math.sqrt(2))))
                  for x in k])
    w = np.maximum(w, 0)
    return (w / w.sum()).astype(np.float32)


def _scanner(ct: np.ndarray, cg: _Geom, sd_slice: np.ndarray, cent2d: np.ndarray, air2d: np.ndarray,
             streaks: list, case: dict, noise_scale: float, rng) -> np.ndarray:
    """Blur (kernel MTF in-plane, slice profile along z), FBP-like noise and streaks, in place-ish."""
    sc = case["scanner"]
    nz, ny, nx = ct.shape
    dz, dy, dx = cg.spacing[2], cg.spacing[1], cg.spacing[0]
    fy = np.fft.fftfreq(ny, d=dy).astype(np.float32)[:, None]
    fxr = np.fft.rfftfreq(nx, d=dx).astype(np.float32)[None, :]
    fxf = np.fft.fftfreq(nx, d=dx).astype(np.float32)[None, :]

    def mtf(fx):
        f2 = fx * fx + fy * fy
        a = (2 * math.pi * sc["psf_mm"]) ** 2
        return np.exp(-0.5 * a * f2) * (1 + sc["boost"] * a * f2 * np.exp(-0.5 * a * f2))

    def nps(fx):
        f = np.sqrt((fx * sc["aniso"]) ** 2 + fy * fy)
        return f * np.exp(-(2 * math.pi * sc["noise_mm"] * f) ** 2 / 2)

    M = mtf(fxr).astype(np.float32)
    Hf = nps(fxf)
    Hn = (nps(fxr) / max(math.sqrt(float((Hf ** 2).mean())), 1e-9)).astype(np.float32)
    kz = _slice_kernel(dz, max(dz, 0.8) * sc["thickness"]) if nz > 1 else np.ones(1, np.float32)
    zfac = float(math.sqrt((kz ** 2).sum()))
    rows = max(1, int(_CHUNK_VOXELS // (ny * nx)))
    for za in range(0, nz, rows):
        zb = min(nz, za + rows)
        blk = ct[za:zb]
        for S, amp in streaks:
            blk += amp[za:zb, None, None] * S[None]
        F = np.fft.rfft2(blk, axes=(1, 2)) * M
        if noise_scale > 0:
            dens = 1.0 + 0.35 * np.clip(blk / 800.0, 0, 1.5)
            sd = (sd_slice[za:zb, None, None] * (0.7 + 0.6 * cent2d[None]) * dens) * np.float32(noise_scale / zfac)
            sd = np.where(air2d[None], sd * 0.45, sd)
            w = rng.standard_normal(blk.shape, dtype=np.float32) * sd.astype(np.float32)
            F += np.fft.rfft2(w, axes=(1, 2)) * Hn
            del w, sd, dens
        ct[za:zb] = np.fft.irfft2(F, s=(ny, nx), axes=(1, 2))
        del F
    if len(kz) > 1:
        n = len(kz) // 2
        src = ct.copy()
        ct *= kz[n]
        for o in range(1, n + 1):
            ct[o:] += kz[n - o] * src[:-o]
            ct[:o] += kz[n - o] * src[:1]
            ct[:-o] += kz[n + o] * src[o:]
            ct[-o:] += kz[n + o] * src[-1:]
        del src
    return ct


# ----------------------------------------------------------------------------------------------------------
# the generator


def synthesize_validation_ct(labels: sitk.Image, rng: np.random.Generator, *, phase: Optional[str] = None,
                             noise_scale: float = 1.0, cyst_as_label: bool = True,
                             info: Optional[dict] = None) -> tuple[sitk.Image, sitk.Image]:
    """Validation CT for a label map (see the module text; never use it for training).

    ``labels``: 3D integer SimpleITK image (0 background, 1 kidney, 2 tumor, 3 cyst), any grid and
    direction; ``rng`` draws everything; ``phase`` forces a contrast phase (one of :data:`PHASES`, default:
    drawn); ``noise_scale`` multiplies the quantum noise and streaks (0: none); ``info``: a dict that gets
    the case's draws (phase, tumor type, kernel, ...). Returns ``(ct, labels)``: int16 HU and uint8 labels
    on exactly the label map's grid (cysts kept as 3, or folded into kidney when ``cyst_as_label`` is False).
    Raises InputError for unusable label images.
    """
    if not isinstance(rng, np.random.Generator):
        raise InputError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not noise_scale >= 0:
        raise InputError(f"noise_scale must be >= 0, got {noise_scale}")
    t0 = time.perf_counter()
    lab_img = _check(labels)
    canon = _Canonical(lab_img)
    cg = canon.geom
    lab = canon.to(sitk.GetArrayViewFromImage(lab_img))
    nzs = [np.flatnonzero(lab.max(axis=ax)) for ax in ((1, 2), (0, 2), (0, 1))]
    box = None
    if nzs[0].size:
        (zz, yy, xx) = nzs
        box = (np.array([xx[0], yy[0], zz[0]]), np.array([xx[-1] + 1, yy[-1] + 1, zz[-1] + 1]))
    case = _draw_case(rng, phase)
    frame = _estimate_frame(lab_img, canon, lab, box, rng)

    # background anatomy on an axis-aligned grid
    cor = cg.corners()
    lo, hi = cor.min(0), cor.max(0)
    cxy = max(min(cg.spacing[0], cg.spacing[1]), 0.9)
    czz = max(cg.spacing[2], cxy)
    ext = hi - lo
    n = (ext[0] / cxy) * (ext[1] / cxy) * (ext[2] / czz)
    if n > _COARSE_VOXELS:
        f = (n / _COARSE_VOXELS) ** (1 / 3)
        cxy, czz = cxy * f, czz * f
    coarse = _aligned(lo, hi, (cxy, cxy, czz), margin=1)
    peri = None
    if frame.region is not None:
        dm = sitk.SignedMaurerDistanceMap(frame.region.image((frame.region_lab > 0).astype(np.uint8)),
                                          insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
        peri = coarse.sample(sitk.Cast(dm, sitk.sitkFloat32), sitk.sitkLinear, 1e4)
    t1 = time.perf_counter()
    tissue, ana = _build_anatomy(coarse, frame, case, rng, peri)
    del peri
    t2 = time.perf_counter()
    hu = case["hu"][tissue]
    amp = case["amp"]
    n_lo = _value_noise(coarse, 30.0, rng, octaves=3)
    hu += amp[0][tissue] * n_lo
    del n_lo
    n_hi = _value_noise(coarse, 8.0, rng, octaves=2)
    hu += amp[1][tissue] * n_hi
    # lognormal fatty infiltration of muscle, trabecular speckle, mottled stool with gas bubbles
    mus = tissue == T["muscle"]
    hu[mus] += (case["hu"][T["subq_fat"]] - case["hu"][T["muscle"]]) * np.clip(np.exp(0.8 * n_hi[mus] - 1.6) - 0.05, 0, 0.6) \
        * rng.uniform(0.1, 1.0)
    vf = tissue == T["visc_fat"]  # small mesenteric vessels: thin strands where the fine noise crosses zero
    hu[vf] = np.where(np.abs(n_hi[vf]) < 0.025, case["hu"][T["vein"]] * 0.7, hu[vf])
    pf = tissue == T["peri_fat"]  # bridging septa of the perirenal fat
    hu[pf] = np.where(np.abs(n_hi[pf]) < 0.03, case["hu"][T["fascia"]], hu[pf])
    st = tissue == T["stool"]
    hu[st] = np.where(n_hi[st] > 0.9, case["hu"][T["gas"]], hu[st])
    if case["phase"] == "arterial":  # arciform (zebra) enhancement of the spleen
        spl = tissue == T["spleen"]
        if spl.any():
            Zs = np.broadcast_to((coarse.origin[2] + coarse.spacing[2] * np.arange(coarse.size[2]))[:, None, None], tissue.shape)[spl]
            hu[spl] += rng.uniform(15, 35) * np.sin(Zs / rng.uniform(6, 10) + 4.0 * n_hi[spl])
    del n_hi
    hu_img = coarse.image(hu.astype(np.float32))
    del hu

    # the label grid (canonical order): background, organ fields, scanner
    ct = cg.sample(hu_img, sitk.sitkLinear, -1000.0)
    t3 = time.perf_counter()
    if box is not None:
        lo_i = np.maximum(box[0] - 3, 0)
        hi_i = np.minimum(box[1] + 3, np.asarray(cg.size))
        sub_lab = lab[lo_i[2]:hi_i[2], lo_i[1]:hi_i[1], lo_i[0]:hi_i[0]]
        sub_g = _Geom(hi_i - lo_i, cg.spacing, cg.origin + cg.matrix @ lo_i.astype(float), cg.dir)
        fields = _organ_fields(sub_lab, sub_g, frame, case, rng)
        view = ct[lo_i[2]:hi_i[2], lo_i[1]:hi_i[1], lo_i[0]:hi_i[0]]
        m = sub_lab > 0
        view[m] = fields[m]
        del fields
    t4 = time.perf_counter()

    # noise level per slice from the water-equivalent diameter of the coarse slices
    sc = case["scanner"]
    wed = np.sqrt(np.maximum(((tissue != T["air"]) * (1 + np.clip(case["hu"][tissue], -1000, 2000) / 1000.0)).sum(axis=(1, 2))
                             * coarse.spacing[0] * coarse.spacing[1], 0) * 4 / math.pi)
    sd_coarse = sc["noise_hu"] * np.exp(np.clip(0.5 * 0.019 * (1 - sc["modulation"]) * (wed - 300.0), -1.5, 2.0))
    zc = coarse.origin[2] + coarse.spacing[2] * np.arange(coarse.size[2])
    zi = (cg.origin[2] + cg.matrix[2, 2] * np.arange(cg.size[2]))
    sd_slice = np.interp(zi, zc, sd_coarse).astype(np.float32)
    bone = np.interp(zi, zc, ana["bone_rows"]).astype(np.float32)
    bone = bone / max(float(bone.max()), 1.0)
    # in-plane maps from the middle slice of the canonical grid
    kmid = cg.size[2] // 2
    Xp, Yp, _ = cg.coords((0, 0, kmid), (cg.size[0], cg.size[1], kmid + 1))
    Xp, Yp = Xp[0], Yp[0]
    cent_img = coarse.image(ana["cent"].astype(np.float32))
    cmid = _Geom((cg.size[0], cg.size[1], 1), cg.spacing, cg.origin + cg.matrix @ np.array([0, 0, kmid], float), cg.dir)
    cent2d = cmid.sample(cent_img, sitk.sitkLinear, -1.0)[0]
    air2d = cent2d <= 0
    cent2d = np.clip(cent2d, 0, 1).astype(np.float32)
    streaks = []
    if noise_scale > 0:
        vx, vy = frame.x, ana["y_vb"]
        n_st = sc["streaks"] + (3 if ana["arms"] else 0)
        for i in range(n_st):
            arm = ana["arms"] and i >= sc["streaks"]
            phi = rng.normal(0, 0.08) if arm else rng.choice([rng.normal(0, 0.25), rng.uniform(-1.2, 1.2)])
            nvec = np.array([-math.sin(phi), math.cos(phi)])
            if arm:
                vy2 = vy + rng.uniform(-60, 20)
                dist_line = (Xp - vx) * nvec[0] + (Yp - vy2) * nvec[1]
            else:
                dist_line = (Xp - vx) * nvec[0] + (Yp - vy) * nvec[1]
            along = np.abs((Xp - vx) * nvec[1] - (Yp - vy) * nvec[0])
            w = rng.uniform(1.5, 4.0)
            S = (np.exp(-(dist_line / w) ** 2) * np.exp(-along / rng.uniform(80, 250)) * (cent2d > 0)).astype(np.float32)
            a = (rng.uniform(-45, -20) if arm else rng.uniform(-40, -8) if rng.random() < 0.75 else rng.uniform(8, 25))
            amp_z = (a * noise_scale * (bone if not arm else np.ones_like(bone)) *
                     (0.6 + 0.4 * np.sin(zi / rng.uniform(5, 15) + rng.uniform(0, 6)))).astype(np.float32)
            streaks.append((S, amp_z))
    ct = _scanner(ct, cg, sd_slice, cent2d, air2d, streaks, case, noise_scale, rng)
    np.clip(ct, _HU_MIN, _HU_MAX, out=ct)
    out = canon.back(np.rint(ct).astype(np.int16))
    del ct
    ct_img = sitk.GetImageFromArray(out)
    ct_img.CopyInformation(lab_img)
    t5 = time.perf_counter()
    if cyst_as_label:
        labels_out = sitk.Image(lab_img)
    else:
        labels_out = sitk.ChangeLabel(lab_img, changeMap={CYST: KIDNEY})
    if info is not None:
        info.update(phase=case["phase"], dose=case["dose"], tumor_type=case["tumor"]["type"],
                    necrosis=bool(case["tumor"]["necrosis"]), calcified=bool(case["tumor"]["calcified"]),
                    oral_contrast=case["oral_contrast"], arms=ana["arms"], kernel=sc["kernel"],
                    slice_thickness_mm=round(float(max(cg.spacing[2], 0.8) * sc["thickness"]), 2),
                    noise_hu=round(float(np.median(sd_slice)), 1), scale=round(frame.s, 3),
                    kidneys=[int(k.side) for k in frame.kidneys if not k.virtual],
                    midline_x=round(frame.x, 1), spine_y=round(float(ana["y_vb"]), 1),
                    seconds=round(time.perf_counter() - t0, 2))
    logger.debug("validation phantom %s: frame %.2f s, anatomy %.2f s, texture+resample %.2f s, organs %.2f s, "
                 "scanner %.2f s", lab_img.GetSize(), t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
    return ct_img, labels_out


# ----------------------------------------------------------------------------------------------------------
# the dataset command


def _case_rng(seed: int, number: int) -> np.random.Generator:
    # a stream of its own (the tag keeps it apart from the training phantoms' default_rng([seed, case]))
    return np.random.default_rng([int(seed), int(number), 0x5641_4C49])


def make_validation_case(labels: sitk.Image, case_number: int, seed: int = 0, downsample_inplane: float = 1.0,
                         max_slices: Optional[int] = None, phase: Optional[str] = None, info: Optional[dict] = None):
    """One validation case ``(ct, labels)`` from a label map, deterministic in ``(seed, case_number)``."""
    from .phantom_dataset import reduce_grid  # a generic grid helper (no synthesis in it)

    reduced = reduce_grid(labels, downsample_inplane, max_slices)
    return synthesize_validation_ct(reduced, _case_rng(seed, case_number), phase=phase, info=info)


def make_validation_dataset(labels_dir: Path, out_dir: Path, cases: Optional[Sequence[int]] = None, seed: int = 0,
                            downsample_inplane: float = 1.0, max_slices: Optional[int] = None,
                            phase: Optional[str] = None, overwrite: bool = False,
                            progress: Optional[Callable[[int, int, str], None]] = None) -> dict:
    """Write ``OUT/case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz`` (atomically) for the selected label
    maps and ``validation_phantoms.json``; existing cases are kept unless ``overwrite``. Returns the record."""
    if phase is not None and phase not in PHASES:
        raise InputError(f"--phase must be one of {', '.join(PHASES)}, got {phase!r}")
    sources = list_cases(Path(labels_dir), cases, need_labels=True, image_name=LABELS_NAME)
    out_dir = make_dataset_folder(out_dir)
    options = {"seed": int(seed), "downsample_inplane": float(downsample_inplane), "max_slices": max_slices,
               "phase": phase}
    record_path = out_dir / VALIDATION_JSON
    previous = {}
    if record_path.is_file():
        previous = json.loads(record_path.read_text())
        if not overwrite and previous.get("options") != options:
            raise OutputError(f"{out_dir} holds validation phantoms made with other options {previous.get('options')}; "
                              "choose another --out or pass --overwrite")
    per_case = dict(previous.get("per_case", {})) if not overwrite else {}
    t0 = time.perf_counter()
    for i, case in enumerate(sources):
        folder = out_dir / case.name
        if overwrite or not ((folder / IMAGE_NAME).is_file() and (folder / LABELS_NAME).is_file()):
            info = {}
            ct, labels = make_validation_case(read_labels(case), case.number, seed, downsample_inplane, max_slices,
                                              phase, info)
            write_image_atomic(labels, folder / LABELS_NAME, overwrite=True)
            write_image_atomic(ct, folder / IMAGE_NAME, overwrite=True)
            per_case[case.name] = info
        if progress is not None:
            progress(i + 1, len(sources), case.name)
    done = sorted(p.name for p in out_dir.glob("case_*")
                  if (p / IMAGE_NAME).is_file() and (p / LABELS_NAME).is_file())
    record = {
        "kind": "validation phantoms",
        "never_train": True,
        "note": ("independent validation generator (Training.validation_phantoms); synthetic CT on real label "
                 "maps, not patient images. Never use these cases for training, preprocessing caches or "
                 "fingerprints of a training set."),
        "generator": "Training.validation_phantoms.synthesize_validation_ct",
        "source_labels": str(Path(labels_dir).resolve()),
        "cases": [int(n.split("_")[1]) for n in done],
        "options": options,
        "per_case": {k: per_case[k] for k in sorted(per_case)},
        "licence": ("CC BY-NC-SA 4.0 (derived from the KiTS label maps, Heller et al., arXiv:1904.00445 and "
                    "arXiv:2307.01984)"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    tmp = record_path.with_name(f".{VALIDATION_JSON}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(record_path)
    logger.info("wrote %d validation phantom cases to %s", len(sources), out_dir)
    return record
