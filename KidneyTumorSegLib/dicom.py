"""DICOM results: a Segmentation (SEG) and a TID 1500 measurement report (SR) built with highdicom.

Both are built from the source series' own datasets (highdicom copies the patient, study and
frame-of-reference attributes and every frame's position from them; nothing is hand-assembled),
so the SEG lies on the source geometry exactly: frame k of the label map is the source slice
k of the series (the order :func:`KidneyTumorSegLib.imageio.select_dicom_series` sorts the
files in and SimpleITK stacks them in).

Segments: one per label present, with the SNOMED CT codes of the Slicer module's terminology
(``KidneyTumorSeg/KidneyTumorSegHelpers/terminology.py``; a test keeps the two equal):
Kidney (Anatomical Structure / Kidney), Tumor (Morphologically Altered Structure / Mass, in the
kidney), Cyst (Morphologically Altered Structure / Cyst, in the kidney). The algorithm
identification names the model package and its version.

highdicom and pydicom are optional (``pip install "kidney-tumor-seg[dicom]"``); they are
imported only here, inside the functions, so the rest of the library never needs them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, KidneyTumorSegError, OutputError
from .labels import CYST, KIDNEY, TUMOR

logger = logging.getLogger(__name__)

#: File name ending of DICOM outputs (SEG and SR).
DICOM_SUFFIX = ".dcm"
SEG_SERIES_NUMBER = 9016
SR_SERIES_NUMBER = 9017
MANUFACTURER = "KidneyTumorSeg"

#: (scheme, value, meaning) of the SNOMED CT codes, as in the Slicer module's terminology.
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")
KIDNEY_CODE = ("SCT", "64033007", "Kidney")
MASS_CODE = ("SCT", "4147007", "Mass")
CYST_CODE = ("SCT", "367643001", "Cyst")


@dataclass(frozen=True)
class SegmentCoding:
    """How one label value becomes a DICOM segment."""

    label: int
    name: str
    category: tuple
    type: tuple
    region: tuple | None  # anatomic region (the kidney for lesions), None for the kidney itself


SEGMENT_CODINGS = (
    SegmentCoding(KIDNEY, "Kidney", ANATOMICAL_STRUCTURE, KIDNEY_CODE, None),
    SegmentCoding(TUMOR, "Tumor", MORPHOLOGICALLY_ALTERED, MASS_CODE, KIDNEY_CODE),
    SegmentCoding(CYST, "Cyst", MORPHOLOGICALLY_ALTERED, CYST_CODE, KIDNEY_CODE),
)
_CODING_BY_LABEL = {c.label: c for c in SEGMENT_CODINGS}
_CODING_BY_NAME = {c.name: c for c in SEGMENT_CODINGS}

#: attributes a SEG must copy or reference from every source image
_REQUIRED_SOURCE_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                               "FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient",
                               "PixelSpacing", "Rows", "Columns")


class DependencyError(KidneyTumorSegError):
    """An optional dependency (highdicom, dicomweb-client) is not installed."""


def require(module: str):
    """Import an optional dependency or raise DependencyError with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = {"dicomweb_client": "dicomweb-client"}.get(module.split(".")[0], module.split(".")[0])
        raise DependencyError(
            f"DICOM output needs the optional package {package}: pip install \"kidney-tumor-seg[dicom]\"") from None


def _code(triple):
    hd = require("highdicom")
    scheme, value, meaning = triple
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


# --------------------------------------------------------------------------- source series


def read_source_datasets(files: Sequence[str | os.PathLike]) -> list:
    """The source series' datasets (no pixel data), in ``files``' order, checked for what a SEG
    must reference. Raises InputError naming the missing attributes (e.g. UIDs an anonymizer
    blanked) or a mix of studies, series or frames of reference."""
    pydicom = require("pydicom")
    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(str(f), stop_before_pixels=True))
        except Exception as exc:  # pydicom raises several types for a corrupt file
            raise InputError(f"Cannot read DICOM file {f}: {exc}") from exc
    if not datasets:
        raise InputError("The DICOM series holds no files")
    missing = sorted({a for ds in datasets for a in _REQUIRED_SOURCE_ATTRIBUTES if not str(ds.get(a, "") or "").strip()})
    if missing:
        folder = Path(files[0]).parent
        raise InputError(
            f"Cannot make a DICOM SEG for the series in {folder}: its files lack {', '.join(missing)} "
            "(missing or empty; an anonymizer may have blanked them), which a SEG must reference")
    for attribute in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(attribute)) for ds in datasets}
        if len(values) > 1:
            raise InputError(f"The DICOM series mixes {len(values)} different {attribute}s; a SEG needs one")
    return datasets


def _check_geometry(labels: sitk.Image, datasets: Sequence) -> None:
    """The label map must be the series' grid: frame k on source slice k."""
    first = datasets[0]
    size = (int(first.Columns), int(first.Rows), len(datasets))
    if tuple(labels.GetSize()) != size:
        raise InputError(f"The label map's size {labels.GetSize()} is not the DICOM series' {size}")
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row_dir, col_dir = direction[:, 0], direction[:, 1]
    if not (np.allclose(row_dir, iop[:3], atol=1e-4) and np.allclose(col_dir, iop[3:], atol=1e-4)):
        raise InputError("The label map's orientation is not the DICOM series' ImageOrientationPatient")
    spacing = labels.GetSpacing()
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    origin = np.array(labels.GetOrigin())
    if np.abs(positions[0] - origin).max() > 1e-3:
        raise InputError("The label map's slices do not lie on the DICOM series: its origin is not the first "
                         "slice's ImagePositionPatient")
    along = (positions - origin) @ direction[:, 2]
    if len(along) > 1 and not np.all(np.diff(along) > 0):
        raise InputError("The label map's slices do not lie on the DICOM series: the files are not in slice order")
    expected = np.arange(len(datasets)) * spacing[2]
    if np.abs(along - expected).max() > 1e-3 + 0.01 * spacing[2]:
        # irregular slices (the reader already warned): frame k still goes on source slice k, whose
        # pixels label slice k was computed from
        logger.warning("the DICOM series' slices are irregularly spaced; each SEG frame is placed on its own source slice")


# --------------------------------------------------------------------------- SEG


def build_segmentation(labels: sitk.Image, source_datasets: Sequence, model_name: str, model_version: str):
    """A ``highdicom.seg.Segmentation`` (BINARY, one segment per label present) of ``labels``
    (uint8, 1 kidney, 2 tumor, 3 cyst) on the grid of ``source_datasets`` (from
    :func:`read_source_datasets`, slice order). When nothing was segmented the SEG holds one
    empty Kidney segment (a SEG needs at least one). Raises InputError when the grids differ."""
    hd = require("highdicom")
    from pydicom.sr.codedict import codes

    from . import __version__

    _check_geometry(labels, source_datasets)
    array = sitk.GetArrayFromImage(labels)  # (slices, rows, columns) = source frame order
    present = [int(v) for v in np.unique(array) if v != 0]
    unknown = [v for v in present if v not in _CODING_BY_LABEL]
    if unknown:
        raise InputError(f"The label map holds labels {unknown} that have no DICOM segment coding (1 kidney, 2 tumor, 3 cyst)")
    empty = not present
    if empty:  # a SEG needs at least one segment: an empty Kidney segment says "none found"
        logger.info("nothing segmented: the DICOM SEG holds one empty Kidney segment")
        present = [KIDNEY]
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name, version=model_version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    lut = np.zeros(256, dtype=np.uint8)
    descriptions = []
    for number, label in enumerate(present, start=1):
        coding = _CODING_BY_LABEL[label]
        lut[label] = number
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=coding.name,
            segmented_property_category=_code(coding.category), segmented_property_type=_code(coding.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            anatomic_regions=[_code(coding.region)] if coding.region else None))
    return hd.seg.Segmentation(
        source_images=list(source_datasets), pixel_array=lut[array],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        omit_empty_frames=not empty,  # an empty result keeps its (empty) frames; highdicom needs one at least
        manufacturer=MANUFACTURER, manufacturer_model_name=model_name[:64],
        software_versions=f"KidneyTumorSegLib {__version__}", device_serial_number="0",
        series_description=f"Kidney/tumor/cyst ({model_name} {model_version})"[:64],
        content_label="KIDNEYTUMORSEG", content_description=f"Automatic segmentation, model {model_name} {model_version}"[:64])


def segmentation_labels(seg, source_sop_instance_uids: Sequence[str]) -> np.ndarray:
    """Back from a SEG (a ``highdicom.seg.Segmentation``) to the library's label values
    (1 kidney, 2 tumor, 3 cyst), as a (slices, rows, columns) uint8 array in the order of
    ``source_sop_instance_uids`` (slices without frames are 0)."""
    numbers = {int(s.SegmentNumber): _CODING_BY_NAME[str(s.SegmentLabel)].label for s in seg.SegmentSequence}
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(source_sop_instance_uids), combine_segments=True,
        assert_missing_frames_are_empty=True)
    lut = np.zeros(256, dtype=np.uint8)
    for number, label in numbers.items():
        lut[number] = label
    return lut[np.asarray(pixels, dtype=np.uint8)]


# --------------------------------------------------------------------------- SR


def build_report(seg, stats: dict, model_name: str, model_version: str):
    """A TID 1500 measurement report (``highdicom.sr.Comprehensive3DSR``) of ``stats``
    (:func:`KidneyTumorSegLib.measurements.measure`) referencing the segments of ``seg``:
    per kidney its volume (kidney and its lesions, the JSON's ``volume_ml``), per tumor and per
    cyst its volume and largest 3D diameter. Every group references the whole segment of its
    label (the SEG has one segment per label, not one per component); the tracking identifier
    names the component (e.g. ``tumor 1, right kidney``). No kidney found: one group of the
    (empty) Kidney segment with a volume of 0 mL."""
    hd = require("highdicom")
    from pydicom.sr.codedict import codes

    number_of = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    source_series = hd.sr.SourceSeriesForSegmentation(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    ml = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
    mm = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
    laterality = {"right": codes.SCT.Right, "left": codes.SCT.Left}
    algorithm = hd.sr.AlgorithmIdentification(name=model_name, version=model_version)
    kidney_with_lesions = hd.sr.CodedConcept("KIDNEY+LESIONS", "99KTS", "Kidney including its tumors and cysts")

    def group(identifier: str, segment: str, finding, side: str, measurements):
        site = hd.sr.FindingSite(anatomic_location=_code(KIDNEY_CODE), laterality=laterality.get(side))
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=identifier),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=number_of[segment], source_series=source_series),
            finding_type=finding, finding_sites=[site], algorithm_id=algorithm, measurements=measurements)

    groups = []
    if "Kidney" in number_of:
        for kidney in stats.get("kidneys", []):
            groups.append(group(f"{kidney['side']} kidney", "Kidney", _code(KIDNEY_CODE), kidney["side"], [
                hd.sr.Measurement(name=codes.SCT.Volume, value=round(kidney["volume_ml"], 3), unit=ml,
                                  method=kidney_with_lesions, algorithm_id=algorithm)]))
        if not stats.get("kidneys"):  # TID 1500 needs a measurement group: the empty Kidney segment, 0 mL
            groups.append(group("kidney (none found)", "Kidney", _code(KIDNEY_CODE), "none", [
                hd.sr.Measurement(name=codes.SCT.Volume, value=0.0, unit=ml, algorithm_id=algorithm)]))
    for key, segment, code in (("tumors", "Tumor", MASS_CODE), ("cysts", "Cyst", CYST_CODE)):
        if segment not in number_of:
            continue
        for i, item in enumerate(stats.get(key, {}).get("items", []), start=1):
            groups.append(group(f"{segment.lower()} {i}, {item['side']} kidney", segment, _code(code), item["side"], [
                hd.sr.Measurement(name=codes.SCT.Volume, value=round(item["volume_ml"], 3), unit=ml, algorithm_id=algorithm),
                hd.sr.Measurement(name=codes.SCT.Diameter, value=round(item["max_diameter_mm"], 2), unit=mm,
                                  derivation=codes.SCT.Maximum, algorithm_id=algorithm)]))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=MANUFACTURER, model_name=f"{model_name} {model_version}"[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=[seg], content=report[0], series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        series_description=f"Kidney measurements ({model_name} {model_version})"[:64])


# --------------------------------------------------------------------------- writing


def _verify_dataset_file(tmp: Path, dataset, final: Path) -> None:
    """Read the written Part 10 file back with pydicom: it must parse completely and be the
    same instance (SOP Class/Instance UID), with all of its Pixel Data when it has any."""
    import pydicom

    problem = None
    try:
        if tmp.stat().st_size == 0:
            problem = "the file is empty"
        else:
            back = pydicom.dcmread(str(tmp))
            for keyword in ("SOPClassUID", "SOPInstanceUID"):
                if str(getattr(back, keyword, "")) != str(getattr(dataset, keyword, "")):
                    problem = f"its {keyword} reads back differently"
                    break
            if problem is None and "PixelData" in dataset:
                wanted = dataset.PixelData
                got = back.get("PixelData")
                if got is None or len(got) != len(wanted) or got != wanted:
                    problem = "its Pixel Data reads back differently"
    except Exception as exc:  # pydicom raises many types for a truncated file
        problem = f"it cannot be read back ({type(exc).__name__}: {str(exc)[:200]})"
    if problem is not None:
        raise OutputError(f"Cannot write {final}: what was written is incomplete or wrong ({problem}); "
                          "is the disk full? Any existing file is unchanged")


def write_dataset_atomic(dataset, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a DICOM dataset as a Part 10 file atomically (:func:`imageio.atomic_write`, the one
    home of that rule): the temporary file is read back with pydicom before it replaces ``path``."""
    from .imageio import atomic_write

    p = Path(path)
    if not p.name.lower().endswith(DICOM_SUFFIX):
        raise OutputError(f"Cannot write {p}: a DICOM output's name ends in {DICOM_SUFFIX}")

    def write(tmp: Path) -> None:
        dataset.save_as(str(tmp), enforce_file_format=True)

    return atomic_write(p, write, lambda tmp: _verify_dataset_file(tmp, dataset, p), overwrite=overwrite)
