"""How a model does on real CT: kidney Dice against reference kidney masks, and the lesion volume it calls.

    python benchmarks/real_ct_check.py [--scan all|example_ct_sm|ircad_1.1] [--model NAME_OR_PATH] [--device cpu]
                                       [--tta] [--shared ../shared]

Scans (in ``../shared/data/real_ct``, never part of the repository or of any training data):

* ``example_ct_sm``: a real unenhanced CT (30 slices at 3 mm around the kidneys, TotalSegmentator's test suite,
  Apache-2.0); reference = TotalSegmentator's ``kidney_right`` / ``kidney_left`` (its v2 ids 2 and 3 in
  ``example_seg_sm.nii.gz``), a model's output, not a manual annotation.
* ``ircad_1.1``: 3D-IRCADb-01 patient 1.1 (IRCAD France, CC BY-NC-ND 4.0, evaluation only), a real
  contrast-enhanced (portal-venous) CT, 512 x 512 x 129 at 0.57 x 0.57 x 1.6 mm; reference = the dataset's manual
  ``leftkidney`` / ``rightkidney`` masks. The patient has no renal tumor: every tumor or cyst voxel is a false
  positive.

The kidney region compared is every non-background label (kidney + tumor + cyst, as KiTS19 counts it). Prints one
JSON line per scan: Dice overall and per side (sides split at the midline between the two reference kidneys),
predicted tumor and cyst volume (mL), the kidneys the model reports, its notes and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
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
    from Training.metrics import dice

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
        "notes": list(getattr(result, "notes", []) or result.stats.get("notes", [])), "seconds": round(seconds, 2)}


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    from KidneyTumorSegLib.models import load_package
    from KidneyTumorSegLib.pipeline import Segmenter

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan", default="all", choices=("all",) + SCANS)
    parser.add_argument("--model", default=None, help="installed model name or package folder (default: the bundled model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tta", action="store_true", help="test-time mirroring")
    parser.add_argument("--shared", default=str(REPO.parent / "shared"), help="the project's shared folder")
    args = parser.parse_args(argv)
    folder = Path(args.shared) / "data" / "real_ct"
    package = load_package(args.model)
    segmenter = Segmenter(package, device=args.device, tta=args.tta)
    for scan in SCANS if args.scan == "all" else (args.scan,):
        row = check_scan(scan, folder, segmenter)
        print(json.dumps(dict(row, model=f"{package.manifest.name} {package.manifest.version}", tta=args.tta)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
