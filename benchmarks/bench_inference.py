"""Inference benchmark: wall time per stage and peak memory (RSS) for large CT volumes.

    python benchmarks/bench_inference.py [--model NAME_OR_PATH] [--device cpu] [--cache DIR] [--sizes 200 600]
        [--coarse-everywhere] [--variant bundled|no-plausibility|unbounded]

For each size a procedural phantom CT is synthesized once (cached in --cache) and then
segmented in a fresh subprocess, so the peak RSS reported is that of reading + segmenting +
writing alone (``resource.getrusage`` ru_maxrss of the child). Sizes:

* ``200``: 512 x 512 x 200 voxels at 0.78 x 0.78 x 2.5 mm
* ``600``: 512 x 512 x 600 voxels at 0.78 x 0.78 x 0.8 mm

``--coarse-everywhere``: the "coarse stage fires everywhere" case - the localize stage's networks are
replaced by a predictor that calls every voxel inside the body (> -500 HU) kidney, as a model that
mistakes the liver, bowel and the rest of the abdomen for kidney would. ``--variant`` runs the model's
manifest as it is (``bundled``), with the plausibility rules off (``no-plausibility``: only the
``max_size_mm`` bound on the fine stage's regions is left), or with both off (``unbounded``: the
library before region bounds and plausibility existed).

Prints one JSON line per size and a Markdown table row to paste into benchmarks/README.md.
Timings on shared 2-core machines vary by up to 2x between runs: compare runs made side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "200": ((512, 512, 200), (0.78, 0.78, 2.5)),
    "600": ((512, 512, 600), (0.78, 0.78, 0.8)),
}

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import SimpleITK as sitk
from KidneyTumorSegLib.imageio import read_image, write_image_atomic
from KidneyTumorSegLib.models import load_package
from KidneyTumorSegLib.pipeline import Segmenter
from KidneyTumorSegLib.validation import validate_ct_image
path, model, device, out, everywhere, variant = sys.argv[1:7]
t_read = time.perf_counter()
image = read_image(path)
validate_ct_image(image)
read_s = time.perf_counter() - t_read
package = load_package(None if model == "default" else model)
if variant != "bundled":
    import dataclasses as dc
    from KidneyTumorSegLib.models import ModelPackage
    m = package.manifest
    stages = []
    for s in m.stages:
        r = s.region
        if r.kind == "components":
            r = dc.replace(r, plausibility=dc.replace(r.plausibility, enabled=False),
                           max_size_mm=(1e5, 1e5, 1e5) if variant == "unbounded" else r.max_size_mm)
        stages.append(dc.replace(s, region=r))
    post = dc.replace(m.postprocessing, plausibility=dc.replace(m.postprocessing.plausibility, enabled=False))
    package = ModelPackage(package.root, dc.replace(m, stages=tuple(stages), postprocessing=post))
if everywhere == "1":
    import torch
    original = Segmenter._predictor

    def body_is_kidney_predictor(self, stage):
        if stage.role != "localize":
            return original(self, stage)
        threshold = float(stage.normalization.normalized_value(-500.0))

        def predict(x):
            body = (x[:, :1] > threshold).float()
            return torch.cat([1.0 - body, body], dim=1)
        return predict

    Segmenter._predictor = body_is_kidney_predictor
seg = Segmenter(package, device=device)
result = seg.segment(image)
t_write = time.perf_counter()
write_image_atomic(result.labels, out, overwrite=True)
write_s = time.perf_counter() - t_write
print(json.dumps({"read_s": read_s, "write_s": write_s, "stages_s": result.timings,
                  "wall_s": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "kidneys": len(result.stats["kidneys"]), "device": result.device, "notes": result.notes}))
"""


def make_case(cache: Path, key: str) -> Path:
    size, spacing = SIZES[key]
    path = cache / f"phantom_{key}.nii.gz"
    if not path.exists():
        from Training.phantoms import procedural_phantom

        import SimpleITK as sitk

        t0 = time.perf_counter()
        ct, labels = procedural_phantom(size, spacing, seed=4242, kidneys="both", tumors=1, cysts=1)
        sitk.WriteImage(ct, str(path), useCompression=True)
        sitk.WriteImage(labels, str(cache / f"phantom_{key}_labels.nii.gz"), useCompression=True)
        print(f"synthesized {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "kidney-tumor-seg-bench"))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--coarse-everywhere", action="store_true",
                        help="replace the localize stage by a predictor that calls the whole body kidney")
    parser.add_argument("--variant", default="bundled", choices=("bundled", "no-plausibility", "unbounded"),
                        help="the manifest as it is, without plausibility, or without plausibility and region bounds")
    args = parser.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for key in args.sizes:
        case = make_case(cache, key)
        out = cache / f"seg_{key}.nii.gz"
        proc = subprocess.run([sys.executable, "-c", CHILD, str(case), args.model, args.device, str(out),
                               "1" if args.coarse_everywhere else "0", args.variant],
                              capture_output=True, text=True, env={**os.environ})
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update(size=key, voxels="x".join(map(str, SIZES[key][0])), spacing=SIZES[key][1],
                      coarse_everywhere=args.coarse_everywhere, variant=args.variant)
        print(json.dumps(result))
        import SimpleITK as sitk

        from KidneyTumorSegLib.metrics import kits_dice

        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(cache / f"phantom_{key}_labels.nii.gz")))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        scores = kits_dice(pred, truth)
        kd, td = scores["kidney_dice"], scores["tumor_dice"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in result["stages_s"].items() if k != "total")
        print(f"| {result['voxels']} @ {'x'.join(map(str, SIZES[key][1]))} mm | {result['stages_s']['total']:.1f} | "
              f"{result['read_s']:.1f} | {result['write_s']:.1f} | {stages} | {result['peak_rss_mb']:.0f} | {kd:.3f} / {td:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
