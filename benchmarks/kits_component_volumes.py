"""Real kidney component volumes and sizes from the KiTS23 label maps: what the plausibility defaults must keep.

    python benchmarks/kits_component_volumes.py [--labels ../shared/data/kits23_labels] [--json out.json]

For every ``case_*/segmentation.nii.gz`` (0 background, 1 kidney, 2 tumor, 3 cyst, on the real CT grid),
the 26-connected components of ``label > 0`` (kidney with its lesions, as the library's plausibility rules
see them): volume (mL), whether the component touches the image border (cut by the field of view),
its extent along the canonical (x, y, z) axes (mm) and its centroid (LPS mm). Kidney components are those
of >= 1 mL (the rest are annotation fragments, all under 0.5 mL in KiTS23). Prints the volume distribution, the extremes and half the left-right distance
between the two kidney centroids (the spine is not in a label map; it lies about midway).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]


def components(path: Path) -> list[dict]:
    from KidneyTumorSegLib import geometry as geo
    from KidneyTumorSegLib.labels import voxel_volume_mm3

    img = sitk.ReadImage(str(path))
    cc = sitk.ConnectedComponent(sitk.Cast(img > 0, sitk.sitkUInt8), True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(cc)
    ml = voxel_volume_mm3(img) / 1000.0
    size = img.GetSize()
    out = []
    for c in stats.GetLabels():
        bb = stats.GetBoundingBox(c)
        lo, hi = bb[:3], tuple(bb[k] + bb[k + 3] - 1 for k in range(3))
        out.append({"ml": stats.GetNumberOfPixels(c) * ml, "centroid_lps": list(stats.GetCentroid(c)),
                    "border": any(lo[k] == 0 or hi[k] == size[k] - 1 for k in range(3)),
                    "extent_mm": list(geo.index_box_to_box(img, lo, hi).size_mm)})
    return out


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", default=str(REPO.parent / "shared" / "data" / "kits23_labels"))
    parser.add_argument("--json", default=None, help="also write every component here")
    args = parser.parse_args(argv)
    rows = []
    for path in sorted(Path(args.labels).glob("case_*/segmentation.nii.gz")):
        rows.append({"case": path.parent.name, "components": components(path)})
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    kidneys, fragments, half_distance = [], [], []
    for r in rows:
        kept = [c for c in r["components"] if c["ml"] >= 1.0]
        kidneys += [dict(c, case=r["case"]) for c in kept]
        fragments += [c for c in r["components"] if c["ml"] < 1.0]
        if len(kept) == 2:
            half_distance.append(abs(kept[0]["centroid_lps"][0] - kept[1]["centroid_lps"][0]) / 2)
    v = np.array([c["ml"] for c in kidneys])
    cut = np.array([c["border"] for c in kidneys])
    ext = np.array([c["extent_mm"] for c in kidneys])
    q = np.percentile(v, [1, 5, 25, 50, 75, 95, 99])
    print(f"{len(rows)} cases, {len(kidneys)} kidney components ({int(cut.sum())} cut by the field of view), "
          f"{len(fragments)} fragments (largest {max((c['ml'] for c in fragments), default=0):.2f} mL)")
    print("kidney + lesion volume (mL): min {:.1f}, p1 {:.1f}, p5 {:.1f}, p25 {:.1f}, median {:.1f}, p75 {:.1f}, p95 {:.1f}, "
          "p99 {:.1f}, max {:.1f}; smallest not cut by the field of view {:.1f}".format(v.min(), *q, v.max(), v[~cut].min()))
    big = max(kidneys, key=lambda c: c["ml"])
    print(f"largest: {big['case']} {big['ml']:.0f} mL; extent (x, y, z) max {np.round(ext.max(axis=0)).tolist()} mm, "
          f"p99 {np.round(np.percentile(ext, 99, axis=0)).tolist()} mm")
    per_case = [sorted((c["ml"] for c in kidneys if c["case"] == r["case"]), reverse=True) for r in rows]
    small_second = sum(1 for p in per_case if len(p) > 1 and p[1] < 0.1 * p[0])
    print(f"cases with 1 / 2 / more kidney components: {sum(len(p) == 1 for p in per_case)} / {sum(len(p) == 2 for p in per_case)} / "
          f"{sum(len(p) > 2 for p in per_case)}; second kidney under 10 % of the first: {small_second}")
    h = np.array(half_distance)
    print(f"{h.size} two-kidney cases: half the left-right centroid distance min {h.min():.0f}, p1 {np.percentile(h, 1):.0f}, "
          f"median {np.median(h):.0f}, p99 {np.percentile(h, 99):.0f}, max {h.max():.0f} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
