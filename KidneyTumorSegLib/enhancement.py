"""A warning for scans that do not look contrast-enhanced: the models here are made for
contrast-enhanced CT, and an unenhanced scan gives plausible-looking but wrong labels."""

from __future__ import annotations

from typing import Optional

import numpy as np
import SimpleITK as sitk

from .labels import LABEL_VALUES, connected_components, label_bounding_box, voxel_volume_mm3

#: below this median HU the segmented kidney parenchyma does not look contrast-enhanced (enhanced
#: parenchyma is about 120-250 HU in the arterial to nephrographic phases, unenhanced about 20-40 HU)
ENHANCED_KIDNEY_MIN_HU = 80.0
#: the parenchyma alone is judged when at least this much of it was segmented (mL)
_PARENCHYMA_MIN_ML = 1.0
#: a segmented kidney at least this fraction tumor is judged by its tumor voxels' median HU, which
#: is under this value when unenhanced (solid renal tumors enhance to about 50-150 HU; unenhanced
#: kidney is 20-40 HU, and a model shown one tends to call it a lesion)
_LESION_DOMINATED_FRACTION = 0.75
ENHANCED_LESION_MIN_HU = 30.0


def enhancement_note(image: sitk.Image, labels: sitk.Image) -> Optional[str]:
    """A warning when the segmented kidneys do not look contrast-enhanced (the models here are made
    for contrast-enhanced CT), else None. ``image``: the CT in HU; ``labels``: the label map on its grid.
    Judged on the kidney parenchyma (label 1), or on kidney + lesions when under 1 mL of parenchyma
    was found; and on each segmented kidney (26-connected region of labels > 0) that is mostly
    tumor, by its tumor voxels: a model confused by an unenhanced scan tends to call a kidney a
    lesion, and leaves the parenchyma label to some other bright structure."""
    lab = sitk.GetArrayViewFromImage(labels)
    box = label_bounding_box(lab)
    if box is None:
        return None
    # everything below works inside the labels' bounding box: no full-volume temporaries
    lab = lab[box]
    hu = sitk.GetArrayViewFromImage(image)[box]
    voxel_ml = voxel_volume_mm3(image) / 1000.0
    region = lab == LABEL_VALUES["kidney"]
    if region.sum() * voxel_ml < _PARENCHYMA_MIN_ML:
        region = lab > 0
    median = float(np.median(hu[region]))
    if median < ENHANCED_KIDNEY_MIN_HU:
        return (f"the segmented kidneys have a median of {median:.0f} HU: this does not look like a contrast-enhanced scan "
                f"(expected over {ENHANCED_KIDNEY_MIN_HU:.0f} HU); the model is made for contrast-enhanced CT, so check the "
                "result with particular care")
    return _lesion_dominated_note(lab, hu, voxel_ml)


def _lesion_dominated_note(lab: np.ndarray, hu: np.ndarray, voxel_ml: float) -> Optional[str]:
    """The warning for a segmented kidney that is mostly 'tumor' of unenhanced density, or None."""
    components = connected_components(lab > 0)
    counts = np.bincount(components.ravel())
    tumor = lab == LABEL_VALUES["tumor"]
    tumor_counts = np.bincount(components[tumor], minlength=counts.size)
    for comp in np.flatnonzero(tumor_counts >= _LESION_DOMINATED_FRACTION * counts):
        if comp == 0 or counts[comp] * voxel_ml < _PARENCHYMA_MIN_ML:
            continue
        median = float(np.median(hu[tumor & (components == comp)]))
        if median < ENHANCED_LESION_MIN_HU:
            return (f"a segmented kidney of {counts[comp] * voxel_ml:.0f} mL is almost all 'tumor' with a median of "
                    f"{median:.0f} HU, less than an enhancing tumor has (over {ENHANCED_LESION_MIN_HU:.0f} HU): this may "
                    "be an unenhanced scan; the model is made for contrast-enhanced CT, so check the result with particular "
                    "care")
    return None
