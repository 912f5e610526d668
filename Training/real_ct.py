"""Real-CT checks: kidney Dice of a model on the real scans in ``../shared/data/real_ct`` and the lesion volume it
calls there (``benchmarks/real_ct_check.py`` is the command; ``Testing/test_real_ct.py`` holds the floors).

Scans (never part of the repository or of any training data):

* ``example_ct_sm``: a real unenhanced CT (30 slices at 3 mm around the kidneys, TotalSegmentator's test suite,
  Apache-2.0); reference = TotalSegmentator's ``kidney_right`` / ``kidney_left`` (its v2 ids 2 and 3 in
  ``example_seg_sm.nii.gz``), a model's output, not a manual annotation.
* ``ircad_1.1``: 3D-IRCADb-01 patient 1.1 (IRCAD France, CC BY-NC-ND 4.0, evaluation only), a real
  contrast-enhanced (portal-venous) CT, 512 x 512 x 129 at 0.57 x 0.57 x 1.6 mm; reference = the dataset's manual
  ``leftkidney`` / ``rightkidney`` masks. The patient has no renal tumor: every tumor or cyst voxel is a false
  positive.

The kidney region compared is every non-background label (kidney + tumor + cyst, as KiTS19 counts it).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

TS_KIDNEY_RIGHT, TS_KIDNEY_LEFT = 2, 3
SCANS = ("example_ct_sm", "ircad_1.1")


def reference_masks(scan: str, folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """``(ct path, right kidney mask, left kidney mask)`` (bool arrays (z, y, x) on the CT's grid) of a scan."""
    if scan == "example_ct_sm":
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg_sm.nii.gz")))
        return folder / "example_ct_sm.nii.gz", ref == TS_KIDNEY_RIGHT, ref == TS_KIDNEY_LEFT
    if scan == "ircad_1.1":
        d = folder / "ircad_1.1"
        right = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "rightkidney.nii.gz"))) > 0
        left = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "leftkidney.nii.gz"))) > 0
        return d / "imaging.nii.gz", right, left
    raise ValueError(f"unknown scan {scan!r}; choose from {SCANS}")


def check_scan(scan: str, folder: Path, segmenter) -> dict:
    """Segment one real scan with ``segmenter`` (a :class:`KidneyTumorSegLib.pipeline.Segmenter`) and score it."""
    from KidneyTumorSegLib.imageio import read_image
    from KidneyTumorSegLib.labels import CYST, TUMOR, voxel_volume_mm3
    from KidneyTumorSegLib.metrics import dice

    path, right, left = reference_masks(scan, folder)
    ct = read_image(path)
    t0 = time.perf_counter()
    result = segmenter.segment(ct)
    seconds = time.perf_counter() - t0
    labels = sitk.GetArrayFromImage(result.labels)
    predicted = labels > 0
    index = np.indices(labels.shape).reshape(3, -1)[::-1].T  # (x, y, z) index per voxel, array order
    matrix = np.asarray(ct.GetDirection()).reshape(3, 3) @ np.diag(ct.GetSpacing())
    lps_x = (index @ matrix.T)[:, 0].reshape(labels.shape) + ct.GetOrigin()[0]
    midline = 0.5 * (lps_x[right].mean() + lps_x[left].mean())
    on_right = lps_x < midline  # LPS: patient right is negative x
    ml = voxel_volume_mm3(result.labels) / 1000.0
    return {
        "scan": scan, "kidney_dice": round(dice(predicted, right | left), 4),
        "kidney_dice_per_side": {"right": round(dice(predicted & on_right, right), 4),
                                 "left": round(dice(predicted & ~on_right, left), 4)},
        "reference_ml": round(float((right | left).sum()) * ml, 1), "predicted_ml": round(float(predicted.sum()) * ml, 1),
        "tumor_ml": round(float((labels == TUMOR).sum()) * ml, 1), "cyst_ml": round(float((labels == CYST).sum()) * ml, 1),
        "found": [{"side": k.get("side"), "volume_ml": k.get("volume_ml")} for k in result.stats.get("kidneys", [])],
        # every lesion of at least 1 mL with the model's confidence in it (none of these patients has a renal lesion)
        "lesions": [{"kind": kind, "volume_ml": round(item["volume_ml"], 1), "confidence": item.get("confidence")}
                    for key, kind in (("tumors", "tumor"), ("cysts", "cyst"))
                    for item in result.stats.get(key, {}).get("items", []) if item["volume_ml"] >= 1.0],
        "notes": list(getattr(result, "notes", []) or result.stats.get("notes", [])), "seconds": round(seconds, 2)}
