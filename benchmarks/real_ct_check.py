"""How a model does on a real CT: kidney Dice against TotalSegmentator's kidney masks.

    python benchmarks/real_ct_check.py [--model NAME_OR_PATH] [--device cpu] [--shared ../shared]

Segments ``real_ct/example_ct_sm.nii.gz`` (a real CT, 30 slices at 3 mm around the kidneys, from the
TotalSegmentator test suite) and compares the kidney region (kidney + tumor + cyst labels) with
TotalSegmentator's ``kidney_left`` + ``kidney_right`` (``example_seg_sm.nii.gz``, its v2 ids 2 and 3).
That reference is a model's output, not a manual annotation, and the CT has no tumor: this is a
transfer check of the kidney only. Prints one JSON line: Dice overall and per side, voxel counts,
what the model found (kidneys, lesions) and the seconds taken.
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


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    from KidneyTumorSegLib.imageio import read_image
    from KidneyTumorSegLib.models import load_package
    from KidneyTumorSegLib.pipeline import Segmenter
    from Training.metrics import dice

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="installed model name or package folder (default: the bundled model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shared", default=str(REPO.parent / "shared"), help="the project's shared folder")
    args = parser.parse_args(argv)
    folder = Path(args.shared) / "data" / "real_ct"
    ct = read_image(folder / "example_ct_sm.nii.gz")
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg_sm.nii.gz")))
    package = load_package(args.model)
    t0 = time.perf_counter()
    result = Segmenter(package, device=args.device).segment(ct)
    seconds = time.perf_counter() - t0
    labels = sitk.GetArrayFromImage(result.labels)
    predicted = labels > 0
    truth = np.isin(reference, (TS_KIDNEY_RIGHT, TS_KIDNEY_LEFT))
    # sides split at the midline between the two reference kidneys (patient x, LPS)
    sides = {"right": reference == TS_KIDNEY_RIGHT, "left": reference == TS_KIDNEY_LEFT}
    index = np.indices(labels.shape).reshape(3, -1)[::-1].T  # (x, y, z) index per voxel, array order
    matrix = np.asarray(ct.GetDirection()).reshape(3, 3) @ np.diag(ct.GetSpacing())
    lps_x = (index @ matrix.T)[:, 0].reshape(labels.shape) + ct.GetOrigin()[0]
    midline = 0.5 * (lps_x[sides["right"]].mean() + lps_x[sides["left"]].mean())
    on_right = lps_x < midline  # LPS: patient right is negative x
    per_side = {name: dice(predicted & (on_right if name == "right" else ~on_right), sides[name]) for name in sides}
    print(json.dumps({
        "model": f"{package.manifest.name} {package.manifest.version}", "device": result.device,
        "kidney_dice": round(dice(predicted, truth), 4), "kidney_dice_per_side": {k: round(v, 4) for k, v in per_side.items()},
        "voxels": {"reference": int(truth.sum()), "predicted": int(predicted.sum()),
                   "predicted_lesion": int(np.isin(labels, (2, 3)).sum())},
        "found": [{"side": k.get("side"), "volume_ml": k.get("volume_ml")} for k in result.stats.get("kidneys", [])],
        "seconds": round(seconds, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
