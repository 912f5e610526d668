"""A batch input folder for the case-discovery tests of the library, its CLI and Slicer's batch mode.

SimpleITK writes the DICOM series (no pydicom), so the core tests can use it too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

_CT = np.full((3, 4, 5), 40, np.int16)


def write_series(folder: Path, uid: str) -> None:
    """A 3-slice DICOM CT series that GDCM lists as one series."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(_CT.shape[0]):
        image = sitk.GetImageFromArray(_CT[z])
        for key, value in {"0008|0060": "CT", "0008|0018": f"{uid}.{z + 1}", "0020|000d": f"{uid}.100",
                           "0020|000e": uid, "0020|0013": str(z + 1), "0020|0032": f"0\\0\\{2.5 * z}",
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": "2.5"}.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{z:04d}.dcm"))
        writer.Execute(image)


def write_case_tree(root: Path) -> list[tuple[str, str]]:
    """Write a folder with every kind of entry case discovery must judge; return the cases it holds
    by the library's rule as ``(path below root, case name)``, in discovery order."""
    ct = sitk.GetImageFromArray(_CT)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("b.nrrd", "a.nii.gz"):
        sitk.WriteImage(ct, str(root / name))
    (root / "notes.txt").write_text("not an image")
    (root / ".a.nii.gz.tmp-1.nii.gz").write_bytes(b"half-written")       # hidden: a temporary output
    (root / "empty").mkdir()
    write_series(root / "series_top", "1.2.826.0.1.3680043.2.1125.71")
    for i, patient in enumerate(("PAT1", "PAT2")):                       # a PACS export: patient/study/series
        write_series(root / "export" / patient / "STUDY1" / "CT", f"1.2.826.0.1.3680043.2.1125.8{i}")
    write_series(root / "export" / "PAT1" / "STUDY1" / "CT" / "localizer",  # inside a series: not searched
                  "1.2.826.0.1.3680043.2.1125.90")
    kits = root / "kits" / "case_00000"                                  # image files below the top: not cases
    kits.mkdir(parents=True)
    for name in ("imaging.nii.gz", "segmentation.nii.gz"):
        sitk.WriteImage(ct, str(kits / name))
    return [("a.nii.gz", "a"), ("b.nrrd", "b"), ("export/PAT1/STUDY1/CT", "export_PAT1_STUDY1_CT"),
            ("export/PAT2/STUDY1/CT", "export_PAT2_STUDY1_CT"), ("series_top", "series_top")]
