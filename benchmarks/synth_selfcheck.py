"""How a model does on CT made by the training synthesizer itself, from real label maps it was not trained on.

    python benchmarks/synth_selfcheck.py --labels ../shared/data/kits23_labels --cases 130,406,412,418
                                         [--model NAME_OR_PATH] [--phase venous] [--seeds 1,2] [--device cpu]

Each case's KiTS label map is resampled (nearest neighbour) to 1.6 x 1.6 x 2.5 mm on its closest-to-LPS grid, given a
body by ``Training.synth.tissue_map`` (seeded by the case id) and turned into HU by ``TissueSynthesizer`` with the
named phase's priors (no fully random contrast; lesions kept 25 HU from the parenchyma, as ``synth_context`` trains)
once per seed. The model segments that CT through the library, and Dice is taken against the label map.

This is an in-domain ceiling, not an accuracy: a synthesis-trained network that misses tumors here has not learned
them at all, while one that finds them here and misses them elsewhere meets a domain gap. Use held-out patients
only (``synth_context``'s training cases are KiTS23 0-129, 210-299, 430-588). Prints one JSON line per case and seed,
then one with the means.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPACING_MM = (1.6, 1.6, 2.5)  # (x, y, z)


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    import numpy as np
    import SimpleITK as sitk
    import torch

    from KidneyTumorSegLib.labels import KIDNEY, TUMOR
    from KidneyTumorSegLib.metrics import dice
    from KidneyTumorSegLib.models import load_package
    from KidneyTumorSegLib.pipeline import Segmenter
    from Training.dataset import LABELS_NAME, list_cases, parse_case_selection, read_labels
    from Training.phantom_anatomy import Grid
    from Training.synth import PHASES, TissueSynthesizer, case_frame, tissue_map

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=Path, required=True, help="folder of case_XXXXX/segmentation.nii.gz")
    parser.add_argument("--cases", required=True, help="case numbers, e.g. 130,406-412 (held-out patients)")
    parser.add_argument("--model", default=None, help="installed model name or package folder (default: the bundled model)")
    parser.add_argument("--phase", default="venous", choices=list(PHASES))
    parser.add_argument("--seeds", default="1,2", help="comma-separated intensity seeds per case")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    segmenter = Segmenter(load_package(args.model), device=args.device)
    # window (-1024, 3071) with centre 0 and scale 1: the synthesizer's output is HU itself
    synthesizer = TissueSynthesizer({"random_probability": 0.0, "phases": [args.phase], "lesion_contrast_hu": 25.0},
                                    (-1024.0, 3071.0, 0.0, 1.0))
    rows = []
    for entry in list_cases(args.labels, parse_case_selection(args.cases), image_name=LABELS_NAME):
        case = entry.number
        labels = read_labels(entry)
        lps = sitk.DICOMOrient(labels, "LPS")
        size = [max(1, int(round(n * s / t))) for n, s, t in zip(lps.GetSize(), lps.GetSpacing(), SPACING_MM)]
        grid_img = sitk.Resample(lps, size, sitk.Transform(), sitk.sitkNearestNeighbor, lps.GetOrigin(), SPACING_MM,
                                 lps.GetDirection(), 0, sitk.sitkUInt8)
        truth = sitk.GetArrayFromImage(grid_img)
        grid = Grid(tuple(grid_img.GetSize()), SPACING_MM, tuple(grid_img.GetOrigin()), tuple(grid_img.GetDirection()))
        tissues = tissue_map(truth, grid, case_frame(labels), np.random.default_rng(case))
        for seed in (int(s) for s in args.seeds.split(",")):
            hu = synthesizer(torch.from_numpy(tissues[None, None].astype(np.float32)),
                             torch.Generator().manual_seed(seed))[0, 0].numpy()
            ct = sitk.GetImageFromArray(np.round(hu).astype(np.int16))
            ct.CopyInformation(grid_img)
            out = sitk.GetArrayFromImage(segmenter.segment(ct).labels)
            ml = float(np.prod(SPACING_MM)) / 1000.0
            row = {"case": case, "seed": seed, "phase": args.phase,
                   "kidney_dice": round(float(dice(out > 0, truth > 0)), 4),
                   "tumor_dice": round(float(dice(out == TUMOR, truth == TUMOR)), 4) if (truth == TUMOR).any() else None,
                   "true_tumor_ml": round(float((truth == TUMOR).sum()) * ml, 1),
                   "called_tumor_ml": round(float((out == TUMOR).sum()) * ml, 1),
                   "true_kidney_ml": round(float((truth == KIDNEY).sum()) * ml, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    def mean(key):
        values = [r[key] for r in rows if r[key] is not None]
        return round(sum(values) / len(values), 4) if values else None

    print(json.dumps({"model": args.model or "default", "n": len(rows), "kidney_dice": mean("kidney_dice"),
                      "tumor_dice": mean("tumor_dice")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
