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
   input grid inside the box, slab by slab to bound memory, and write the labels, and
   the probability of a lesion class (tumor + cyst, uint8 0-255) beside them.

Then post-processing and measurements on the input grid; each lesion's measurements carry its
``confidence`` (the mean lesion probability over its voxels), and a lesion below the
manifest's ``lesion_confidence_note_below`` gets a note. The output has exactly the
input's size, spacing, origin and direction.

Steps 1-3 are the functions of ``stages`` (regions, input channels, predictor,
``predict_stage``), which training uses too; this module drives them and writes the output.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import SimpleITK as sitk

from . import geometry as geo
from .anatomy import estimate_landmarks
from .enhancement import enhancement_note
from .labels import CYST, TUMOR
from .manifest import ModelManifest, StageSpec
from .models import ModelPackage
from .runcontrol import ProgressCallback, ProgressSpan, check_cancel
# The per-stage contract lives in ``stages`` (training uses it too); these names stay importable from here.
from .stages import (AIR_HU, StageOutput, argmax_labels, class_values, component_boxes, label_mask,  # noqa: F401
                     merge_overlapping, predict_stage, stage_input_channels, stage_predictor, stage_regions)

logger = logging.getLogger(__name__)

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
class RunState:
    """One image's run through the cascade: the input, the label array the segment stages write into (input
    grid, z, y, x) and the lesion probability beside it, the anatomical landmarks, the cancel token, the previous
    stage's output, every stage's output by name, and the notes for the user."""

    image: sitk.Image
    out: Optional[np.ndarray]
    lesion_probability: Optional[np.ndarray] = None  # uint8 0-255 (z, y, x), written beside ``out``
    landmarks: Optional[object] = None
    cancel: Optional[object] = None
    previous: Optional[StageOutput] = None
    outputs: dict = field(default_factory=dict)
    notes: list = field(default_factory=lambda: _Notes())


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
        if stage.name not in self._predictors:
            nets = self.package.build_networks(stage, device=self.device)
            self._predictors[stage.name] = stage_predictor(stage, nets, self.device, tta=self.tta)
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
        from .measurements import low_confidence_notes, measure
        from .postprocessing import postprocess

        timings = {}
        start_all = time.perf_counter()
        landmarks = None
        if self._uses_anatomy():
            t0 = time.perf_counter()
            landmarks = estimate_landmarks(image)
            timings["anatomy"] = time.perf_counter() - t0
        shape = sitk.GetArrayViewFromImage(image).shape
        run = RunState(image, np.zeros(shape, dtype=np.uint8), np.zeros(shape, dtype=np.uint8), landmarks, cancel)
        shares = self._progress_shares()
        position = 0.0
        for stage, share in zip(self.manifest.stages, shares):
            check_cancel(cancel)
            t0 = time.perf_counter()
            span = ProgressSpan(progress, position, position + share, f"{stage.name} stage")
            span(0.0)
            run.previous = self._run_stage(stage, run, span)
            run.outputs[stage.name] = run.previous
            timings[stage.name] = time.perf_counter() - t0
            position += share
        check_cancel(cancel)
        if progress is not None:
            progress(position, "post-processing")
        t0 = time.perf_counter()
        labels = sitk.GetImageFromArray(run.out)
        labels.CopyInformation(image)
        run.out = None  # the label image holds its own copy: let the array go before post-processing
        notes = run.notes
        check_cancel(cancel)
        labels = postprocess(labels, image, self.manifest.postprocessing, notes=notes, landmarks=landmarks)
        timings["postprocessing"] = time.perf_counter() - t0
        check_cancel(cancel)
        t0 = time.perf_counter()
        stats = measure(labels, lesion_probability=run.lesion_probability)
        run.lesion_probability = None
        timings["measurements"] = time.perf_counter() - t0
        check_cancel(cancel)
        notes.extend(low_confidence_notes(stats, self.manifest.postprocessing.lesion_confidence_note_below))
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
    def _run_stage(self, stage, run: "RunState", span) -> StageOutput:
        """One stage on ``run``'s image: its regions, its predictions (a localize stage's kept on its grid, a
        segment / overlay stage's written into ``run.out``); returns what later stages see."""
        from .validation import check_region_memory

        image, previous, cancel, notes = run.image, run.previous, run.cancel, run.notes
        spacing = geo.stage_spacing(image, stage.spacing_mm)
        boxes = stage_regions(stage, image, previous, spacing, landmarks=run.landmarks, notes=notes)
        if not boxes:
            plausible = " plausible" if stage.region.kind == "components" and stage.region.plausibility.enabled else ""
            notes.append(f"stage {stage.name!r}: nothing to refine (no{plausible} kidney found by the previous stage)")
            logger.info("stage %s: no region to run on", stage.name)
            return previous if previous is not None else StageOutput(_empty_labels_like(image))
        canonical, _, _ = geo.canonical_axes(image.GetDirection())
        grids = [geo.grid_for_box(box, spacing, canonical) for box in boxes]
        check_region_memory(stage.name, [g.size for g in grids], self.manifest.network_in_channels(stage), stage.num_outputs)
        predictor = self._predictor(stage)
        source = geo.shrink_for_spacing(image, spacing)
        result: Optional[StageOutput] = None
        for i, (box, grid) in enumerate(zip(boxes, grids)):
            check_cancel(cancel)
            region_span = ProgressSpan(span, i / len(boxes), (i + 1) / len(boxes),
                                       f"{stage.name} stage" + (f": region {i + 1}/{len(boxes)}" if len(boxes) > 1 else ""))
            channels = stage_input_channels(stage, self.manifest, source, grid, previous, run.outputs)
            probs = self._predict(stage, predictor, channels, region_span, cancel, notes)
            if stage.role == "localize":
                result = StageOutput(argmax_labels(probs, stage, grid),
                                      geo.array_to_image(np.moveaxis(probs, 0, -1), grid, is_vector=True))
            else:
                write_back(stage, probs, grid, box, image, run.out, run.lesion_probability)
        if result is None:
            result = StageOutput(_labels_view(run.out, image))
        return result

    def _predict(self, stage, predictor, channels: np.ndarray, span, cancel, notes: Optional[list] = None) -> np.ndarray:
        fallbacks: list = []  # what an out-of-memory error on the device made this call do
        probs = predict_stage(stage, predictor, channels, self.device, progress=lambda f: span(f), cancel=cancel,
                              notes=fallbacks)
        if notes is not None:
            for note in fallbacks:
                notes.append(f"stage {stage.name!r}: {note}")
        return probs


# -- notes and outputs -----------------------------------------------------------------------
class _Notes(list):
    """The result's notes: the same note twice (e.g. a skipped rule, from two stages) is kept once."""

    def append(self, note) -> None:
        if note not in self:
            super().append(note)


def write_back(stage: StageSpec, probs: np.ndarray, grid: geo.Grid, box: geo.Box, image: sitk.Image, out: np.ndarray,
               lesion_out: Optional[np.ndarray] = None) -> None:
    """Write a stage's prediction inside ``box`` into ``out`` (the input-grid label array, (z, y, x)).

    Probabilities are resampled linearly onto the input grid and argmaxed there
    (``resample_back == "probabilities"``), or the labels with nearest neighbour. Works in
    slabs along the input's slowest array axis so at most ~8 M voxels x classes are in
    float32 at once. ``lesion_out`` (uint8, ``out``'s shape; optional) gets the summed
    probability of the stage's lesion classes (tumor, cyst) as round(255 p), resampled
    linearly in both modes, where the labels are written (an overlay stage: where it
    finds something).
    """
    index_range = geo.region_index_range(image, box)
    if index_range is None:
        return
    start, size = index_range
    values = class_values(stage)
    lesion_classes = np.flatnonzero(np.isin(values, (TUMOR, CYST)))
    if lesion_classes.size == 0:
        lesion_out = None
    lesion_source = None
    if stage.resample_back == "probabilities":
        source = geo.array_to_image(np.moveaxis(probs, 0, -1), grid, is_vector=True)
        interpolator = sitk.sitkLinear
    else:
        source = argmax_labels(probs, stage, grid)
        interpolator = sitk.sitkNearestNeighbor
        if lesion_out is not None:
            lesion_source = geo.array_to_image(probs[lesion_classes].sum(axis=0), grid)
    slab = max(1, _BACK_RESAMPLE_VOXELS // max(1, size[0] * size[1]))
    for z0 in range(start[2], start[2] + size[2], slab):
        nz = min(slab, start[2] + size[2] - z0)
        sub = geo.Grid((size[0], size[1], nz), tuple(image.GetSpacing()),
                       tuple(image.TransformIndexToPhysicalPoint((start[0], start[1], z0))), tuple(image.GetDirection()))
        resampled = sitk.GetArrayFromImage(geo.resample(source, sub, interpolator, 0.0))
        labels = values[np.argmax(resampled, axis=-1)] if stage.resample_back == "probabilities" else resampled.astype(np.uint8)
        index = (slice(z0, z0 + nz), slice(start[1], start[1] + size[1]), slice(start[0], start[0] + size[0]))
        lesion = None
        if lesion_out is not None:
            p = (resampled[..., lesion_classes].sum(axis=-1) if lesion_source is None
                 else sitk.GetArrayFromImage(geo.resample(lesion_source, sub, sitk.sitkLinear, 0.0)))
            lesion = np.rint(np.clip(p, 0.0, 1.0) * 255.0).astype(np.uint8)
        del resampled
        if stage.role == "segment":
            out[index] = labels
            if lesion is not None:
                lesion_out[index] = lesion
        else:  # overlay: only this stage's findings, on top of what is there
            found = labels > 0
            np.copyto(out[index], labels, where=found)
            if lesion is not None:
                np.copyto(lesion_out[index], lesion, where=found)


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
