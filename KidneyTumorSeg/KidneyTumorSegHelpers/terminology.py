"""Segment names, colours and standard terminology of the segmentation results (no Slicer imports).

Slicer stores a segment's terminology as one string tag (``vtkSegment.GetTerminologyEntryTagName()``)
of seven ``~``-separated parts: context, category, type, type modifier, anatomic context,
anatomic region, region modifier; each coded part is ``scheme^value^meaning`` (``^^`` when
empty). The codes are SNOMED CT codes from Slicer's terminology lists; they travel into
DICOM SEG exports unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

# Label values of the library's output label map (KidneyTumorSegLib/labels.py).
KIDNEY_LABEL = 1
TUMOR_LABEL = 2
CYST_LABEL = 3

_SLICER_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
_DICOM_TYPE_CONTEXT = "Segmentation category and type - DICOM master list"
_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

ANATOMICAL_STRUCTURE = "SCT^123037004^Anatomical Structure"
MORPHOLOGICALLY_ALTERED = "SCT^49755003^Morphologically Altered Structure"
KIDNEY = "SCT^64033007^Kidney"
MASS = "SCT^4147007^Mass"
CYST = "SCT^367643001^Cyst"
EMPTY_CODE = "^^"


def terminologyEntry(context: str, category: str, typeCode: str, typeModifier: str = EMPTY_CODE,
                     anatomicContext: str = _ANATOMIC_CONTEXT, region: str = EMPTY_CODE,
                     regionModifier: str = EMPTY_CODE) -> str:
    """Slicer's serialized terminology entry (7 parts joined by ``~``)."""
    return "~".join([context, category, typeCode, typeModifier, anatomicContext, region, regionModifier])


@dataclass(frozen=True)
class SegmentSpec:
    """How one label becomes a segment: its label value, name, colour (0-1 RGB) and terminology."""

    label: int
    name: str
    color: Tuple[float, float, float]
    terminology: str


def _rgb(r: int, g: int, b: int) -> Tuple[float, float, float]:
    return (r / 255.0, g / 255.0, b / 255.0)


#: Kidney: colour of Kidney in Slicer's General Anatomy list. Both kidneys are one label, so
#: no laterality modifier (the results table gives each side's volume).
KIDNEY_SEGMENT = SegmentSpec(KIDNEY_LABEL, "Kidney", _rgb(185, 102, 83),
                             terminologyEntry(_SLICER_ANATOMY_CONTEXT, ANATOMICAL_STRUCTURE, KIDNEY))
#: Tumor: KiTS "tumor" is a renal mass (malignant or benign); Mass in the kidney, with the
#: colour Slicer's list recommends for Mass.
TUMOR_SEGMENT = SegmentSpec(TUMOR_LABEL, "Tumor", _rgb(144, 238, 144),
                            terminologyEntry(_SLICER_ANATOMY_CONTEXT, MORPHOLOGICALLY_ALTERED, MASS,
                                             region=KIDNEY))
#: Cyst in the kidney; a fluid-like blue chosen to stand apart from kidney and tumor.
CYST_SEGMENT = SegmentSpec(CYST_LABEL, "Cyst", _rgb(90, 160, 230),
                           terminologyEntry(_DICOM_TYPE_CONTEXT, MORPHOLOGICALLY_ALTERED, CYST,
                                            region=KIDNEY))

ALL_SEGMENTS = (KIDNEY_SEGMENT, TUMOR_SEGMENT, CYST_SEGMENT)
SEGMENT_NAMES = tuple(spec.name for spec in ALL_SEGMENTS)


def segmentPlan(modelHasCyst: bool, cystAsSegment: bool) -> Dict[SegmentSpec, Tuple[int, ...]]:
    """Which label values go into which segment.

    Kidney and Tumor always exist (an empty Tumor segment is still created, ready for the
    radiologist to paint a missed lesion). Cyst gets its own segment only when the model
    predicts cysts and the user asked for it; otherwise cyst voxels stay part of the Kidney
    segment, since a renal cyst is kidney tissue, not tumor.
    """
    if modelHasCyst and cystAsSegment:
        return {KIDNEY_SEGMENT: (KIDNEY_LABEL,), TUMOR_SEGMENT: (TUMOR_LABEL,), CYST_SEGMENT: (CYST_LABEL,)}
    return {KIDNEY_SEGMENT: (KIDNEY_LABEL, CYST_LABEL), TUMOR_SEGMENT: (TUMOR_LABEL,)}


def parseTerminologyEntry(entry: str) -> Dict[str, str]:
    """Split a serialized entry into its named parts (for display and tests)."""
    parts = entry.split("~")
    if len(parts) != 7:
        raise ValueError(f"a terminology entry has 7 '~'-separated parts; got {len(parts)} in {entry!r}")
    keys = ("context", "category", "type", "typeModifier", "anatomicContext", "region", "regionModifier")
    return dict(zip(keys, parts))
