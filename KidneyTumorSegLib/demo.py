"""``kidney-tumor-seg demo``: segment the bundled sample CT with the bundled default model.

Writes the label map, the measurements (JSON) and a PNG overview into the output folder
and prints the measurements and the Dice against the sample's known truth, so a first run
shows the whole chain working on something real.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import SimpleITK as sitk

from .metrics import kits_dice

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLE_CT = DATA_DIR / "sample_ct.nii.gz"
SAMPLE_TRUTH = DATA_DIR / "sample_labels.nii.gz"

logger = logging.getLogger(__name__)


def run_demo(output: Path, device: str = "auto", overwrite: bool = False) -> int:
    """Segment the bundled sample; returns the exit code."""
    from .errors import InputError
    from .imageio import check_output_writable, read_image, write_image_atomic, write_json_atomic
    from .measurements import summarize
    from .models import load_package
    from .overview import write_overview_png
    from .pipeline import Segmenter
    from .runcontrol import ProgressPrinter

    if not SAMPLE_CT.is_file():
        raise InputError(f"the bundled sample CT is missing: {SAMPLE_CT} (reinstall kidney-tumor-seg)")
    output = Path(output)
    seg_path, stats_path, png_path = output / "sample_seg.nii.gz", output / "sample_stats.json", output / "sample_overview.png"
    for path in (seg_path, stats_path, png_path):
        check_output_writable(path, overwrite)
    ct = read_image(SAMPLE_CT)
    truth = read_image(SAMPLE_TRUTH)
    package = load_package(None)
    print(f"model: {package.manifest.name} {package.manifest.version} - {package.manifest.intended_use}")
    result = Segmenter(package, device=device).segment(ct, progress=ProgressPrinter("bar"))
    write_image_atomic(result.labels, seg_path, overwrite=overwrite)
    metrics = kits_dice(sitk.GetArrayViewFromImage(result.labels), sitk.GetArrayViewFromImage(truth))
    write_json_atomic({"input": str(SAMPLE_CT), "model": result.model_name, "device": result.device,
                        "timings_s": result.timings, "notes": list(result.notes), "dice_vs_truth": metrics, **result.stats}, stats_path, overwrite=overwrite)
    write_overview_png(ct, result.labels, png_path, truth=truth)
    print(f"segmented {SAMPLE_CT.name} ({'x'.join(map(str, ct.GetSize()))} voxels) on {result.device} "
          f"in {result.timings['total']:.1f} s")
    print(f"measurements: {summarize(result.stats)}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"Dice vs the sample's truth: kidney {metrics['kidney_dice']:.3f}, tumor {metrics['tumor_dice']:.3f}")
    print(f"wrote {seg_path}, {stats_path}, {png_path}")
    sys.stdout.flush()
    return 0
