"""The contract between training and inference for one stage: what a stage runs on, what it is fed,
and how it predicts.

Both sides use these functions, so a network is trained and validated on exactly what inference
gives it (``Training.preprocess`` builds its volumes with :func:`stage_regions` and
:func:`stage_input_channels`, regions taken from the truth; ``Training.trainer`` validates with
:func:`stage_predictor` and :func:`predict_stage`; :class:`~KidneyTumorSegLib.pipeline.Segmenter`
runs all of them):

* :func:`stage_regions` - the boxes (canonical frame, mm) a stage runs on, from the previous result;
* :func:`stage_input_channels` - the network input on a box's working grid, float32 ``[C, z, y, x]``;
* :func:`stage_predictor` - the stage's networks with its test-time mirroring (or none);
* :func:`predict_stage` - the sliding window over that input, as the stage's manifest entry says
  (patch, overlap, batch size, window margin, padding with normalised air): class probabilities
  float32 ``[K, z, y, x]`` on the same grid; :func:`stage_labels` turns them into label values.

Array axes are (z, y, x) (numpy order of the working grid); manifest triples are (x, y, z).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from . import geometry as geo
from .anatomy import Landmarks, estimate_landmarks, judge_components, verdict_notes
from .labels import LABEL_VALUES, connected_components, voxel_volume_mm3
from .manifest import ModelManifest, StageSpec

logger = logging.getLogger(__name__)

#: HU of air: what the CT is padded with outside the scan (resampling) and, normalised, what windows are padded with
AIR_HU = -1024.0


def pad_value(stage: StageSpec) -> float:
    """Normalised air for ``stage``: the value its network inputs are padded with (windows, training patches)."""
    return float(stage.normalization.normalized_value(AIR_HU))


@dataclass
class StageOutput:
    """A stage's result as later stages see it: its label map on the grid it was computed on
    (training passes the truth here), and a localize stage's class probabilities (a vector image)."""

    labels: sitk.Image          # label values (0..3) on the grid they were computed on
    probabilities: Optional[sitk.Image] = None   # vector image of class probabilities (localize stages only)


# -- regions ---------------------------------------------------------------------------------
def stage_regions(stage: StageSpec, image: sitk.Image, previous: Optional[StageOutput], spacing,
                  landmarks: Optional[Landmarks] = None, notes: Optional[list] = None) -> list[geo.Box]:
    """Boxes (canonical frame, mm) the stage runs on, clipped to the image and merged when they overlap.

    Every box is at least one patch wide (``patch_size * spacing``) where the image allows,
    so the network sees real context instead of padding. A components region keeps at most
    ``max_components`` (<= 2) plausible components (``region.plausibility``; ``landmarks`` of
    ``image``, estimated here when not given) and cuts each box to ``region.max_size_mm`` around
    its component's centroid; what was dropped or cut is appended to ``notes``.
    """
    full = geo.image_box(image)
    region = stage.region
    if region.kind == "whole":
        return [full]
    mask = label_mask(previous.labels, region.labels)
    patch_mm = np.asarray(stage.patch_size, dtype=float) * np.asarray(spacing)
    notes = notes if notes is not None else []
    if region.kind == "components":
        plausibility = region.plausibility if region.plausibility.enabled else None
        if plausibility is not None and landmarks is None:
            landmarks = estimate_landmarks(image)
        components = _components(mask, region.min_volume_ml, region.max_components, plausibility, landmarks, full,
                                 notes, f"stage {stage.name!r} regions")
        boxes = []
        for box, centroid in components:
            box = _at_least(box.expanded(region.margin_mm), patch_mm)
            boxes.append(_bounded(box, centroid, region.max_size_mm, notes, stage.name))
    else:  # fixed_box
        fg = _foreground_box(mask)
        if fg is None:
            return []
        half = np.asarray(region.size_mm) / 2.0
        centre = np.asarray(fg.center)
        boxes = [_at_least(geo.Box(tuple(centre - half), tuple(centre + half)), patch_mm)]
    clipped = []
    for box in boxes:
        box = _shift_inside(box, full)
        inside = box.intersection(full)
        if inside is not None:
            clipped.append(inside)
    return merge_overlapping(clipped)


def component_boxes(mask: sitk.Image, min_volume_ml: float, max_components: int) -> list[geo.Box]:
    """Boxes of the largest connected components (26-connected) of a binary mask, biggest first."""
    return [box for box, _ in _components(mask, min_volume_ml, max_components, None, None, None, None, "")]


def _components(mask: sitk.Image, min_volume_ml: float, max_components: int, plausibility, landmarks,
                fov: Optional[geo.Box], notes: Optional[list], where: str) -> list[tuple[geo.Box, np.ndarray]]:
    """(box, centroid in the canonical frame) of the ``max_components`` largest components of ``mask`` of at
    least ``min_volume_ml`` that pass ``plausibility`` (None: no plausibility rule), biggest first."""
    arr = sitk.GetArrayViewFromImage(mask)
    if not np.any(arr):
        return []
    cc = connected_components(arr > 0)
    cc_img = sitk.GetImageFromArray(cc.astype(np.uint32, copy=False))
    cc_img.CopyInformation(mask)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(cc_img)
    voxel_ml = voxel_volume_mm3(mask) / 1000.0
    rejected = set()
    if plausibility is not None:
        verdicts, skipped = judge_components(cc, mask, fov if fov is not None else geo.image_box(mask), landmarks, plausibility)
        messages = skipped + verdict_notes(verdicts, where, ignore_below_ml=min_volume_ml)
        rejected = {v.label for v in verdicts if not v.keep}
        for m in messages:
            logger.debug("%s", m)
            if notes is not None and m not in notes:
                notes.append(m)
    canonical, _, _ = geo.canonical_axes(mask.GetDirection())
    out = []
    for label in sorted(stats.GetLabels(), key=lambda l: -stats.GetNumberOfPixels(l)):
        if label in rejected or stats.GetNumberOfPixels(label) * voxel_ml < min_volume_ml or len(out) >= max_components:
            continue
        bb = stats.GetBoundingBox(label)  # (x0, y0, z0, sx, sy, sz)
        lower = bb[:3]
        upper = tuple(bb[k] + bb[k + 3] - 1 for k in range(3))
        centroid = canonical.T @ np.asarray(stats.GetCentroid(label))
        out.append((geo.index_box_to_box(mask, lower, upper), centroid))
    return out


def _bounded(box: geo.Box, centroid, max_size_mm, notes: list, stage_name: str) -> geo.Box:
    """``box`` cut to at most ``max_size_mm`` per axis, centred on ``centroid`` as far as the box allows."""
    if max_size_mm is None:
        return box
    lo, hi = np.asarray(box.lower, dtype=float), np.asarray(box.upper, dtype=float)
    limit = np.asarray(max_size_mm, dtype=float)
    if np.all(hi - lo <= limit + 1e-6):
        return box
    before = hi - lo
    for k in range(3):
        if hi[k] - lo[k] > limit[k]:
            start = min(max(float(centroid[k]) - limit[k] / 2.0, lo[k]), hi[k] - limit[k])
            lo[k], hi[k] = start, start + limit[k]
    note = (f"stage {stage_name!r}: a kidney region of {before[0]:.0f} x {before[1]:.0f} x {before[2]:.0f} mm was cut to "
            f"{hi[0] - lo[0]:.0f} x {hi[1] - lo[1]:.0f} x {hi[2] - lo[2]:.0f} mm around its component's centre "
            f"(max_size_mm {limit[0]:g} x {limit[1]:g} x {limit[2]:g})")
    logger.info("%s", note)
    if note not in notes:
        notes.append(note)
    return geo.Box(tuple(lo), tuple(hi))


def merge_overlapping(boxes: list[geo.Box]) -> list[geo.Box]:
    """Union boxes that overlap until none do (so no voxel is predicted twice with different context)."""
    boxes = list(boxes)
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                if boxes[i].overlaps(boxes[j]):
                    boxes[i] = boxes[i].union(boxes.pop(j))
                    merged = True
                    break
            if merged:
                break
    return boxes


def _at_least(box: geo.Box, size_mm) -> geo.Box:
    grow = np.maximum(np.asarray(size_mm) - np.asarray(box.size_mm), 0) / 2.0
    return box.expanded(grow)


def _shift_inside(box: geo.Box, full: geo.Box) -> geo.Box:
    """Move a box into ``full`` where it sticks out on one side only (keeps a fixed-size ROI whole)."""
    lo, hi = np.asarray(box.lower, dtype=float), np.asarray(box.upper, dtype=float)
    flo, fhi = np.asarray(full.lower), np.asarray(full.upper)
    for k in range(3):
        if hi[k] - lo[k] >= fhi[k] - flo[k]:
            continue
        if lo[k] < flo[k]:
            hi[k] += flo[k] - lo[k]
            lo[k] = flo[k]
        elif hi[k] > fhi[k]:
            lo[k] -= hi[k] - fhi[k]
            hi[k] = fhi[k]
    return geo.Box(tuple(lo), tuple(hi))


def _foreground_box(mask: sitk.Image) -> Optional[geo.Box]:
    arr = sitk.GetArrayViewFromImage(mask)
    if not np.any(arr):
        return None
    idx = [np.nonzero(np.any(arr, axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)]
    lower = (int(idx[2][0]), int(idx[1][0]), int(idx[0][0]))
    upper = (int(idx[2][-1]), int(idx[1][-1]), int(idx[0][-1]))
    return geo.index_box_to_box(mask, lower, upper)


def label_mask(labels: sitk.Image, names) -> sitk.Image:
    """uint8 mask (same grid) of the voxels of ``labels`` holding any of the label ``names``."""
    arr = sitk.GetArrayViewFromImage(labels)
    mask = sitk.GetImageFromArray(np.isin(arr, [LABEL_VALUES[n] for n in names]).astype(np.uint8))
    mask.CopyInformation(labels)
    return mask


# -- inputs ----------------------------------------------------------------------------------
def stage_input_channels(stage: StageSpec, manifest: ModelManifest, source: sitk.Image, grid: geo.Grid,
                         previous: Optional[StageOutput], outputs: dict) -> np.ndarray:
    """Network input on ``grid`` as float32 ``[C, z, y, x]``: the normalised CT (k shifted copies
    for 2.5D), then a localize stage's probabilities when the stage is a cascade.

    ``source`` is the CT (HU) already block-averaged for this stage's spacing. Training uses
    this same function so that networks see exactly what inference feeds them.
    """
    hu = sitk.GetArrayFromImage(geo.resample(source, grid, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32))
    if stage.inputs.mask_labels:
        mask_img = label_mask(previous.labels, stage.inputs.mask_labels)
        if stage.inputs.mask_dilate_mm > 0:
            radius = [max(1, int(round(stage.inputs.mask_dilate_mm / s))) for s in mask_img.GetSpacing()]
            mask_img = sitk.BinaryDilate(mask_img, radius, sitk.sitkBall)
        mask = sitk.GetArrayFromImage(geo.resample(mask_img, grid, sitk.sitkNearestNeighbor, 0)).astype(bool)
        hu[~mask] = stage.inputs.mask_fill_hu
    normalized = stage.normalization.apply(hu, out=hu)
    k = stage.inputs.slices_as_channels or 1
    if k == 1:
        channels = [normalized]
    else:
        r = k // 2
        padded = np.pad(normalized, ((r, r), (0, 0), (0, 0)), mode="edge")
        channels = [padded[j:j + normalized.shape[0]] for j in range(k)]
    if stage.inputs.prior_from is not None:
        prior = outputs[stage.inputs.prior_from].probabilities
        resampled = geo.resample(prior, grid, sitk.sitkLinear, 0.0)
        prior_arr = sitk.GetArrayFromImage(resampled)  # (z, y, x, K)
        channels += [np.ascontiguousarray(prior_arr[..., c]) for c in range(prior_arr.shape[-1])]
    return np.stack(channels).astype(np.float32, copy=False)


# -- outputs ---------------------------------------------------------------------------------
def class_values(stage: StageSpec) -> np.ndarray:
    """uint8 label value of each of ``stage``'s classes (class index -> label value)."""
    return np.asarray([LABEL_VALUES[c] for c in stage.classes], dtype=np.uint8)


def argmax_labels(probs: np.ndarray, stage: StageSpec, grid: geo.Grid) -> sitk.Image:
    """The label image on ``grid`` of probabilities ``[K, z, y, x]``."""
    return geo.array_to_image(class_values(stage)[np.argmax(probs, axis=0)], grid)


def stage_labels(stage: StageSpec, probs: np.ndarray) -> np.ndarray:
    """Label values uint8 ``[z, y, x]`` of class probabilities ``[K, z, y, x]`` of ``stage`` (argmax)."""
    return class_values(stage)[np.argmax(probs, axis=0)]


# -- prediction ------------------------------------------------------------------------------
def stage_predictor(stage: StageSpec, networks: Sequence, device, tta: bool = False):
    """A :class:`~KidneyTumorSegLib.predictor.StagePredictor` of ``networks`` (an ensemble, in eval mode) on
    ``device``; ``tta`` mirrors along the stage's ``tta_mirror_axes`` ((x, y, z) axes; a 2.5D network is never
    mirrored along z, its windows are stacks of 2D slices)."""
    from .predictor import StagePredictor

    two_and_half_d = getattr(networks[0], "spatial_dims", 3) == 2
    axes = stage.tta_mirror_axes if tta else ()
    # (x, y, z) axes -> tensor dims of a window [B, C, D, H, W]: x -> W (4), y -> H (3), z -> D (2)
    dims = [4 - a for a in axes if not (two_and_half_d and a == 2)]
    return StagePredictor(list(networks), dims, device)


def predict_stage(stage: StageSpec, predictor, channels: np.ndarray, device, progress=None, cancel=None,
                  notes: Optional[list] = None) -> np.ndarray:
    """Class probabilities float32 ``[K, z, y, x]`` of ``stage`` on the grid of ``channels`` (context classes
    folded into background, :func:`fold_context`).

    ``channels``: the stage's input float32 ``[C, z, y, x]`` (:func:`stage_input_channels`, or a training cache's
    copy of it); ``predictor``: :func:`stage_predictor`'s. The sliding window uses the stage's ``patch_size``,
    ``overlap``, ``batch_size`` and ``window_margin`` (all (x, y, z), reversed here to array order) and pads
    with normalised air. ``progress`` gets the fraction of windows done, ``cancel`` stops it (CancelledError);
    ``notes`` gets a line per out-of-memory fallback (see ``sliding_window``).
    """
    import torch

    from .sliding_window import sliding_window_inference

    inputs = np.asarray(channels, dtype=np.float32)
    if not inputs.flags.writeable:  # a memory-mapped cache volume: torch wants memory it may write
        inputs = inputs.copy()
    probs = sliding_window_inference(
        torch.from_numpy(inputs), predictor, tuple(reversed(stage.patch_size)),
        num_outputs=stage.num_outputs, overlap=stage.overlap, batch_size=stage.batch_size,
        margin=tuple(reversed(stage.window_margin)), pad_value=pad_value(stage), device=device,
        progress=progress, cancel=cancel, notes=notes)
    return fold_context(stage, probs.numpy())


def fold_context(stage: StageSpec, probs: np.ndarray) -> np.ndarray:
    """Probabilities ``[K, z, y, x]`` of ``stage``'s classes from its networks' ``[K + C, z, y, x]`` (C context
    classes): each context class (liver, bowel, ...) is background to the output, so its probability is added to
    background's, in place; without context classes ``probs`` is returned as it is."""
    k = len(stage.classes)
    if probs.shape[0] != stage.num_outputs:
        raise ValueError(f"stage {stage.name!r}: expected {stage.num_outputs} output channels "
                         f"({k} classes + {len(stage.context_classes)} context), got {probs.shape[0]}")
    if not stage.context_classes:
        return probs
    probs[0] += probs[k:].sum(axis=0)
    return probs[:k]
