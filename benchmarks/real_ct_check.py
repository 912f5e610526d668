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

The kidney region compared is every non-background label (kidney + tumor + cyst, as KiTS19 counts it); the scoring
lives in ``Training/real_ct.py``. Prints one JSON line per scan: Dice overall and per side (sides split at the midline between the two reference kidneys),
predicted tumor and cyst volume (mL), the kidneys the model reports, its notes and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    from KidneyTumorSegLib.models import load_package
    from KidneyTumorSegLib.pipeline import Segmenter
    from Training.real_ct import SCANS, check_scan

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
