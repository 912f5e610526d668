"""DICOM test material: CT series written from a volume, a repaired copy of the real series."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.valuerep import DSfloat
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def _ds(values) -> list:
    """Decimal strings as DICOM allows them (at most 16 characters)."""
    return [DSfloat(float(v), auto_format=True) for v in values]


def write_ct_series(ct: sitk.Image, folder: Path, *, study_uid: str | None = None, series_uid: str | None = None,
                    patient_id: str = "KTS-PHANTOM") -> list[str]:
    """Write an int16 CT (any direction, anisotropic spacing) as a DICOM CT series, one file per slice,
    named in reverse slice order (so readers must sort by position). Returns the SOPInstanceUIDs in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    array = sitk.GetArrayFromImage(ct).astype(np.int16)
    direction = np.array(ct.GetDirection()).reshape(3, 3)
    spacing, origin = ct.GetSpacing(), np.array(ct.GetOrigin())
    study_uid, series_uid, frame_uid = study_uid or generate_uid(), series_uid or generate_uid(), generate_uid()
    uids = []
    for k in range(array.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, "Phantom^Kidney", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 1, k + 1, "phantom"
        ds.SeriesDescription = "procedural phantom"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.ImageOrientationPatient = _ds(np.r_[direction[:, 0], direction[:, 1]])
        ds.ImagePositionPatient = _ds(origin + k * spacing[2] * direction[:, 2])
        ds.PixelSpacing = _ds([spacing[1], spacing[0]])  # row spacing (y), column spacing (x)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = array[k].tobytes()
        ds.save_as(str(folder / f"slice_{array.shape[0] - k:04d}.dcm"), enforce_file_format=True)
        uids.append(ds.SOPInstanceUID)
    return uids


def repaired_copy(source: Path, folder: Path) -> list[str]:
    """Copy a DICOM series whose anonymizer blanked its UIDs, filling them in: SOP class and instance
    UIDs from each file's meta header, one new study and series UID (derived from the source, so
    stable). Pixel data, transfer syntax and geometry are kept. Returns the SOPInstanceUIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in source.iterdir() if p.is_file())
    digest = hashlib.sha256("".join(p.name for p in files).encode()).hexdigest()
    study_uid = generate_uid(entropy_srcs=["kts-study", digest])
    series_uid = generate_uid(entropy_srcs=["kts-series", digest])
    uids = []
    for path in files:
        ds = pydicom.dcmread(str(path))
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID = ds.PatientID or "KTS-REAL-CT"
        ds.save_as(str(folder / path.name), enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()
