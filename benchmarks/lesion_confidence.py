"""How well a model's lesion confidence tells its true lesions from its false ones, per source.

    python benchmarks/lesion_confidence.py [--model NAME_OR_PATH] [--sources own,valgen,ircad_1.1,example_ct_sm]
                                           [--min-ml 10] [--thresholds 0.65,0.7,0.75,0.8]
                                           [--valgen data/valgen] [--own data/phantoms_val] [--shared ../shared]

Every lesion (tumor or cyst component, as ``measurements`` counts them) the model calls on each source gets its
``confidence`` (the mean lesion probability over it, from the library's own result) and is scored against the
source's reference: **true** when at least half of it lies in a reference lesion, **false** when under a tenth
does (in between: counted apart, as "partial"). The real scans' references hold kidneys only; the patients have no
renal lesion, so every lesion called there is false. Prints one JSON line per lesion of at least ``--min-ml``,
then, per threshold, how many true / false lesions of at least ``--min-ml`` fall under it (would get the
"unsure" note of the manifest's ``lesion_confidence_note_below``). Sources and the commands that build the phantom
folders are ``per_source.py``'s; full library inference, no TTA.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from per_source import OWN_CASES, REAL_SCANS, parse_sources, source_folders  # noqa: E402  (the benchmarks folder is no package)

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("own", "valgen", *REAL_SCANS)
#: a lesion with at least this fraction in a reference lesion is true, under ``FALSE_BELOW`` false
TRUE_FROM, FALSE_BELOW = 0.5, 0.1


def lesion_rows(labels, reference_lesion, stats: dict, voxel_ml: float) -> list:
    """One dict per lesion of ``stats`` (``measure``'s, of ``labels``): volume_ml, confidence, kind (tumor / cyst)
    and ``in_reference`` (the fraction of its voxels where ``reference_lesion``, a bool (z, y, x) array, holds).

    The components are found again as ``measurements`` finds them (26-connected, same order) and checked against
    its items' volumes, so a lesion is never paired with another's confidence."""
    import numpy as np

    from KidneyTumorSegLib.labels import CYST, TUMOR, connected_components

    rows = []
    for value, key, kind in ((TUMOR, "tumors", "tumor"), (CYST, "cysts", "cyst")):
        items = stats[key]["items"]
        cc = connected_components(labels == value)
        counts = np.bincount(cc.ravel())[1:]
        inside = np.bincount(cc.ravel(), weights=reference_lesion.ravel(), minlength=len(counts) + 1)[1:]
        order = sorted(range(len(counts)), key=lambda i: -counts[i])  # measure's stable largest-first order
        if len(order) != len(items):
            raise RuntimeError(f"{kind}: {len(order)} components but {len(items)} measured items")
        for i, item in zip(order, items):
            if abs(counts[i] * voxel_ml - item["volume_ml"]) > 1e-6 * max(1.0, item["volume_ml"]):
                raise RuntimeError(f"{kind}: component of {counts[i] * voxel_ml} mL paired with an item of "
                                   f"{item['volume_ml']} mL")
            rows.append({"kind": kind, "volume_ml": round(item["volume_ml"], 2), "confidence": item["confidence"],
                         "in_reference": round(float(inside[i] / counts[i]), 3)})
    return rows


def flag_table(rows: list, thresholds, min_ml: float) -> list:
    """Per threshold: {threshold, true: [flagged, of], false: [flagged, of]} over the lesions of ``rows`` (dicts
    with volume_ml, confidence, in_reference) of at least ``min_ml``; flagged = confidence under the threshold."""
    big = [r for r in rows if r["volume_ml"] >= min_ml]
    true = [r for r in big if r["in_reference"] >= TRUE_FROM]
    false = [r for r in big if r["in_reference"] < FALSE_BELOW]
    return [{"threshold": t, "true": [sum(r["confidence"] < t for r in true), len(true)],
             "false": [sum(r["confidence"] < t for r in false), len(false)]} for t in thresholds]


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    import numpy as np
    import SimpleITK as sitk

    from KidneyTumorSegLib.imageio import read_image
    from KidneyTumorSegLib.labels import voxel_volume_mm3
    from KidneyTumorSegLib.models import load_package
    from KidneyTumorSegLib.pipeline import Segmenter
    from Training.dataset import list_cases, read_case
    from Training.real_ct import reference_masks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="installed model name or package folder (default: the bundled model)")
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--min-ml", type=float, default=10.0, help="lesions from this volume up are listed and counted")
    parser.add_argument("--thresholds", default="0.65,0.7,0.75,0.8")
    parser.add_argument("--valgen", default="data/valgen")
    parser.add_argument("--own", default="data/phantoms_val")
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        sources = parse_sources(args.sources, SOURCES)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        thresholds = [float(t) for t in args.thresholds.split(",")]
    except ValueError:
        parser.error(f"--thresholds must be comma-separated numbers, got {args.thresholds!r}")
    folders, real_ct = source_folders(parser, sources, args.valgen, args.own, args.shared)

    segmenter = Segmenter(load_package(args.model), device=args.device)
    every = []
    for name in sources:
        if name in REAL_SCANS:
            path, right, left = reference_masks(name, real_ct)
            scans = [(name, read_image(path), np.zeros(right.shape, bool))]  # kidneys only: no reference lesion
        else:
            cases = list_cases(folders[name], OWN_CASES if name == "own" else None)
            scans = []
            for case in cases:
                ct, truth = read_case(case)
                scans.append((f"{name}/{case.name}", ct, sitk.GetArrayViewFromImage(truth) >= 2))
        for scan, ct, reference_lesion in scans:
            result = segmenter.segment(ct)
            labels = sitk.GetArrayFromImage(result.labels)
            for row in lesion_rows(labels, reference_lesion, result.stats, voxel_volume_mm3(result.labels) / 1000.0):
                row = {"source": name, "scan": scan, **row}
                every.append(row)
                if row["volume_ml"] >= args.min_ml:
                    print(json.dumps(row), flush=True)
    for name in sources:
        for line in flag_table([r for r in every if r["source"] == name], thresholds, args.min_ml):
            print(json.dumps({"source": name, "min_ml": args.min_ml, **line}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
