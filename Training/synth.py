"""Domain-randomised training data in the style of SynthSeg (Billot et al., "SynthSeg: segmentation of brain MRI
scans of any contrast and resolution without retraining", Medical Image Analysis 2023).

The phantoms of :mod:`Training.phantoms` give every case one fixed intensity model; a network trained on them learns
that model (0.93 kidney Dice on its own phantoms, about 0.35 on real CT). Here the intensity model is drawn anew for
every training patch, so that no intensity, contrast, texture or resolution can be relied on, only shape and context:

1. **Tissue maps** (:func:`tissue_map`, made once per case, stage region and variant by :func:`synth_stage_volumes`): a
   real KiTS label map resampled onto a stage's working grid, its kidneys split into cortex, medulla (pyramids from
   the sinus in most maps), renal sinus fat, collecting system and hilar vessels, its tumors into two enhancement
   compartments, necrosis and calcification, cysts kept, and the abdomen around them from
   :func:`Training.phantom_anatomy.body_tissues` (liver, spleen, bowel with gas and contrast, psoas, spine, ribs,
   aorta / IVC, fat, lung bases, heart), a stomach and a gallbladder (:func:`_stomach_and_gallbladder`) and a pelvis
   below it (:func:`_pelvis`: iliac wings, iliacus, gluteal muscles, sacrum), with focal masses and cysts in the
   liver and spleen (sometimes against a kidney), renal vessels from each hilum to the aorta / IVC, a scanner table
   under the patient and, sometimes, arms beside the body. Stored as int8 tissue ids in the usual cache layout
   (:mod:`Training.preprocess`), so sampling, folds and training are unchanged.
2. **Intensities on the fly** (:class:`TissueSynthesizer`, the ``synthesize`` augmentation key, run first on every
   batch): each tissue's mean HU, spread and texture are drawn per patch, either from a contrast phase's broad
   physiological priors (unenhanced, arterial / corticomedullary, portal-venous / nephrographic, delayed /
   excretory; cortex-medulla contrast from none to strong; tumor from hypo- to hyper-dense against parenchyma) or,
   with ``random_probability``, uniformly over the soft-tissue window for every non-air tissue (SynthSeg's fully
   random contrast); a smooth additive bias field follows. The recipe's ordinary augmentation then adds pose,
   resolution (slice thickness), blur and noise.

Tissue ids <0 or unknown (the sampler's padding) are air. The labels the network learns come from the KiTS label
map, never from the tissue map.
"""

from __future__ import annotations

import json
from enum import IntEnum
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from KidneyTumorSegLib import geometry as geo
from KidneyTumorSegLib.errors import InputError
from KidneyTumorSegLib.labels import CYST, KIDNEY, TUMOR
from KidneyTumorSegLib.stages import StageOutput, stage_regions

from .dataset import LABELS_NAME, case_name, list_cases, read_labels, refuse_validation_only
from .phantom_anatomy import Grid, Tissue, body_tissues, estimate_frame, frame_from_grid, hilum_quadrics, smooth_noise

__all__ = ["SynthTissue", "tissue_map", "synth_stage_volumes", "preprocess_synth", "TissueSynthesizer", "PHASES"]


class SynthTissue(IntEnum):
    """Tissue ids of a synthesis tissue map: :class:`Tissue` (0-15) plus the kidney's parts and the scanner."""

    CORTEX = 16
    MEDULLA = 17
    SINUS_FAT = 18
    COLLECTING = 19
    RENAL_VESSEL = 20
    TUMOR = 21
    TUMOR_B = 22
    NECROSIS = 23
    CALCIFICATION = 24
    CYST = 25
    TABLE = 26
    ARM_MUSCLE = 27
    ARM_BONE = 28
    ORGAN_LESION = 29
    ORGAN_CYST = 30


NUM_TISSUES = 31
_T = {t.name.lower(): int(t) for t in Tissue}
_T.update({t.name.lower(): int(t) for t in SynthTissue})

#: the surroundings a stage can be taught to name (its manifest's ``context_classes``) and their tissues; a focal
#: mass or cyst inside an organ stays background (it is neither the organ's parenchyma nor a kidney lesion)
CONTEXT_TISSUES = {
    "liver": (Tissue.LIVER,),
    "spleen": (Tissue.SPLEEN,),
    "bowel": (Tissue.BOWEL_WALL, Tissue.BOWEL_CONTENT, Tissue.BOWEL_GAS),
    "muscle": (Tissue.MUSCLE, SynthTissue.ARM_MUSCLE),
    "vessels": (Tissue.AORTA, Tissue.IVC),
    "bone": (Tissue.BONE, Tissue.CORTICAL_BONE, Tissue.DISC, SynthTissue.ARM_BONE),
}


def context_tissues(name: str) -> tuple:
    """Tissue ids (ints) of context class ``name`` (one of :data:`CONTEXT_TISSUES`)."""
    if name not in CONTEXT_TISSUES:
        raise InputError(f"unknown context class {name!r}: a synthesis tissue map can label "
                         f"{', '.join(sorted(CONTEXT_TISSUES))}")
    return tuple(int(t) for t in CONTEXT_TISSUES[name])


# ----------------------------------------------------------------------------------------------------------
# tissue maps


def _identity_grid(grid: geo.Grid) -> Grid:
    """The stage grid as a phantom-anatomy grid (needs the identity direction of an axis-aligned canonical frame)."""
    if not np.allclose(np.asarray(grid.direction, float).reshape(3, 3), np.eye(3), atol=1e-6):
        raise InputError("synthesis tissue maps need an axis-aligned scan (a canonical direction equal to the identity); "
                         f"got direction {tuple(round(d, 4) for d in grid.direction)}")
    return Grid(tuple(int(s) for s in grid.size), tuple(float(s) for s in grid.spacing),
                tuple(float(o) for o in grid.origin), tuple(float(d) for d in grid.direction))


def _depth(mask: np.ndarray, grid: Grid) -> np.ndarray:
    """Distance (mm) inside ``mask`` to its surface (negative outside)."""
    img = grid.image(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(img, insideIsPositive=True, squaredDistance=False,
                                                               useImageSpacing=True)).astype(np.float32)


def _kidney_parts(T: np.ndarray, lab: np.ndarray, grid: Grid, frame, rng: np.random.Generator) -> list:
    """Paint cortex / medulla / sinus / collecting system / hilar vessels into ``T`` where ``lab`` is kidney (or cyst,
    whose value is painted later); returns each kidney side's hilum point (LPS mm) for the renal vessels."""
    s = frame.scale
    h = min(grid.spacing)
    tissue = (lab == KIDNEY) | (lab == CYST)
    if not tissue.any():
        return []
    whole = lab > 0
    depth = _depth(whole, grid)
    cortex_mm = rng.uniform(4, 9) * s
    pattern = smooth_noise(grid, max(3.5 * s, h), rng)
    level = rng.uniform(-0.6, 0.0)
    T[tissue] = SynthTissue.CORTEX
    blobs = rng.random() < 0.25  # else medullary pyramids, drawn per kidney below
    if blobs:
        T[tissue & (depth > cortex_mm) & (pattern > level)] = SynthTissue.MEDULLA
    x, y, z = grid.axis_coords()
    fine = smooth_noise(grid, max(1.5 * s, h), rng)
    hila = []
    for side, (hx, hy, hz), semi, q in hilum_quadrics(tissue, x, y, z, frame.x, float(np.prod(grid.spacing)) / 1000.0,
                                                      10.0 * s ** 3, h):
        m = tissue & ((x - frame.x) * side > 0)
        if not blobs:
            T[m & _pyramids(x, y, z, (hx + side * 0.3 * semi[0], hy, hz), semi, pattern, rng)
              & (depth > cortex_mm)] = SynthTissue.MEDULLA
        sinus = m & (q < rng.uniform(0.7, 1.1)) & (depth > 0.8 * cortex_mm)
        T[sinus] = SynthTissue.SINUS_FAT
        T[sinus & (q < rng.uniform(0.15, 0.4))] = SynthTissue.COLLECTING
        T[sinus & (fine > rng.uniform(0.8, 1.4))] = SynthTissue.RENAL_VESSEL
        hila.append(np.array([hx - side * 0.5 * semi[0], hy, hz]))
    return hila


def _pyramids(x, y, z, centre, semi, pattern: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Medullary pyramids of one kidney: 7-13 cones from ``centre`` (LPS mm, near the renal sinus) along random
    directions in the kidney's own proportions (``semi``: its semi-axes, mm), their edges roughened by ``pattern``
    (smooth noise on the grid). Returns a bool (z, y, x) mask; the caller keeps it below the cortex.

    Real medulla is a set of cones whose bases face the cortex and whose tips point at the sinus, separated by
    cortical columns; a network shown only irregular medullary blobs takes a real kidney's pyramids, or a round
    tumor, for the other (why the blob pattern is kept for a quarter of the maps only)."""
    u = [(x - centre[0]) / semi[0], (y - centre[1]) / semi[1], (z - centre[2]) / semi[2]]
    norm = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) + 1e-6
    n = int(rng.integers(7, 14))
    axes = rng.standard_normal((n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    cos_nearest = np.full(norm.shape, -1.0, np.float32)
    for a in axes:
        np.maximum(cos_nearest, (u[0] * a[0] + u[1] * a[1] + u[2] * a[2]) / norm, out=cos_nearest)
    half_angle = np.radians(rng.uniform(22.0, 34.0))
    return cos_nearest + 0.04 * pattern > np.cos(half_angle)


def _tumor_parts(T: np.ndarray, lab: np.ndarray, grid: Grid, frame, rng: np.random.Generator) -> None:
    m = lab == TUMOR
    if not m.any():
        return
    s, h = frame.scale, min(grid.spacing)
    T[m] = SynthTissue.TUMOR
    het = smooth_noise(grid, max(rng.uniform(4, 10) * s, h), rng)
    T[m & (het > rng.uniform(-0.5, 1.5))] = SynthTissue.TUMOR_B
    if rng.random() < 0.4:
        depth = _depth(m, grid)
        deepest = float(depth.max())
        if deepest > 6.0 * s:
            T[m & (depth + 2.0 * s * het > rng.uniform(0.35, 0.65) * deepest)] = SynthTissue.NECROSIS
    if rng.random() < 0.08:
        spots = smooth_noise(grid, max(1.5 * s, h), rng)
        T[m & (spots > 2.3)] = SynthTissue.CALCIFICATION


def _tube(T: np.ndarray, grid: Grid, a: np.ndarray, b: np.ndarray, radius: float, value: int, where: np.ndarray) -> None:
    """Paint the segment a-b (LPS mm) of ``radius`` mm as ``value`` where ``where`` allows."""
    x, y, z = grid.axis_coords()
    d = b - a
    L2 = float(d @ d)
    if L2 < 1e-6:
        return
    t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / L2, 0.0, 1.0)
    dist2 = (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2
    T[(dist2 <= radius ** 2) & where] = value


def _vessels(T: np.ndarray, grid: Grid, hila: list, frame, rng: np.random.Generator) -> None:
    """Renal artery (to the aorta) and vein (to the IVC) from each hilum, through fat only."""
    soft = np.isin(T, (Tissue.FAT, Tissue.BOWEL_WALL, Tissue.MUSCLE))
    for p in hila:
        for target, tissue, r in (("aorta", Tissue.AORTA, rng.uniform(2.0, 3.5)), ("ivc", Tissue.IVC, rng.uniform(3.0, 5.5))):
            where = T == tissue
            if not where.any():
                continue
            x, y, z = grid.axis_coords()
            k = int(np.clip(round((p[2] - grid.origin[2]) / grid.spacing[2]), 0, grid.size[2] - 1))
            sl = where[k]
            if not sl.any():
                continue
            jj, ii = np.nonzero(sl)
            q = np.array([float(x[0, 0, ii].mean()), float(y[0, jj, 0].mean()), p[2] + rng.normal(0, 5)])
            _tube(T, grid, p, q, r * frame.scale ** 0.5, int(tissue), soft | (T == SynthTissue.SINUS_FAT))


def _table_and_arms(T: np.ndarray, grid: Grid, frame, rng: np.random.Generator) -> None:
    """A curved scanner table posterior of the body and, in 30 % of maps, arms beside the body."""
    body = T != Tissue.AIR
    if not body.any():
        return
    x, y, z = grid.axis_coords()
    back = float(y[0, :, 0][np.nonzero(body.any(axis=(0, 2)))[0].max()])  # most posterior body point
    gap, thick, width = rng.uniform(0, 30), rng.uniform(4, 15), rng.uniform(180, 260) * frame.scale
    curve = rng.uniform(0.0, 0.002)
    dx = x - frame.x
    top = back + gap + curve * dx ** 2 * -1.0
    table = (y >= top) & (y <= top + thick) & (np.abs(dx) <= width) & (T == Tissue.AIR)
    T[np.broadcast_to(table, T.shape)] = SynthTissue.TABLE
    if rng.random() < 0.3:
        s = frame.scale
        half_width = float(np.abs(x[0, 0, :][np.nonzero(body.any(axis=(0, 1)))[0]] - frame.x).max())
        yc = frame.y + rng.normal(0, 20) * s
        for side in (1.0, -1.0):
            cx = frame.x + side * (half_width + rng.uniform(15, 50) * s)
            a, b = rng.uniform(35, 50) * s, rng.uniform(35, 50) * s
            arm = ((x - cx) / a) ** 2 + ((y - yc) / b) ** 2 <= 1.0
            bone = ((x - cx) / (0.25 * a)) ** 2 + ((y - yc) / (0.25 * b)) ** 2 <= 1.0
            fat = arm & ~(((x - cx) / (0.8 * a)) ** 2 + ((y - yc) / (0.8 * b)) ** 2 <= 1.0)
            free = T == Tissue.AIR
            T[np.broadcast_to(arm, T.shape) & free] = SynthTissue.ARM_MUSCLE
            T[np.broadcast_to(fat, T.shape) & free] = Tissue.FAT
            T[np.broadcast_to(bone, T.shape) & free] = SynthTissue.ARM_BONE


#: what an organ added to the body map may push aside: fat, muscle and bowel (never bone, vessels or organs)
_DISPLACEABLE = (Tissue.FAT, Tissue.MUSCLE, Tissue.BOWEL_WALL, Tissue.BOWEL_CONTENT, Tissue.BOWEL_GAS)


def _pelvis(T: np.ndarray, grid: Grid, frame, rng: np.random.Generator) -> None:
    """Paint a pelvis into ``T`` below the iliac crests (80-130 mm below the kidneys' mean level at adult scale): per
    side an iliac wing (a 5-9 mm bone plate, cortical shell and marrow, curving from the sacrum laterally and
    forwards, concave towards the abdomen), the iliacus muscle lining its inner face, the gluteal muscles its outer
    face, and from 15-40 mm below the crests a sacrum between the wings. The muscles go over fat, muscle and bowel
    only; bone goes over anything but air (where a wing crosses a vessel, the bone wins: rare, and both are real).

    Real abdominal CT, and the KiTS grids these maps are made on, reach into the pelvis; without one here the body
    below the kidneys is fat and bowel only, and a network that never saw an iliac wing calls the muscle inside its
    curve kidney (the validation generator's case 400, both coarse stages trained with context classes,
    2026-12-02)."""
    s, u = frame.scale, rng.uniform
    crest, height = -u(80, 130), u(90, 140)
    cx, cy, a, b = u(35, 50), u(5, 25), u(50, 70), u(45, 65)
    plate, iliacus, gluteal = u(5, 9), u(12, 28), u(20, 45)
    th_back, th_front = np.radians(u(100, 120)), -np.radians(u(40, 70))
    sacrum_from, sacrum_a, sacrum_b = u(15, 40), u(38, 50), u(15, 22)
    x, y, z = grid.axis_coords()
    X, Y, Z = (x[0] - frame.x) / s, (y[0] - frame.y) / s, (z[:, 0, 0] - frame.z) / s  # (1, nx), (ny, 1), (nz,)
    levels = np.flatnonzero((Z <= crest) & (Z >= crest - height))
    bone = np.isin(T, (Tissue.BONE, Tissue.CORTICAL_BONE)) & (np.abs(X) < 25.0)[None]
    if not levels.size or not bone.any():
        return
    spine_y = float(np.median(np.broadcast_to(Y[None], T.shape)[bone]))  # vertebral bodies: where the sacrum goes
    for k in levels:
        below = float(crest - Z[k])
        f = 0.8 + 0.2 * min(below / 30.0, 1.0)  # the wings flare out below the crest
        sl = T[k]
        free = np.isin(sl, _DISPLACEABLE)
        for side in (1.0, -1.0):
            p, q = (side * X - cx) / (a * f), (Y - (spine_y - cy)) / (b * f)
            arc = np.arctan2(q, p)
            arc = (arc <= th_back) & (arc >= th_front)
            mm = (np.sqrt(p ** 2 + q ** 2) - 1.0) * min(a, b) * f  # about mm outwards from the plate's middle
            sl[arc & free & (mm > plate / 2) & (mm <= plate / 2 + gluteal)] = Tissue.MUSCLE
            sl[arc & free & (mm < -plate / 2) & (mm >= -plate / 2 - iliacus)] = Tissue.MUSCLE
            sl[arc & (np.abs(mm) <= plate / 2) & (sl != Tissue.AIR)] = Tissue.CORTICAL_BONE
            sl[arc & (np.abs(mm) <= plate / 2 - 2.0) & (sl != Tissue.AIR)] = Tissue.BONE
        if below >= sacrum_from:
            sacrum = ((X / sacrum_a) ** 2 + ((Y - spine_y - 5.0) / sacrum_b) ** 2 <= 1.0) & (sl != Tissue.AIR)
            sl[sacrum] = Tissue.CORTICAL_BONE
            sl[sacrum & ((X / (sacrum_a - 2.5)) ** 2 + ((Y - spine_y - 5.0) / (sacrum_b - 2.5)) ** 2 <= 1.0)] = Tissue.BONE


def _stomach_and_gallbladder(T: np.ndarray, grid: Grid, frame, rng: np.random.Generator) -> None:
    """Paint a stomach and, in 70 % of maps, a gallbladder into ``T`` (adult mm around the kidneys' mean position,
    scaled by ``frame.scale``). The stomach: a sac in the left upper quadrant anterior of the spleen and the left
    kidney, its long axis running down and towards the midline, a 3-6 mm wall (bowel wall) around fluid or food
    (bowel content) and, in 70 % of maps, gas above an air-fluid level (anterior: the patient is supine); it is
    bowel to a network that names the bowel. The gallbladder: a fluid-filled ellipsoid under the liver, anterior
    of the right kidney (fluid like an organ cyst; background). Both go over fat, bowel and muscle only; the
    stomach also yields to the liver and spleen, the gallbladder lies in the liver's fossa.

    Real CT has both beside the kidneys; without them a network meets a round fluid-filled organ next to the left
    kidney for the first time in a patient and calls it kidney or tumor (the validation generator's case 401: networks
    trained on these maps without a stomach took its stomach for the left kidney and its tumor, 2026-12-02)."""
    s, u = frame.scale, rng.uniform
    x, y, z = grid.axis_coords()
    X, Y, Z = (x - frame.x) / s, (y - frame.y) / s, (z - frame.z) / s
    size = u(0.6, 1.2)
    top, a, b, c = u(60, 110), u(35, 60) * size, u(25, 45) * size, u(50, 90) * size
    x0, y0, slope = u(35, 60), -u(35, 60), u(0.3, 0.8)
    wall, gas, level = u(3, 6), rng.random() < 0.7, u(0.2, 0.6)
    zc = top - c
    cx = x0 - slope * np.maximum(zc - Z, 0.0)  # the antrum turns towards the midline below the body of the stomach
    q = ((X - cx) / a) ** 2 + ((Y - y0) / b) ** 2 + ((Z - zc) / c) ** 2
    rough = smooth_noise(grid, max(6.0 * s, min(grid.spacing)), rng)
    sac = q + 0.1 * rough <= 1.0
    if sac.any():
        free = np.isin(T, _DISPLACEABLE)
        inner = (np.sqrt(np.maximum(q, 0.0)) + 0.1 * rough) * min(a, b) <= min(a, b) - wall
        T[sac & free] = Tissue.BOWEL_WALL
        T[sac & inner & free] = Tissue.BOWEL_CONTENT
        if gas:
            T[sac & inner & free & (Y < y0 - b + 2.0 * level * b)] = Tissue.BOWEL_GAS
    if rng.random() < 0.7:
        gx, gy, gz = -u(40, 70), -u(25, 55), u(5, 40)
        ga, gb, gc = u(12, 20), u(12, 20), u(25, 45)
        gb_mask = ((X - gx) / ga) ** 2 + ((Y - gy) / gb) ** 2 + ((Z - gz) / gc) ** 2 <= 1.0
        T[gb_mask & np.isin(T, _DISPLACEABLE + (Tissue.LIVER,))] = SynthTissue.ORGAN_CYST


def _organ_lesions(T: np.ndarray, fg: np.ndarray, grid: Grid, frame, rng: np.random.Generator) -> None:
    """Focal masses and cysts in the liver and spleen (background to the network), in 60 % of maps: 1-5 roughened
    ellipsoids of 4-70 mm radius (log-uniform: most are small, some are the 10-14 cm masses of real livers), half of
    the time one of them centred on the organ's border with a kidney (``fg``).

    Incidental liver cysts, haemangiomas and metastases are common in abdominal CT; a network that never saw a mass
    outside the kidney calls the first one beside a kidney renal tumor (a hypodense liver mass over the right
    kidney's upper pole of a real venous-phase CT, 183 mL of it, 2026-12-02; with masses of at most 35 mm radius the
    coarse stage still took a hypodense liver mass larger than that, over the same kidney, for kidney)."""
    if rng.random() >= 0.6:
        return
    s = frame.scale
    x, y, z = grid.axis_coords()
    organ = np.isin(T, (Tissue.LIVER, Tissue.SPLEEN))
    if not organ.any():
        return
    near_kidney = organ & (_depth(~fg, grid) <= 15.0) if fg.any() else np.zeros_like(organ)
    rough = smooth_noise(grid, max(4.0 * s, min(grid.spacing)), rng)
    for i in range(int(rng.integers(1, 6))):
        pool = near_kidney if (i == 0 and near_kidney.any() and rng.random() < 0.5) else organ
        idx = np.flatnonzero(pool)
        k = np.unravel_index(int(idx[rng.integers(len(idx))]), T.shape)
        c = (float(x[0, 0, k[2]]), float(y[0, k[1], 0]), float(z[k[0], 0, 0]))
        r = float(np.exp(rng.uniform(np.log(4.0), np.log(70.0)))) * s * rng.uniform(0.75, 1.25, 3)
        q = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2
        tissue = SynthTissue.ORGAN_CYST if rng.random() < 0.35 else SynthTissue.ORGAN_LESION
        # a mass grows within its organ but may bulge a little beyond it; it never covers bone, air or the kidney
        T[(q + 0.15 * rough < 1.0) & (organ | ((q < 0.8) & np.isin(T, (Tissue.FAT, Tissue.MUSCLE))))] = tissue


def tissue_map(labels: np.ndarray, grid: Grid, frame, rng: np.random.Generator) -> np.ndarray:
    """Tissue ids (int8, array (z, y, x)) for ``labels`` (uint8 KiTS labels on ``grid``, an identity-direction grid
    in LPS mm) with the body of ``frame`` around them (see the module text)."""
    T = body_tissues(grid, frame, rng).astype(np.int8)
    _pelvis(T, grid, frame, rng)
    _stomach_and_gallbladder(T, grid, frame, rng)
    fg = labels > 0
    _organ_lesions(T, fg, grid, frame, rng)
    T[fg] = Tissue.FAT  # what the labels do not cover inside their box stays fat
    hila = _kidney_parts(T, labels, grid, frame, rng)
    _tumor_parts(T, labels, grid, frame, rng)
    T[labels == CYST] = SynthTissue.CYST
    # perirenal fat between the kidney and its neighbours in some maps only: in real CT the liver, spleen, bowel and
    # psoas often touch the kidney directly, and a network that never saw such contact calls every bright neighbour
    # that touches a kidney "tumor" (the liver over the right kidney of a real venous-phase CT, 2026-12-02)
    rim = 0.0 if rng.random() < 0.6 else rng.uniform(1.0, 4.0)
    if fg.any() and rim > 0:
        near = _depth(~fg, grid)
        T[(near > 0) & (near <= rim) & ~np.isin(T, (Tissue.AIR, Tissue.LUNG, Tissue.BONE, Tissue.CORTICAL_BONE))] = Tissue.FAT
    _vessels(T, grid, hila, frame, rng)
    _table_and_arms(T, grid, frame, rng)
    return T


def synth_stage_volumes(stage_manifest: dict, labels: sitk.Image, frame, rng: np.random.Generator
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Training volumes of one case for one stage: ``[(tissue ids int8 [1, z, y, x], target uint8 [z, y, x])]``,
    one per region of :func:`KidneyTumorSegLib.pipeline.stage_regions` with the truth as the previous result (as
    :func:`Training.preprocess.stage_volumes` does for CT), on the stage's canonical working grid."""
    from .preprocess import _stage_and_manifest, class_lookup

    _refuse_cascade(stage_manifest)
    stage, _ = _stage_and_manifest(stage_manifest)
    spacing = geo.stage_spacing(labels, stage.spacing_mm)
    truth = StageOutput(labels)
    boxes = stage_regions(stage, labels, truth if stage.region.kind != "whole" else None, spacing)
    canonical, _, _ = geo.canonical_axes(labels.GetDirection())
    lookup = class_lookup(list(stage.classes))
    out = []
    for box in boxes:
        grid = geo.grid_for_box(box, spacing, canonical)
        lab = sitk.GetArrayFromImage(geo.resample(labels, grid, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
        T = tissue_map(lab, _identity_grid(grid), frame, rng)
        out.append((T[None], lookup[lab]))
    return out


def _refuse_cascade(stage_manifest: dict) -> None:
    """A synthesis cache holds one channel of tissue ids that the synthesizer turns into CT per patch; a cascade's
    prior channels (``prior_from``) would have to ride along untouched, which that path does not do."""
    prior = (stage_manifest.get("inputs") or {}).get("prior_from")
    if prior:
        raise InputError(f"stage {stage_manifest['name']!r} is a cascade (prior_from {prior!r}): a synthesis cache holds "
                         "tissue ids only, not prior channels; preprocess it from CT or phantom images instead")


def case_frame(labels: sitk.Image):
    """The body frame (midline, kidneys' level, anatomy scale) of a label map, from its labels on a 4 mm grid."""
    full = Grid.of(labels)
    corners = full.corners()
    coarse = Grid.aligned(corners.min(0), corners.max(0), 4.0)
    kid = coarse.resample(labels, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(kid)):
        return frame_from_grid(full)
    return estimate_frame(kid, full)


def preprocess_synth(cache_root: Path, stage_manifests: Sequence[dict], labels_dir: Path, cases: Optional[Sequence[int]],
                     variants: int = 2, seed: int = 0, progress: Optional[Callable[[int, int, str], None]] = None,
                     workers: int = 0) -> dict:
    """A preprocessing cache of synthesis tissue maps: for every case of ``labels_dir`` (KiTS layout, label maps only)
    and each of ``variants`` random bodies, each stage's volumes (:func:`synth_stage_volumes`), in the layout of
    :class:`Training.preprocess.Cache` (records of one case's variants share its case number, so they form one
    sampling unit and one fold member). Cases already there are kept. ``workers`` > 1 synthesizes that many cases
    at once in separate processes; every case's random bodies are seeded by (seed, case, variant, stage), so the
    cache is the same with any number of workers. Returns ``{spec folder: volumes}``."""
    from .preprocess import Cache, SpecFolder, input_spec, spec_key

    if variants < 1:
        raise InputError(f"--variants must be >= 1, got {variants}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InputError(f"--workers must be an integer >= 0, got {workers!r}")
    refuse_validation_only(Path(labels_dir))
    listed = list_cases(Path(labels_dir), cases, image_name=LABELS_NAME)
    cache = Cache(Path(cache_root))
    numbers = [c.number for c in listed]
    if cache.exists():
        meta = cache.meta()
        if not meta.get("synthetic") or Path(meta["dataset"]).resolve() != Path(labels_dir).resolve() \
                or meta["cases"] != numbers:
            raise InputError(f"{cache.root} already holds another cache ({meta['dataset']}, {len(meta['cases'])} cases)")
    else:
        meta = {"dataset": str(Path(labels_dir).resolve()), "cases": numbers, "specs": {},
                "fingerprint": {"has_cyst": True, "source": "synthesis tissue maps of KiTS label maps"},
                "synthetic": {"kind": "synthseg_tissue_maps", "variants": int(variants), "seed": int(seed),
                              "num_tissues": NUM_TISSUES}}
        cache.write_meta(meta)
    specs = {}
    for m in stage_manifests:
        _refuse_cascade(m)
        specs.setdefault(spec_key(m), m)
    folders = {key: SpecFolder(cache.root / key) for key in specs}
    indexes = {}
    for key, folder in folders.items():
        folder.path.mkdir(parents=True, exist_ok=True)
        indexes[key] = folder.index() or {"spec": input_spec(specs[key]), "cases": {}, "augmented": []}
    jobs = []
    for case in listed:
        todo = [k for k in specs if case_name(case.number) not in indexes[k]["cases"]]
        if todo:
            jobs.append((case, {k: specs[k] for k in todo}, {k: str(folders[k].path) for k in todo}, variants, seed))
    done = len(listed) - len(jobs)
    for name, records in _synthesized(jobs, workers):
        # only this process writes the indexes: a case is in them once all its files are written
        for key, case_records in records.items():
            # cases in number order, whatever order they finish in, so the index is the same with any workers
            indexes[key]["cases"] = dict(sorted({**indexes[key]["cases"], name: case_records}.items()))
            folders[key].write_index(indexes[key])
        done += 1
        if progress is not None:
            progress(done, len(listed), name)
    meta = cache.meta()
    for key, m in specs.items():
        meta["specs"][key] = input_spec(m)
    cache.write_meta(meta)
    return {key: len(cache.records(m)) for key, m in specs.items()}


def _synthesized(jobs: list, workers: int):
    """``(case name, {spec folder: records})`` of each job of :func:`preprocess_synth`, in this process or in
    ``workers`` spawned ones (each with one ITK thread, so they do not oversubscribe the cores)."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _synthesize_case(*job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_single_threaded) as pool:
        futures = [pool.submit(_synthesize_case, *job) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _single_threaded() -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    torch.set_num_threads(1)


def _synthesize_case(case, specs: dict, paths: dict, variants: int, seed: int) -> tuple:
    """One case's volumes for each spec folder of ``specs`` (``paths``: the folders), written there; returns
    ``(case name, {spec folder: its index records})``."""
    from .preprocess import _where

    name = case_name(case.number)
    labels = read_labels(case)
    frame = case_frame(labels)
    out = {}
    for key, spec in specs.items():
        path = Path(paths[key])
        records = []
        num_classes = len(spec["classes"])
        for v in range(variants):
            rng = np.random.default_rng([int(seed), int(case.number), v, int(key.rsplit("-", 1)[1], 16) % 100003])
            for r, (tissues, target) in enumerate(synth_stage_volumes(spec, labels, frame, rng)):
                stem = f"{name}_v{v}_r{r}"
                np.save(path / f"{stem}_image.npy", tissues)
                np.save(path / f"{stem}_target.npy", target)
                np.savez(path / f"{stem}_where.npz", **_where(target, num_classes, rng))
                records.append({"case": int(case.number), "region": r, "stem": stem, "shape": list(target.shape),
                                "channels": 1, "variant": v,
                                "class_voxels": [int(c) for c in np.bincount(target.ravel(), minlength=num_classes)],
                                "info": {"has_cyst": bool((target == 3).any())}, "augmented_from": None})
        out[key] = records
    return name, out


# ----------------------------------------------------------------------------------------------------------
# intensities on the fly

#: per contrast phase, (low, high) HU of each tissue's mean; tissues missing from a phase take ``_COMMON``
_COMMON = {"air": (-1010, -980), "fat": (-125, -75), "muscle": (35, 70), "lung": (-900, -750), "bowel_gas": (-1010, -900),
           "bone": (130, 350), "cortical_bone": (450, 1100), "disc": (60, 110), "csf": (0, 20), "sinus_fat": (-110, -30),
           "cyst": (-5, 20), "calcification": (300, 900), "table": (-600, 300), "arm_muscle": (35, 70),
           "arm_bone": (400, 1100), "necrosis": (5, 35), "bowel_content": (0, 40),
           "organ_cyst": (-5, 20)}
PHASES = {
    "unenhanced": {"cortex": (20, 45), "medulla": (20, 45), "collecting": (0, 20), "renal_vessel": (30, 55),
                   "tumor": (15, 60), "tumor_b": (15, 60), "liver": (45, 75), "spleen": (40, 60), "heart": (30, 55),
                   "aorta": (30, 55), "ivc": (30, 55), "bowel_wall": (30, 55),
                   "organ_lesion": (15, 55)},
    "arterial": {"cortex": (140, 320), "medulla": (50, 130), "collecting": (0, 25), "renal_vessel": (200, 450),
                 "tumor": (40, 280), "tumor_b": (30, 200), "liver": (55, 95), "spleen": (80, 180), "heart": (180, 400),
                 "aorta": (200, 450), "ivc": (50, 150), "bowel_wall": (60, 130),
                 "organ_lesion": (30, 220)},
    "venous": {"cortex": (130, 240), "medulla": (110, 230), "collecting": (0, 30), "renal_vessel": (130, 240),
               "tumor": (40, 200), "tumor_b": (30, 170), "liver": (90, 150), "spleen": (95, 150), "heart": (120, 220),
               "aorta": (130, 230), "ivc": (110, 210), "bowel_wall": (60, 120),
               "organ_lesion": (25, 130)},
    "delayed": {"cortex": (80, 160), "medulla": (90, 170), "collecting": (200, 1200), "renal_vessel": (70, 140),
                "tumor": (35, 130), "tumor_b": (30, 120), "liver": (70, 115), "spleen": (70, 110), "heart": (70, 130),
                "aorta": (70, 140), "ivc": (70, 140), "bowel_wall": (50, 100),
                "organ_lesion": (25, 120)},
}
#: texture amplitude (HU, the largest sd drawn) per tissue; unlisted tissues 15
_TEXTURE = {"air": 3, "lung": 40, "bowel_gas": 20, "bone": 60, "cortical_bone": 120, "arm_bone": 100, "calcification": 100,
            "collecting": 40, "bowel_content": 30, "tumor": 30, "tumor_b": 30, "table": 60,
            "organ_lesion": 30, "organ_cyst": 5}
#: tissues that stay dark (air-filled) in the random mode too: the one intensity fact every CT shares
_DARK = ("air", "lung", "bowel_gas")
_NAMES = sorted(_T, key=lambda k: _T[k])


def _prior_table(phase: str) -> torch.Tensor:
    table = torch.zeros(NUM_TISSUES, 2)
    priors = dict(_COMMON, **PHASES[phase])
    for name, value in _T.items():
        table[value] = torch.tensor(priors.get(name, _COMMON.get(name, (40.0, 60.0))), dtype=torch.float32)
    return table


#: largest distance (HU) of an iso-enhancing tumor part from its cortex (``iso_part_probability``)
ISO_PART_HU = 15.0


class TissueSynthesizer:
    """Maps tissue-id patches ``x [B, 1, *S]`` to normalised CT patches (see the module text).

    ``spec`` (the recipe's ``synthesize`` augmentation block): ``random_probability`` (fully random contrast, default
    0.35), ``phases`` (the phase names to draw from, default all four), ``random_hu`` [low, high] (range of the random
    mode, default [-150, 450]), ``texture_scale`` (multiplies the texture amplitudes, default 1), ``bias_hu`` (largest
    bias-field amplitude, default 30), ``lesion_contrast_hu`` (default 0: off): tumor and cyst means at least this far
    from each kidney parenchyma mean (moved to the nearest value that is, where they are closer; between a cortex and
    a medulla that differ by more than twice this is allowed) — a lesion the network is
    taught to find must be visible, or it learns to invent lesions in homogeneous kidneys; ``medulla_contrast_hu``
    (default: ``lesion_contrast_hu``) is the distance kept from the medulla alone: smaller, a lesion may share the
    medulla's density and must be told from the pyramids by its shape (rendered and real tumors do);
    ``iso_part_probability`` (default 0: off) is the chance that a patch's second tumor part takes its cortex's
    density (within ``ISO_PART_HU``) after that rule: clear-cell carcinomas enhance like cortex in parts, and a
    network never shown such a part calls it kidney and keeps only the tumor's dark core (measured on rendered
    phantoms, 2026-12-02); the first part stays visible, so the tumor is still there to be found.
    ``window``: the stage normalisation's (low, high, center, scale).
    """

    KEYS = {"random_probability", "phases", "random_hu", "texture_scale", "bias_hu", "lesion_contrast_hu",
            "medulla_contrast_hu", "iso_part_probability"}

    def __init__(self, spec: dict, window: Sequence[float]):
        unknown = set(spec) - self.KEYS
        if unknown:
            raise ValueError(f"unknown synthesize key(s) {sorted(unknown)}; valid: {sorted(self.KEYS)}")
        self.random_probability = float(spec.get("random_probability", 0.35))
        self.phases = list(spec.get("phases", list(PHASES)))
        bad = [p for p in self.phases if p not in PHASES]
        if bad or not self.phases:
            raise ValueError(f"synthesize.phases must name some of {list(PHASES)}, got {self.phases}")
        self.random_hu = tuple(float(v) for v in spec.get("random_hu", (-150.0, 450.0)))
        self.texture_scale = float(spec.get("texture_scale", 1.0))
        self.bias_hu = float(spec.get("bias_hu", 30.0))
        self.lesion_contrast_hu = float(spec.get("lesion_contrast_hu", 0.0))
        self.medulla_contrast_hu = float(spec.get("medulla_contrast_hu", self.lesion_contrast_hu))
        if not 0.0 <= self.medulla_contrast_hu <= max(self.lesion_contrast_hu, 0.0):
            raise ValueError("synthesize.medulla_contrast_hu must be between 0 and lesion_contrast_hu, got "
                             f"{self.medulla_contrast_hu}")
        self.iso_part_probability = float(spec.get("iso_part_probability", 0.0))
        if not 0.0 <= self.iso_part_probability <= 1.0:
            raise ValueError(f"synthesize.iso_part_probability must be in [0, 1], got {self.iso_part_probability}")
        self.low, self.high, self.center, self.scale = (float(v) for v in window)
        self.priors = {p: _prior_table(p) for p in PHASES}
        self.amp = torch.tensor([float(_TEXTURE.get(n, 15)) for n in _NAMES]) * self.texture_scale
        self.dark = torch.tensor([n in _DARK for n in _NAMES])

    def means(self, generator: torch.Generator) -> tuple[torch.Tensor, str]:
        """One patch's tissue means (HU, [NUM_TISSUES]) and the mode they came from (a phase name or ``random``)."""
        r = torch.rand(3, generator=generator)
        if float(r[0]) < self.random_probability:
            lo, hi = self.random_hu
            mu = lo + (hi - lo) * torch.rand(NUM_TISSUES, generator=generator)
            dark = self.priors["venous"][:, 0] + (self.priors["venous"][:, 1] - self.priors["venous"][:, 0]) * torch.rand(
                NUM_TISSUES, generator=generator)
            mu = torch.where(self.dark, dark, mu)
            return self._iso_part(self._visible_lesions(mu), float(r[2]), generator), "random"
        phase = self.phases[min(int(float(r[1]) * len(self.phases)), len(self.phases) - 1)]
        t = self.priors[phase]
        mu = t[:, 0] + (t[:, 1] - t[:, 0]) * torch.rand(NUM_TISSUES, generator=generator)
        return self._iso_part(self._visible_lesions(mu), float(r[2]), generator), phase

    def _iso_part(self, mu: torch.Tensor, draw: float, generator: torch.Generator) -> torch.Tensor:
        # draws from the generator only when the option is on, so recipes without it keep their exact streams
        if draw >= self.iso_part_probability:
            return mu
        mu = mu.clone()
        offset = (2.0 * float(torch.rand(1, generator=generator)) - 1.0) * ISO_PART_HU
        mu[SynthTissue.TUMOR_B] = mu[SynthTissue.CORTEX] + offset
        return mu

    def _visible_lesions(self, mu: torch.Tensor) -> torch.Tensor:
        c = self.lesion_contrast_hu
        if c <= 0:
            return mu
        mu = mu.clone()
        # (mean, the distance a lesion keeps from it) per parenchyma
        parenchyma = ((float(mu[SynthTissue.CORTEX]), c), (float(mu[SynthTissue.MEDULLA]), self.medulla_contrast_hu))
        # each parenchyma mean excludes its own band only: a lesion between a bright cortex and a dark medulla (an
        # arterial-phase carcinoma) is visible and real, and excluding the whole span taught the network that
        # anything of intermediate density inside a kidney is kidney
        admissible = [e for k, ck in parenchyma for e in (k - ck, k + ck)
                      if all(abs(e - j) >= cj - 1e-3 for j, cj in parenchyma)]
        for t in (SynthTissue.TUMOR, SynthTissue.TUMOR_B, SynthTissue.CYST):
            v = float(mu[t])
            if any(abs(v - k) < ck for k, ck in parenchyma):  # too close: move to the nearest admissible value
                mu[t] = min(admissible, key=lambda e: abs(e - v))
        return mu

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Normalised intensities ``[B, 1, *S]`` (float32) for tissue ids ``x [B, 1, *S]``."""
        ids = x.round().long()
        ids = torch.where((ids < 0) | (ids >= NUM_TISSUES), torch.zeros_like(ids), ids)
        shape = tuple(x.shape[2:])
        dims = len(shape)
        mode = "trilinear" if dims == 3 else "bilinear"
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for i in range(x.shape[0]):
            mu, _ = self.means(generator)
            amp1 = self.amp * torch.rand(NUM_TISSUES, generator=generator)
            amp2 = self.amp * torch.rand(NUM_TISSUES, generator=generator) * 0.7
            coarse = [max(2, n // 8) for n in shape]
            fine = [max(2, n // 2) for n in shape]
            f1 = F.interpolate(torch.randn((1, 1, *coarse), generator=generator), size=shape, mode=mode, align_corners=False)
            f2 = F.interpolate(torch.randn((1, 1, *fine), generator=generator), size=shape, mode=mode, align_corners=False)
            bias = F.interpolate(torch.randn((1, 1, *([3] * dims)), generator=generator), size=shape, mode=mode,
                                 align_corners=True)
            b_amp = self.bias_hu * float(torch.rand(1, generator=generator))
            t = ids[i, 0].cpu()
            hu = mu[t] + amp1[t] * f1[0, 0] / 0.6 + amp2[t] * f2[0, 0] / 0.6 + b_amp * bias[0, 0]
            out[i, 0] = ((hu.clamp(self.low, self.high) - self.center) / self.scale).to(x.device)
        return out


def synth_cache_options(cache_root: Path) -> Optional[dict]:
    """The ``synthetic`` entry of a cache's ``cache.json`` (None for a cache of CT images)."""
    p = Path(cache_root) / "cache.json"
    return json.loads(p.read_text()).get("synthetic") if p.is_file() else None
