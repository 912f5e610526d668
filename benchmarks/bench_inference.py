"""Inference benchmark: wall time per stage and peak memory (RSS) for large CT volumes.

    python benchmarks/bench_inference.py [--model NAME_OR_PATH] [--device cpu] [--cache DIR] [--sizes 200 600]

For each size a procedural phantom CT is synthesized once (cached in --cache) and then
segmented in a fresh subprocess, so the peak RSS reported is that of reading + segmenting +
writing alone (``resource.getrusage`` ru_maxrss of the child). Sizes:

* ``200``: 512 x 512 x 200 voxels at 0.78 x 0.78 x 2.5 mm
* ``600``: 512 x 512 x 600 voxels at 0.78 x 0.78 x 0.8 mm

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
path, model, device, out = sys.argv[1:5]
t_read = time.perf_counter()
image = read_image(path)
validate_ct_image(image)
read_s = time.perf_counter() - t_read
seg = Segmenter(load_package(None if model == "default" else model), device=device)
result = seg.segment(image)
t_write = time.perf_counter()
write_image_atomic(result.labels, out, overwrite=True)
write_s = time.perf_counter() - t_write
print(json.dumps({"read_s": read_s, "write_s": write_s, "stages_s": result.timings,
                  "wall_s": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "kidneys": len(result.stats["kidneys"]), "device": result.device}))
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
    args = parser.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for key in args.sizes:
        case = make_case(cache, key)
        out = cache / f"seg_{key}.nii.gz"
        proc = subprocess.run([sys.executable, "-c", CHILD, str(case), args.model, args.device, str(out)],
                              capture_output=True, text=True, env={**os.environ})
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update(size=key, voxels="x".join(map(str, SIZES[key][0])), spacing=SIZES[key][1])
        print(json.dumps(result))
        import SimpleITK as sitk
        import numpy as np

        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(cache / f"phantom_{key}_labels.nii.gz")))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        kd = 2 * np.logical_and(pred > 0, truth > 0).sum() / max(1, (pred > 0).sum() + (truth > 0).sum())
        td = 2 * np.logical_and(pred == 2, truth == 2).sum() / max(1, (pred == 2).sum() + (truth == 2).sum())
        stages = ", ".join(f"{k} {v:.1f}" for k, v in result["stages_s"].items() if k != "total")
        print(f"| {result['voxels']} @ {'x'.join(map(str, SIZES[key][1]))} mm | {result['stages_s']['total']:.1f} | "
              f"{result['read_s']:.1f} | {result['write_s']:.1f} | {stages} | {result['peak_rss_mb']:.0f} | {kd:.3f} / {td:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
