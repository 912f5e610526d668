"""Post-processing of a predicted label map (0 background, 1 kidney, 2 tumor, 3 cyst).

Rules from the seed methods, each switchable in :class:`PostprocessingConfig`:

0. anatomical plausibility (``plausibility``, off unless enabled; the rules and landmarks are in
   :mod:`anatomy`): kidney components (``label > 0``) of implausible volume or position (not
   beside the spine, in the chest) are removed first, each with a note, so they cannot take one of
   the kept places below.
1. keep the largest kidney regions: connected components of ``label > 0`` (kidney with its
   lesions); the top ``max_kidney_components`` are kept ("Two-phase framework", 5.2: top 2,
   top 1 for a patient with one kidney; Isensee-style top-2 of seed 000, 2.4). The paper does
   not say how "one kidney" is detected: a kept component other than the largest must hold at
   least ``min_component_fraction`` of the largest's volume, so a tiny second blob is dropped.
2. drop detached lesions: tumor/cyst regions that touch no kidney voxel are false positives.
3. intensity rule ("Two-phase framework", 5.2): tumor regions whose mean CT value is below
   ``cyst_threshold_hu`` (~10 HU; cysts average ~0 HU, tumors > 20 HU) are relabelled.
4. small lesions: tumor/cyst components under ``min_lesion_volume_ml`` go to the class around
   them, kidney (seed 004, 2.3: "a threshold to determine if the voxels of a predicted connected
   component should be assigned to the closest category"); ``largest_tumor_only`` keeps the
   largest tumor component only, the others become kidney (seed 001's "largest component").
5. fill holes: cavities fully enclosed by the kidney mask become kidney (the morphological
   refinement of seed 004, 2.3, which leaves its exact operations open).

Connectivity: every connected component here uses full (26-) connectivity. Holes are the
background regions that are not 6-connected to the border, the topological complement of a
26-connected foreground (a cavity whose only opening is a diagonal gap counts as a hole).
Volumes are compared in mm^3. All work is done inside the foreground's bounding box grown by
one voxel, so a 512x512x600 CT costs only a few full-volume passes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from KidneyTumorSegLib.anatomy import (PlausibilityConfig, estimate_landmarks, implausible_mask, judge_components,
                                       verdict_notes)
from KidneyTumorSegLib import geometry as geo
from KidneyTumorSegLib.labels import (BACKGROUND, CYST, KIDNEY, TUMOR, check_label_image, connected_components,
                                      label_bounding_box, voxel_volume_mm3)

logger = logging.getLogger(__name__)

_RELABEL_TARGETS = {"kidney": KIDNEY, "cyst": CYST, "background": BACKGROUND}


@dataclass(frozen=True)
class PostprocessingConfig:
    """Switches and parameters of :func:`postprocess` (stored in a model package manifest)."""

    #: keep only the largest connected components of ``label > 0`` (kidney incl. lesions)
    keep_largest_kidneys: bool = True
    max_kidney_components: int = 2
    #: a kept component other than the largest needs >= this fraction of the largest's volume
    min_component_fraction: float = 0.1
    #: tumor/cyst regions that touch no kidney voxel (label 1) are removed
    drop_detached_lesions: bool = True
    #: tumor regions whose mean HU is below ``cyst_threshold_hu`` are relabelled
    cyst_intensity_rule: bool = False
    cyst_threshold_hu: float = 10.0
    #: "kidney" (KiTS19 counts cysts as kidney), "cyst" or "background"
    cyst_relabel_to: str = "kidney"
    #: tumor/cyst components smaller than this (mL) become kidney; 0 switches the rule off
    min_lesion_volume_ml: float = 0.0
    #: keep only the largest tumor component; the others become kidney
    largest_tumor_only: bool = False
    #: 3D cavities enclosed by ``label > 0`` become kidney
    fill_holes: bool = True
    #: anatomical plausibility of the final kidney components (see ``anatomy``); off unless ``enabled``
    plausibility: PlausibilityConfig = PlausibilityConfig()
    #: a tumor or cyst whose mean lesion probability (``measurements``' confidence) is under this gets a note
    #: saying the model is unsure of it; nothing is removed; 0 switches the notes off
    lesion_confidence_note_below: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = _checked_value(field.name, getattr(self, field.name))
            object.__setattr__(self, field.name, value)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PostprocessingConfig":
        """Build from a plain dict (e.g. a manifest's ``postprocessing`` entry).

        Missing keys take their defaults. Unknown keys, wrong types and out-of-range values
        raise ValueError naming the key, the valid keys and the value that came in.
        """
        if not isinstance(d, Mapping):
            raise ValueError(
                f"post-processing settings must be a dict with keys {_valid_keys()}; "
                f"got {type(d).__name__} {d!r}"
            )
        unknown = sorted(str(k) for k in d if k not in _field_names())
        if unknown:
            raise ValueError(
                f"unknown post-processing key(s) {unknown}; valid keys are {_valid_keys()}; "
                f"got {dict(d)!r}"
            )
        return cls(**dict(d))

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict; ``from_dict(to_dict())`` gives an equal config."""
        return dataclasses.asdict(self)


def _field_names() -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(PostprocessingConfig))


def _valid_keys() -> str:
    return ", ".join(_field_names())


def _checked_value(name: str, value: Any) -> Any:
    """Validate one config field; returns the normalised value (floats as float)."""
    kind = type(value).__name__

    def fail(expected: str) -> ValueError:
        return ValueError(
            f"post-processing key '{name}' must be {expected}; got {value!r} ({kind}); "
            f"valid keys are {_valid_keys()}"
        )

    if name in ("keep_largest_kidneys", "drop_detached_lesions", "cyst_intensity_rule", "fill_holes", "largest_tumor_only"):
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if name == "max_kidney_components":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail("an integer >= 1")
        return value
    if name in ("min_component_fraction", "cyst_threshold_hu", "min_lesion_volume_ml", "lesion_confidence_note_below"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail("a finite number")
        if name == "min_lesion_volume_ml" and value < 0:
            raise fail("a number >= 0")
        if name in ("min_component_fraction", "lesion_confidence_note_below") and not 0.0 <= value <= 1.0:
            raise fail("a number in [0, 1]")
        return float(value)
    if name == "plausibility":
        return PlausibilityConfig.from_dict(value, "post-processing key 'plausibility'")
    if name == "cyst_relabel_to":
        if not isinstance(value, str) or value not in _RELABEL_TARGETS:
            raise fail("one of " + ", ".join(repr(k) for k in _RELABEL_TARGETS))
        return value
    raise ValueError(f"unknown post-processing key '{name}'; valid keys are {_valid_keys()}")


def postprocess(
    labels: sitk.Image, image: Optional[sitk.Image], config: PostprocessingConfig,
    notes: Optional[list] = None, landmarks=None,
) -> sitk.Image:
    """Apply the post-processing rules of ``config`` to a label map.

    ``labels``: 3D integer label map (values 0..3) on the input CT's grid.
    ``image``: the CT in HU on the same grid (size, spacing, origin, direction); used only by
    the intensity rule and the plausibility position rules (estimated from it unless ``landmarks``,
    an :class:`anatomy.Landmarks` of the same CT, is given) and may be None when those are off.
    ``notes``: a list the plausibility rule appends its notes to (what it dropped, what it skipped).
    Returns a new uint8 image with the geometry of ``labels``; the inputs are not modified.
    Steps, in order: plausibility -> keep largest kidney components -> drop detached lesions ->
    intensity rule -> small lesions / largest tumor only -> fill holes.
    """
    check_label_image(labels)
    if config.cyst_intensity_rule:
        if image is None:
            raise ValueError("the cyst intensity rule is on but no CT image was given (image=None)")
        _check_same_grid(labels, image)

    view = sitk.GetArrayViewFromImage(labels)
    box = label_bounding_box(view)
    if box is None:
        out = sitk.Cast(labels, sitk.sitkUInt8) if labels.GetPixelID() != sitk.sitkUInt8 else sitk.Image(labels)
        return out

    # Work on a copy of the crop only and paste it into a uint8 copy of the input: the full
    # volume is copied once, not twice (numpy copy + image copy).
    crop = np.array(view[box], dtype=np.uint8)
    voxel_mm3 = voxel_volume_mm3(labels)

    fg_components: Optional[np.ndarray] = None
    if config.plausibility.enabled:
        fg_components = connected_components(crop > 0)
        _drop_implausible(crop, fg_components, labels, box, image, landmarks, config.plausibility, notes)
        if not crop.any():
            fg_components = None
    if config.keep_largest_kidneys and crop.any():
        if fg_components is None:
            fg_components = connected_components(crop > 0)
        _keep_largest(crop, fg_components, voxel_mm3, config)
    if config.drop_detached_lesions:
        if fg_components is None:
            fg_components = connected_components(crop > 0)
        _drop_detached_lesions(crop, fg_components, voxel_mm3)
    if config.cyst_intensity_rule:
        hu = sitk.GetArrayViewFromImage(image)[box]
        _relabel_low_intensity_tumors(crop, hu, voxel_mm3, config)
    if config.min_lesion_volume_ml > 0 or config.largest_tumor_only:
        _lesion_component_rules(crop, voxel_mm3, config)
    if config.fill_holes:
        _fill_holes(crop)

    base = labels if labels.GetPixelID() == sitk.sitkUInt8 else sitk.Cast(labels, sitk.sitkUInt8)
    patch = sitk.GetImageFromArray(crop)
    start = [int(box[axis].start) for axis in (2, 1, 0)]
    return sitk.Paste(base, patch, patch.GetSize(), [0, 0, 0], start)


def _check_same_grid(labels: sitk.Image, image: sitk.Image) -> None:
    if not isinstance(image, sitk.Image):
        raise TypeError(f"image must be a SimpleITK.Image or None; got {type(image).__name__}")
    same = (
        labels.GetSize() == image.GetSize()
        and np.allclose(labels.GetSpacing(), image.GetSpacing(), rtol=1e-5, atol=1e-6)
        and np.allclose(labels.GetOrigin(), image.GetOrigin(), rtol=0, atol=1e-3)
        and np.allclose(labels.GetDirection(), image.GetDirection(), rtol=0, atol=1e-5)
        and image.GetNumberOfComponentsPerPixel() == 1
    )
    if not same:
        raise ValueError(
            "image must be a scalar CT on the label map's grid; labels have size "
            f"{labels.GetSize()}, spacing {labels.GetSpacing()}, origin {labels.GetOrigin()}, "
            f"direction {labels.GetDirection()}; image has size {image.GetSize()}, spacing "
            f"{image.GetSpacing()}, origin {image.GetOrigin()}, direction {image.GetDirection()}"
        )


def _drop_implausible(crop: np.ndarray, cc: np.ndarray, labels: sitk.Image, box, image: Optional[sitk.Image],
                      landmarks, config: PlausibilityConfig, notes: Optional[list]) -> None:
    """Remove the kidney components (ids ``cc`` of ``crop``) that break a plausibility rule, with notes."""
    if landmarks is None and image is not None:
        _check_same_grid(labels, image)
        landmarks = estimate_landmarks(image)
    reference = sitk.Image([crop.shape[2], crop.shape[1], crop.shape[0]], sitk.sitkUInt8)
    reference.SetSpacing(labels.GetSpacing())
    reference.SetDirection(labels.GetDirection())
    reference.SetOrigin(labels.TransformIndexToPhysicalPoint([int(box[a].start) for a in (2, 1, 0)]))
    verdicts, skipped = judge_components(cc, reference, geo.image_box(labels), landmarks, config)
    messages = skipped + verdict_notes(verdicts, "post-processing")
    if any(not v.keep for v in verdicts):
        dropped = implausible_mask(cc, verdicts)
        crop[dropped] = BACKGROUND
        cc[dropped] = 0   # gone for the later rules too: a dropped blob is not "the largest" kidney
    for m in messages:
        logger.debug("%s", m)
        if notes is not None and m not in notes:
            notes.append(m)


def _keep_largest(crop: np.ndarray, cc: np.ndarray, voxel_mm3: float, config: PostprocessingConfig) -> None:
    volumes = np.bincount(cc.ravel()).astype(float) * voxel_mm3
    volumes[0] = 0.0
    order = np.argsort(-volumes[1:], kind="stable") + 1
    largest = volumes[order[0]]
    keep = np.zeros(volumes.size, dtype=bool)
    for rank, comp in enumerate(order[: config.max_kidney_components]):
        if rank == 0 or volumes[comp] >= config.min_component_fraction * largest:
            keep[comp] = True
    removed = np.flatnonzero(~keep[1:]) + 1
    if removed.size:
        logger.debug("removing %d kidney component(s) of %s mm^3", removed.size, volumes[removed].round(1).tolist())
        crop[~keep[cc]] = BACKGROUND


def _drop_detached_lesions(crop: np.ndarray, cc: np.ndarray, voxel_mm3: float) -> None:
    # A lesion region touches a kidney voxel exactly when its 26-connected component of
    # label > 0 contains one: a path to the kidney leaves the lesion region straight into kidney.
    has_kidney = np.bincount(cc[crop == KIDNEY], minlength=int(cc.max()) + 1) > 0
    has_kidney[0] = True
    detached = ~has_kidney[cc] & (crop > 0)
    if detached.any():
        logger.debug("removing %.1f mm^3 of lesion detached from the kidneys", detached.sum() * voxel_mm3)
        crop[detached] = BACKGROUND


def _relabel_low_intensity_tumors(
    crop: np.ndarray, hu: np.ndarray, voxel_mm3: float, config: PostprocessingConfig
) -> None:
    tumor = crop == TUMOR
    if not tumor.any():
        return
    cc = connected_components(tumor)
    ids = cc[tumor]
    counts = np.bincount(ids)
    sums = np.bincount(ids, weights=hu[tumor].astype(np.float64))
    low = np.zeros(counts.size, dtype=bool)
    present = counts > 0
    low[present] = sums[present] / counts[present] < config.cyst_threshold_hu
    low[0] = False
    if low.any():
        logger.debug(
            "relabelling %d tumor region(s) (%.1f mm^3) with mean < %.1f HU as %s",
            int(low.sum()), counts[low].sum() * voxel_mm3, config.cyst_threshold_hu, config.cyst_relabel_to,
        )
        crop[low[cc]] = _RELABEL_TARGETS[config.cyst_relabel_to]


def _lesion_component_rules(crop: np.ndarray, voxel_mm3: float, config: PostprocessingConfig) -> None:
    for label in (TUMOR, CYST):
        mask = crop == label
        if not mask.any():
            continue
        cc = connected_components(mask)
        volumes_ml = np.bincount(cc[mask]).astype(float) * voxel_mm3 / 1000.0
        to_kidney = np.zeros(volumes_ml.size, dtype=bool)
        if config.min_lesion_volume_ml > 0:
            to_kidney[1:] = volumes_ml[1:] < config.min_lesion_volume_ml
        if label == TUMOR and config.largest_tumor_only and volumes_ml.size > 2:
            to_kidney[1:] |= np.arange(1, volumes_ml.size) != int(np.argmax(volumes_ml[1:])) + 1
        if to_kidney.any():
            logger.debug("relabelling %d small/extra lesion component(s) of label %d as kidney", int(to_kidney.sum()), label)
            crop[to_kidney[cc] & mask] = KIDNEY


def _fill_holes(crop: np.ndarray) -> None:
    fg = crop > 0
    img = sitk.GetImageFromArray(fg.astype(np.uint8))
    # fullyConnected=False: the outside background spreads through faces only (see module doc).
    filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(img, False, 1)) > 0
    holes = filled & ~fg
    if holes.any():
        crop[holes] = KIDNEY
