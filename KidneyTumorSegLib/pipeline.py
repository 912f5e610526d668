"""Coarse-to-fine inference driven by a model package.

For each stage of the manifest, in order:

1. find its regions (the whole volume, one box per kidney component of the previous
   result grown by a margin, or a fixed-size box around it), each as a box in mm; for
   components regions the previous result's implausible components are dropped first
   (``region.plausibility``, see ``anatomy``), at most two regions are kept and each is at
   most ``region.max_size_mm`` (cut around the component's centroid), with notes; the memory
   the largest region needs is checked before the stage runs;
2. resample the CT onto the stage's working grid inside each box (block-average first
   when down-sampling a lot), optionally mask it with the previous result, normalise it,
   stack k adjacent slices for 2.5D networks, add a localize stage's probabilities for a
   cascade;
3. run the sliding window with the stage's networks (an ensemble is averaged);
4. ``localize`` stages keep their label map on their own (coarse) grid; ``segment`` and
   ``overlay`` stages resample their probabilities (or labels) back onto the part of the
   input grid inside the box, slab by slab to bound memory, and write the labels.

Then post-processing and measurements on the input grid. The output has exactly the
input's size, spacing, origin and direction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import SimpleITK as sitk

from . import geometry as geo
from .anatomy import Landmarks, estimate_landmarks, judge_components, verdict_notes
from .enhancement import enhancement_note
from .labels import LABEL_VALUES, connected_components, voxel_volume_mm3
from .manifest import ModelManifest, StageSpec
from .models import ModelPackage
from .runcontrol import ProgressCallback, ProgressSpan, check_cancel

logger = logging.getLogger(__name__)

AIR_HU = -1024.0
#: voxels of the input grid resampled back at once (bounds the float32 probability slab)
_BACK_RESAMPLE_VOXELS = 8_000_000


@dataclass
class SegmentationResult:
    """What :func:`segment` returns: the label map (uint8, on the input grid), measurements,
    seconds spent per step, the model and device used, and notes for the user."""

    labels: sitk.Image
    stats: dict
    timings: dict
    model_name: str
    device: str
    notes: list = field(default_factory=list)


@dataclass
class StageOutput:
    """A stage's result as later stages see it: its label map on the grid it was computed on
    (training passes the truth here), and a localize stage's class probabilities (a vector image)."""

    labels: sitk.Image          # label values (0..3) on the grid they were computed on
    probabilities: Optional[sitk.Image] = None   # vector image of class probabilities (localize stages only)


class Segmenter:
    """A loaded model package on a device, ready to segment many images.

    ``package``: a verified :class:`ModelPackage`; ``device``: ``auto|cuda|mps|cpu``;
    ``tta``: mirror test-time augmentation along each stage's ``tta_mirror_axes``.
    """

    def __init__(self, package: ModelPackage, device: str = "auto", tta: bool = False):
        from .device import resolve_device

        self.package = package
        self.manifest: ModelManifest = package.manifest
        self.device, self.device_reason = resolve_device(device)
        self.tta = tta
        self._predictors = {}

    def _predictor(self, stage: StageSpec):
        from .predictor import StagePredictor

        if stage.name not in self._predictors:
            nets = self.package.build_networks(stage, device=self.device)
            two_and_half_d = getattr(nets[0], "spatial_dims", 3) == 2
            axes = stage.tta_mirror_axes if self.tta else ()
            # (x, y, z) axes -> tensor dims (W=4, H=3, D=2); 2.5D windows cannot be mirrored along z.
            dims = [4 - a for a in axes if not (two_and_half_d and a == 2)]
            self._predictors[stage.name] = StagePredictor(nets, dims, self.device)
        predictor = self._predictors[stage.name]
        if predictor.device != self.device:  # left on the CPU by an out-of-memory fallback that could not move it back
            predictor.to(self.device)
        return predictor

    def segment(self, image: sitk.Image, progress: Optional[ProgressCallback] = None, cancel=None,
                force: bool = False) -> SegmentationResult:
        """Segment a CT (``sitk.Image`` in HU, any pixel type) into a label map on its grid.

        Every entry point passes through here, so this is where the input is checked
        (``validation.validate_ct_image``; ``force`` accepts non-CT-like intensities) and
        memory is checked against this model's stage grids; an allocation failure on the
        way is an InsufficientMemoryError. ``cancel`` is checked between every step
        (stages, regions, windows, post-processing, measurements, notes): once it is
        set, CancelledError and no result.
        """
        from .validation import allocation_failures_as_errors, check_memory, validate_ct_image

        if not isinstance(image, sitk.Image):
            from .errors import InputError

            raise InputError(f"Expected a SimpleITK.Image (a CT in HU), got {type(image).__name__}")
        validate_ct_image(image, force=force)
        check_memory(image, manifest=self.manifest)
        check_cancel(cancel)
        size = "x".join(map(str, image.GetSize()))
        with allocation_failures_as_errors(f"segmenting the {size} volume with model {self.manifest.name!r}"):
            return self._segment(image, progress, cancel)

    def _segment(self, image: sitk.Image, progress, cancel) -> SegmentationResult:
        from .measurements import measure
        from .postprocessing import postprocess

        timings, notes = {}, _Notes()
        start_all = time.perf_counter()
        landmarks = None
        if self._uses_anatomy():
            t0 = time.perf_counter()
            landmarks = estimate_landmarks(image)
            timings["anatomy"] = time.perf_counter() - t0
        out = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)
        previous: Optional[StageOutput] = None
        outputs: dict[str, StageOutput] = {}
        shares = self._progress_shares()
        position = 0.0
        for stage, share in zip(self.manifest.stages, shares):
            check_cancel(cancel)
            t0 = time.perf_counter()
            span = ProgressSpan(progress, position, position + share, f"{stage.name} stage")
            span(0.0)
            previous = self._run_stage(stage, image, out, previous, outputs, span, cancel, notes, landmarks)
            outputs[stage.name] = previous
            timings[stage.name] = time.perf_counter() - t0
            position += share
        check_cancel(cancel)
        if progress is not None:
            progress(position, "post-processing")
        t0 = time.perf_counter()
        labels = sitk.GetImageFromArray(out)
        labels.CopyInformation(image)
        del out
        check_cancel(cancel)
        labels = postprocess(labels, image, self.manifest.postprocessing, notes=notes, landmarks=landmarks)
        timings["postprocessing"] = time.perf_counter() - t0
        check_cancel(cancel)
        t0 = time.perf_counter()
        stats = measure(labels)
        timings["measurements"] = time.perf_counter() - t0
        check_cancel(cancel)
        if not stats.get("kidneys"):
            notes.append("no kidney found in this volume")
        else:
            phase_note = enhancement_note(image, labels)
            if phase_note:
                notes.append(phase_note)
        timings["total"] = time.perf_counter() - start_all
        check_cancel(cancel)
        if progress is not None:
            progress(1.0, "done")
        return SegmentationResult(labels, stats, timings, self.manifest.name, str(self.device), list(notes))

    def _uses_anatomy(self) -> bool:
        """Whether a plausibility rule is on (then the landmarks are estimated once per image)."""
        return self.manifest.postprocessing.plausibility.enabled or any(
            s.region.kind == "components" and s.region.plausibility.enabled for s in self.manifest.stages)

    def _progress_shares(self) -> list[float]:
        weights = [0.15 if s.role == "localize" else 1.0 for s in self.manifest.stages]
        total = sum(weights) + 0.05  # the rest: post-processing and measurements
        return [w / total for w in weights]

    # -- one stage -------------------------------------------------------------------------
    def _run_stage(self, stage, image, out, previous, outputs, span, cancel, notes, landmarks=None) -> StageOutput:
        from .validation import check_region_memory

        spacing = geo.stage_spacing(image, stage.spacing_mm)
        boxes = stage_regions(stage, image, previous, spacing, landmarks=landmarks, notes=notes)
        if not boxes:
            plausible = " plausible" if stage.region.kind == "components" and stage.region.plausibility.enabled else ""
            notes.append(f"stage {stage.name!r}: nothing to refine (no{plausible} kidney found by the previous stage)")
            logger.info("stage %s: no region to run on", stage.name)
            return previous if previous is not None else StageOutput(_empty_labels_like(image))
        canonical, _, _ = geo.canonical_axes(image.GetDirection())
        grids = [geo.grid_for_box(box, spacing, canonical) for box in boxes]
        check_region_memory(stage.name, [g.size for g in grids], self.manifest.network_in_channels(stage), len(stage.classes))
        predictor = self._predictor(stage)
        source = geo.shrink_for_spacing(image, spacing)
        result: Optional[StageOutput] = None
        for i, (box, grid) in enumerate(zip(boxes, grids)):
            check_cancel(cancel)
            region_span = ProgressSpan(span, i / len(boxes), (i + 1) / len(boxes),
                                       f"{stage.name} stage" + (f": region {i + 1}/{len(boxes)}" if len(boxes) > 1 else ""))
            channels = stage_input_channels(stage, self.manifest, source, grid, previous, outputs)
            probs = self._predict(stage, predictor, channels, region_span, cancel, notes)
            if stage.role == "localize":
                result = StageOutput(_argmax_labels(probs, stage, grid),
                                      geo.array_to_image(np.moveaxis(probs, 0, -1), grid, is_vector=True))
            else:
                write_back(stage, probs, grid, box, image, out)
        if result is None:
            result = StageOutput(_labels_view(out, image))
        return result

    def _predict(self, stage, predictor, channels: np.ndarray, span, cancel, notes: Optional[list] = None) -> np.ndarray:
        import torch

        from .sliding_window import sliding_window_inference

        patch = tuple(reversed(stage.patch_size))  # (x, y, z) -> tensor (D, H, W)
        fallbacks: list = []  # what an out-of-memory error on the device made this call do
        probs = sliding_window_inference(
            torch.from_numpy(channels), predictor, patch, num_outputs=len(stage.classes), overlap=stage.overlap,
            batch_size=stage.batch_size, margin=tuple(reversed(stage.window_margin)),
            pad_value=float(stage.normalization.normalized_value(AIR_HU)),
            device=self.device, progress=lambda f: span(f), cancel=cancel, notes=fallbacks)
        if notes is not None:
            for note in fallbacks:
                notes.append(f"stage {stage.name!r}: {note}")
        return probs.numpy()


# -- regions ---------------------------------------------------------------------------------
class _Notes(list):
    """The result's notes: the same note twice (e.g. a skipped rule, from two stages) is kept once."""

    def append(self, note) -> None:
        if note not in self:
            super().append(note)


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
def _class_values(stage: StageSpec) -> np.ndarray:
    return np.asarray([LABEL_VALUES[c] for c in stage.classes], dtype=np.uint8)


def _argmax_labels(probs: np.ndarray, stage: StageSpec, grid: geo.Grid) -> sitk.Image:
    return geo.array_to_image(_class_values(stage)[np.argmax(probs, axis=0)], grid)


def write_back(stage: StageSpec, probs: np.ndarray, grid: geo.Grid, box: geo.Box, image: sitk.Image, out: np.ndarray) -> None:
    """Write a stage's prediction inside ``box`` into ``out`` (the input-grid label array, (z, y, x)).

    Probabilities are resampled linearly onto the input grid and argmaxed there
    (``resample_back == "probabilities"``), or the labels with nearest neighbour. Works in
    slabs along the input's slowest array axis so at most ~8 M voxels x classes are in
    float32 at once.
    """
    index_range = geo.region_index_range(image, box)
    if index_range is None:
        return
    start, size = index_range
    values = _class_values(stage)
    if stage.resample_back == "probabilities":
        source = geo.array_to_image(np.moveaxis(probs, 0, -1), grid, is_vector=True)
        interpolator = sitk.sitkLinear
    else:
        source = _argmax_labels(probs, stage, grid)
        interpolator = sitk.sitkNearestNeighbor
    slab = max(1, _BACK_RESAMPLE_VOXELS // max(1, size[0] * size[1]))
    for z0 in range(start[2], start[2] + size[2], slab):
        nz = min(slab, start[2] + size[2] - z0)
        sub = geo.Grid((size[0], size[1], nz), tuple(image.GetSpacing()),
                       tuple(image.TransformIndexToPhysicalPoint((start[0], start[1], z0))), tuple(image.GetDirection()))
        resampled = sitk.GetArrayFromImage(geo.resample(source, sub, interpolator, 0.0))
        labels = values[np.argmax(resampled, axis=-1)] if stage.resample_back == "probabilities" else resampled.astype(np.uint8)
        view = out[z0:z0 + nz, start[1]:start[1] + size[1], start[0]:start[0] + size[0]]
        if stage.role == "segment":
            view[...] = labels
        else:  # overlay: only this stage's findings, on top of what is there
            np.copyto(view, labels, where=labels > 0)


def _labels_view(out: np.ndarray, image: sitk.Image) -> sitk.Image:
    """The current output as an image, cropped to its foreground (regions only need that part)."""
    nz = [np.nonzero(np.any(out, axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)]
    if any(len(n) == 0 for n in nz):
        return _empty_labels_like(image)
    lo = [int(n[0]) for n in nz]
    hi = [int(n[-1]) + 1 for n in nz]
    crop = sitk.GetImageFromArray(np.ascontiguousarray(out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]))
    crop.SetSpacing(image.GetSpacing())
    crop.SetDirection(image.GetDirection())
    crop.SetOrigin(image.TransformIndexToPhysicalPoint((lo[2], lo[1], lo[0])))
    return crop


def _empty_labels_like(image: sitk.Image) -> sitk.Image:
    """A 2x2x2 all-background label map at the image's corner (stands for "nothing found")."""
    empty = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    empty.SetSpacing(image.GetSpacing())
    empty.SetDirection(image.GetDirection())
    empty.SetOrigin(image.GetOrigin())
    return empty
