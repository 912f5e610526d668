"""How much a model's Dice depends on where its refinement boxes fall: the segment stages' region margin varied.

    python benchmarks/region_margin_sensitivity.py --data data/sample [--model NAME_OR_PATH] [--margins 10,15,20,25,30]
                                                   [--cases 148] [--device cpu]

A components region is the previous stage's kidney box plus ``margin_mm`` on every side; moving the margin by a few
millimetres moves every sliding window of the stage, which a well-trained network shrugs off. This prints one JSON
line per margin (the model's own margin marked) with the mean kidney and tumor Dice over the cases and each case's
tumor Dice, then one line with the spread (max - min) of the means. A number that swings by more than the difference
between two models cannot choose between them; a single case (the bundled sample) is where that bites. The package on
disk is not changed: each margin is a copy of its manifest in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def with_margin(manifest, margin_mm: float):
    """``manifest`` with every segment / overlay stage's components region at ``margin_mm`` (a new manifest)."""
    stages = []
    for stage in manifest.stages:
        if stage.role != "localize" and stage.region.kind == "components":
            stage = dataclasses.replace(stage, region=dataclasses.replace(stage.region, margin_mm=float(margin_mm)))
        stages.append(stage)
    return dataclasses.replace(manifest, stages=tuple(stages))


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    import numpy as np

    from KidneyTumorSegLib.models import ModelPackage, load_package
    from KidneyTumorSegLib.pipeline import Segmenter
    from Training.dataset import list_cases, parse_case_selection, read_case
    from Training.metrics import kits_metrics

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a labelled KiTS19-layout folder (case_XXXXX/imaging + segmentation)")
    parser.add_argument("--model", default=None, help="installed model name or package folder (default: the bundled model)")
    parser.add_argument("--margins", default="10,15,20,25,30", help="comma-separated margins in mm")
    parser.add_argument("--cases", default=None, help="case selection, e.g. 130-159 (default: all)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    margins = [float(m) for m in args.margins.split(",") if m.strip()]
    if not margins or any(m < 0 for m in margins):
        parser.error(f"--margins must be non-negative millimetres, got {args.margins!r}")
    package = load_package(args.model)
    own = sorted({s.region.margin_mm for s in package.manifest.stages
                  if s.role != "localize" and s.region.kind == "components"})
    if not own:
        parser.error(f"{package.root}: no segment stage with a components region: nothing to vary")
    cases = list_cases(Path(args.data), parse_case_selection(args.cases) if args.cases else None, need_labels=True)
    loaded = [(case.name, *read_case(case)) for case in cases]
    means = {}
    for margin in margins:
        segmenter = Segmenter(ModelPackage(package.root, with_margin(package.manifest, margin)), device=args.device)
        rows = [dict(case=name, **kits_metrics(segmenter.segment(ct).labels, truth)) for name, ct, truth in loaded]
        kidney = float(np.mean([r["kidney_dice"] for r in rows]))
        tumor = float(np.mean([r["tumor_dice"] for r in rows]))
        means[margin] = (kidney, tumor)
        print(json.dumps({"margin_mm": margin, "models_own": margin in own, "cases": len(rows),
                          "kidney_dice": round(kidney, 4), "tumor_dice": round(tumor, 4),
                          "tumor_dice_per_case": {r["case"]: round(r["tumor_dice"], 4) for r in rows}}), flush=True)
    spread = {k: round(max(v[i] for v in means.values()) - min(v[i] for v in means.values()), 4)
              for i, k in enumerate(("kidney_dice", "tumor_dice"))}
    print(json.dumps({"model": f"{package.manifest.name} {package.manifest.version}", "spread": spread}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
