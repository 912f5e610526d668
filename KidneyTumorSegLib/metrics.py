"""Dice and the KiTS19 structures it is scored on: the one definition that the demo, Training's
evaluation, the benchmarks, the Slicer self-test and the tests all import.

* Dice of two masks: 2 |A and B| / (|A| + |B|); both empty scores 1 (nothing to find, nothing
  found). Every copy this replaced agreed on that except ``benchmarks/bench_inference.py``, which
  scored 0 — on phantoms that always hold a kidney and a tumor, so no figure it printed changes.
* KiTS19 structures of a label map (0 background, 1 kidney, 2 tumor, 3 cyst): "kidney" = every
  non-background label (kidney with its tumors and cysts: KiTS19 counts a cyst as kidney),
  "tumor" = label 2 only (a cyst is not tumor).
* KiTS19 score: the mean of the kidney and the tumor Dice.
"""

from __future__ import annotations

import numpy as np

from .labels import TUMOR

#: the structures KiTS19 scores, in the order the metrics report them.
KITS_STRUCTURES = ("kidney", "tumor")


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks of the same shape (any dtype: non-zero is inside); 1.0 when both are empty."""
    a, b = np.asarray(prediction, bool), np.asarray(truth, bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    # Python ints: exact counts, and the same float whatever the arrays' dtype.
    denom = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if denom == 0 else 2.0 * int(np.count_nonzero(a & b)) / denom


def kits_masks(labels: np.ndarray) -> dict:
    """``{"kidney": labels > 0, "tumor": labels == 2}`` of a label array (values 0..3, any shape)."""
    labels = np.asarray(labels)
    return {"kidney": labels > 0, "tumor": labels == TUMOR}


def kits_dice(prediction: np.ndarray, truth: np.ndarray) -> dict:
    """KiTS19 Dice of a predicted label array against the truth (same shape, values 0..3):
    ``kidney_dice``, ``tumor_dice`` and ``mean_dice`` (their mean, the KiTS19 score)."""
    p, t = kits_masks(prediction), kits_masks(truth)
    out = {f"{name}_dice": dice(p[name], t[name]) for name in KITS_STRUCTURES}
    out["mean_dice"] = (out["kidney_dice"] + out["tumor_dice"]) / 2.0
    return out
