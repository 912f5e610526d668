"""Evaluate a model package on a labelled KiTS19-layout dataset with the library's full inference.

For each case: :class:`KidneyTumorSegLib.pipeline.Segmenter` segments ``imaging.nii.gz`` (every
stage, post-processing included), :func:`Training.metrics.kits_metrics` compares the result with
``segmentation.nii.gz``, and :func:`KidneyTumorSegLib.overview.write_overview_png` draws the
prediction with the truth (dashed) through each kidney. The CSV has one row per case and a last
``mean`` row (HD95 means leave out infinite values, i.e. cases where one of the two masks is empty;
``hd95_infinite`` counts them).
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from KidneyTumorSegLib.errors import InputError, OutputError

from .dataset import list_cases, read_case
from .metrics import kits_metrics

COLUMNS = ("case", "kidney_dice", "tumor_dice", "mean_dice", "kidney_hd95_mm", "tumor_hd95_mm", "kidney_surface_dice",
           "tumor_surface_dice", "seconds")


def _mean_row(rows: list[dict]) -> dict:
    mean = {"case": "mean"}
    infinite = 0
    for col in COLUMNS[1:]:
        values = [r[col] for r in rows]
        finite = [v for v in values if math.isfinite(v)]
        infinite += len(values) - len(finite)
        mean[col] = sum(finite) / len(finite) if finite else math.nan
    mean["hd95_infinite"] = infinite
    return mean


def evaluate(model: str, data_dir: Path, out_csv: Path, cases: Optional[Sequence[int]] = None, png_dir: Optional[Path] = None,
             device: str = "auto", tta: bool = False, overwrite: bool = False,
             progress: Optional[Callable[[int, int, str], None]] = None) -> dict:
    """Segment and score every selected case; writes ``out_csv`` (and PNGs into ``png_dir``, default
    ``<csv stem>_png`` next to the CSV). Returns ``{"cases": rows, "mean": mean row, "csv", "png_dir"}``."""
    from KidneyTumorSegLib.models import load_package
    from KidneyTumorSegLib.overview import write_overview_png
    from KidneyTumorSegLib.pipeline import Segmenter

    out_csv = Path(out_csv)
    if out_csv.exists() and not overwrite:
        raise OutputError(f"{out_csv} already exists; pass --overwrite to replace it")
    listed = list_cases(Path(data_dir), cases, need_labels=True)
    package = load_package(model)
    try:
        segmenter = Segmenter(package, device=device, tta=tta)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    png_dir = Path(png_dir) if png_dir is not None else out_csv.with_name(out_csv.stem + "_png")
    png_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, case in enumerate(listed):
        ct, truth = read_case(case)
        t0 = time.perf_counter()
        result = segmenter.segment(ct)
        seconds = time.perf_counter() - t0
        row = {"case": case.name, **kits_metrics(result.labels, truth), "seconds": seconds}
        rows.append(row)
        write_overview_png(ct, result.labels, png_dir / f"{case.name}.png", truth=truth)
        if progress is not None:
            progress(i + 1, len(listed), f"{case.name} kidney {row['kidney_dice']:.3f} tumor {row['tumor_dice']:.3f}")
    mean = _mean_row(rows)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_name(f".{out_csv.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS) + ["hd95_infinite"], extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in mean.items()})
    os.replace(tmp, out_csv)
    return {"cases": rows, "mean": mean, "csv": str(out_csv), "png_dir": str(png_dir), "model": package.manifest.name}
