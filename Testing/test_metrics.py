"""The one Dice (KidneyTumorSegLib.metrics): exact values on tiny arrays, the empty-vs-empty rule, the
KiTS19 structures (cyst is kidney, not tumor), and that every caller uses this Dice rather than a copy."""

from __future__ import annotations

import numpy as np
import pytest

from KidneyTumorSegLib import metrics
from KidneyTumorSegLib.metrics import dice, kits_dice, kits_masks


def test_dice_is_exact_on_tiny_masks():
    a = np.array([1, 1, 1, 0, 0], bool)
    b = np.array([0, 1, 1, 1, 1], bool)
    assert dice(a, b) == 2 * 2 / (3 + 4)          # 4/7, to the last bit
    assert dice(b, a) == dice(a, b)
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    # non-boolean masks: non-zero is inside (a label map's values count once, not by value)
    assert dice(np.array([0, 2, 3, 1]), np.array([0, 1, 0, 1])) == 2 * 2 / (3 + 2)
    assert type(dice(a, b)) is float


def test_both_empty_scores_one_and_one_empty_zero():
    empty = np.zeros((2, 3, 4), bool)
    one = empty.copy()
    one[1, 2, 3] = True
    assert dice(empty, empty) == 1.0   # nothing to find, nothing found
    assert dice(one, empty) == 0.0 and dice(empty, one) == 0.0


def test_masks_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        dice(np.zeros((2, 3), bool), np.zeros((3, 2), bool))


def test_kits_structures_count_cyst_as_kidney_and_not_as_tumor():
    labels = np.array([0, 1, 2, 3])
    masks = kits_masks(labels)
    assert list(masks) == list(metrics.KITS_STRUCTURES) == ["kidney", "tumor"]
    np.testing.assert_array_equal(masks["kidney"], [False, True, True, True])
    np.testing.assert_array_equal(masks["tumor"], [False, False, True, False])


def test_kits_dice_by_hand():
    truth = np.array([0, 1, 1, 2, 2, 3, 0, 0])
    pred = np.array([0, 1, 3, 2, 1, 0, 2, 0])
    # kidney (> 0): truth at 1..5, prediction at 1..4 and 6 -> 4 shared of 5 + 5
    # tumor (== 2): truth at 3, 4, prediction at 3, 6 -> 1 shared of 2 + 2; the cyst at 2 is not tumor
    m = kits_dice(pred, truth)
    assert m == {"kidney_dice": 2 * 4 / 10, "tumor_dice": 2 * 1 / 4, "mean_dice": (0.8 + 0.5) / 2}
    # no tumor in either: tumor Dice 1, so a tumor-free case is not punished for finding none
    assert kits_dice(np.array([0, 1, 3]), np.array([0, 1, 1]))["tumor_dice"] == 1.0


def test_every_caller_uses_this_dice():
    """One definition: Training's metrics, the demo and the validation Dice's structures are this module's."""
    import Training.metrics
    from KidneyTumorSegLib import demo

    assert Training.metrics.dice is dice
    assert Training.metrics.STRUCTURES is metrics.KITS_STRUCTURES
    assert demo.kits_dice is kits_dice
    truth, pred = np.array([0, 1, 2, 3, 2]), np.array([0, 1, 1, 3, 2])
    for name, (p, t) in Training.metrics.structure_masks(pred, truth, [0, 1, 2]).items():
        np.testing.assert_array_equal(p, kits_masks(pred)[name])
        np.testing.assert_array_equal(t, kits_masks(truth)[name])
    assert list(Training.metrics.structure_masks(pred, truth, [0, 1])) == ["kidney"]   # a kidney-only stage
