"""``benchmarks/lesion_confidence.py``: lesions paired with their own confidence, scored against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import benchmark_script
from KidneyTumorSegLib.measurements import measure


@pytest.fixture(scope="module")
def script():
    return benchmark_script("lesion_confidence")


def _case():
    labels = np.zeros((8, 20, 30), np.uint8)
    labels[1:7, 1:19, 1:29] = 1
    labels[2:6, 2:6, 2:8] = 2      # tumor A: 96 voxels, model sure (1.0), all in the reference lesion
    labels[2:4, 10:12, 20:22] = 2  # tumor B: 8 voxels, model unsure (0.4), outside it
    labels[5:6, 14:16, 10:12] = 3  # cyst: 4 voxels, 0.6, half in it
    probability = np.full(labels.shape, 255, np.uint8)
    probability[2:4, 10:12, 20:22] = 102
    probability[5:6, 14:16, 10:12] = 153
    reference = np.zeros(labels.shape, bool)
    reference[2:6, 2:6, 2:8] = True
    reference[5, 14, 10:12] = True
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((2.0, 2.0, 2.5))  # 10 mm^3 per voxel
    return labels, reference, measure(image, lesion_probability=probability)


def test_each_lesion_gets_its_own_confidence_and_reference_fraction(script):
    labels, reference, stats = _case()
    rows = script.lesion_rows(labels, reference, stats, 0.01)
    assert rows == [
        {"kind": "tumor", "volume_ml": 0.96, "confidence": 1.0, "in_reference": 1.0},
        {"kind": "tumor", "volume_ml": 0.08, "confidence": 0.4, "in_reference": 0.0},
        {"kind": "cyst", "volume_ml": 0.04, "confidence": 0.6, "in_reference": 0.5},
    ]


def test_a_component_that_does_not_match_the_measured_items_is_an_error(script):
    labels, reference, stats = _case()
    labels = labels.copy()
    labels[2:4, 10:12, 20:22] = 1  # tumor B gone from the labels but still in the stats
    with pytest.raises(RuntimeError, match="1 components but 2 measured items"):
        script.lesion_rows(labels, reference, stats, 0.01)


def test_flag_table_counts_true_and_false_lesions_under_each_threshold(script):
    rows = [{"volume_ml": 50, "confidence": 0.9, "in_reference": 0.8},
            {"volume_ml": 20, "confidence": 0.7, "in_reference": 0.6},
            {"volume_ml": 30, "confidence": 0.6, "in_reference": 0.0},
            {"volume_ml": 15, "confidence": 0.72, "in_reference": 0.05},
            {"volume_ml": 12, "confidence": 0.5, "in_reference": 0.3},   # partial: neither
            {"volume_ml": 5, "confidence": 0.1, "in_reference": 0.0}]    # under min_ml
    assert script.flag_table(rows, [0.65, 0.75], 10.0) == [
        {"threshold": 0.65, "true": [0, 2], "false": [1, 2]},
        {"threshold": 0.75, "true": [1, 2], "false": [2, 2]}]


def test_sources_are_checked_before_any_model_is_loaded(script, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--sources", "sample"])  # the bundled sample is per_source.py's, not this benchmark's
    assert exc.value.code == 2 and "own, valgen" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        script.main(["--sources", "valgen", "--valgen", str(tmp_path / "none")])
    assert exc.value.code == 2 and "validation-phantoms" in capsys.readouterr().err
