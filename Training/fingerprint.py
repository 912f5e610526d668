"""Dataset fingerprint: geometry and foreground intensity statistics (nnU-Net's, which Daza et al. use).

Per case: size and spacing along the canonical (x, y, z) axes (the working-grid axes of the
library, whatever the storage order), labels present, foreground voxels, and the mean HU of
kidney and tumor (used to flag low-contrast lesions as hard cases).
Dataset: median spacing per axis (the target spacing of median-spacing recipes), and the
foreground (label > 0) intensity percentiles 0.5 and 99.5, mean and standard deviation
(nnU-Net's CT normalisation: clip to the percentiles, z-score). Foreground intensities are
pooled from every case: all foreground voxels of a case when it has at most
``samples_per_case``, else that many drawn without replacement with
``numpy.random.default_rng([seed, case number])`` (nnU-Net samples 10 000 per case).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from KidneyTumorSegLib import geometry as geo
from KidneyTumorSegLib.labels import CYST, KIDNEY, TUMOR

from .dataset import Case, read_case

FINGERPRINT_VERSION = 1
SAMPLES_PER_CASE = 10_000


def case_fingerprint(ct: sitk.Image, labels: sitk.Image, number: int, samples_per_case: int = SAMPLES_PER_CASE,
                     seed: int = 0) -> tuple[dict, np.ndarray]:
    """``(record, foreground sample)`` of one case: the record's numbers and the HU values pooled for the dataset."""
    _, perm, _ = geo.canonical_axes(ct.GetDirection())
    size = tuple(int(ct.GetSize()[perm[k]]) for k in range(3))
    hu = sitk.GetArrayViewFromImage(ct)
    lab = sitk.GetArrayViewFromImage(labels)
    fg = lab > 0
    values = hu[fg].astype(np.float64)
    if values.size > samples_per_case:
        rng = np.random.default_rng([int(seed), int(number)])
        values = values[rng.choice(values.size, samples_per_case, replace=False)]
    present = sorted(int(v) for v in np.unique(lab))
    kidney_hu = float(hu[lab == KIDNEY].mean()) if KIDNEY in present else None
    tumor_hu = float(hu[lab == TUMOR].mean()) if TUMOR in present else None
    record = {
        "case": int(number),
        "size": list(size),
        "spacing": [float(s) for s in geo.canonical_spacing(ct)],
        "labels_present": present,
        "foreground_voxels": int(fg.sum()),
        "tumor_voxels": int((lab == TUMOR).sum()),
        "cyst_voxels": int((lab == CYST).sum()),
        "kidney_mean_hu": kidney_hu,
        "tumor_mean_hu": tumor_hu,
    }
    return record, values


def compute_fingerprint(cases: Sequence[Case], samples_per_case: int = SAMPLES_PER_CASE, seed: int = 0,
                        progress: Optional[Callable[[int, int, str], None]] = None) -> dict:
    """Fingerprint of labelled ``cases`` (see the module text) as a JSON-ready dict."""
    if not cases:
        raise ValueError("a fingerprint needs at least one case")
    records, pooled = [], []
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        ct, labels = read_case(case)
        record, values = case_fingerprint(ct, labels, case.number, samples_per_case, seed)
        records.append(record)
        pooled.append(values)
        if progress is not None:
            progress(i + 1, len(cases), case.name)
    values = np.concatenate(pooled) if pooled else np.zeros(0)
    spacings = np.asarray([r["spacing"] for r in records], dtype=float)
    sizes = np.asarray([r["size"] for r in records], dtype=float)
    intensity = None
    if values.size:
        intensity = {
            "samples": int(values.size),
            "mean": float(values.mean()),
            "std": float(values.std()),
            "min": float(values.min()),
            "max": float(values.max()),
            "median": float(np.median(values)),
            "percentile_00_5": float(np.percentile(values, 0.5)),
            "percentile_99_5": float(np.percentile(values, 99.5)),
        }
    return {
        "version": FINGERPRINT_VERSION,
        "cases": records,
        "num_cases": len(records),
        "median_spacing": [float(v) for v in np.median(spacings, axis=0)],
        "min_spacing": [float(v) for v in spacings.min(axis=0)],
        "max_spacing": [float(v) for v in spacings.max(axis=0)],
        "median_size": [float(v) for v in np.median(sizes, axis=0)],
        "has_cyst": any(CYST in r["labels_present"] for r in records),
        "foreground_intensity": intensity,
        "samples_per_case": int(samples_per_case),
        "seed": int(seed),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def write_fingerprint(fingerprint: dict, path: Path) -> None:
    """Write the fingerprint as indented JSON (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(fingerprint, indent=2) + "\n")
    tmp.replace(path)

