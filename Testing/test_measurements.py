"""Exact tests of KidneyTumorSegLib.measurements on tiny synthetic label maps."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

import KidneyTumorSegLib.measurements as measurements
from KidneyTumorSegLib.measurements import feret_diameter_mm, measure

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIPPED_X = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # an image stored right-to-left (RAS-like rows)
KITS_DIRECTION = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)


def make(arr, spacing, direction=IDENTITY, origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(np.asarray(arr, dtype=np.uint8))
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    img.SetOrigin(origin)
    return img


def test_box_volume_in_ml_with_anisotropic_spacing():
    a = np.zeros((8, 12, 16), np.uint8)
    a[2:6, 3:9, 4:14] = 1  # 4 x 6 x 10 = 240 voxels
    a[3:5, 4:7, 5:8] = 2  # 18 tumor voxels inside
    a[3:5, 4:5, 10:12] = 3  # 4 cyst voxels inside
    spacing = (0.7, 0.8, 2.5)  # x, y, z: 1.4 mm^3 per voxel
    result = measure(make(a, spacing))
    assert len(result["kidneys"]) == 1
    kidney = result["kidneys"][0]
    assert kidney["volume_ml"] == pytest.approx(240 * 1.4 / 1000)
    assert kidney["tumor_volume_ml"] == pytest.approx(18 * 1.4 / 1000)
    assert kidney["cyst_volume_ml"] == pytest.approx(4 * 1.4 / 1000)
    # centroid of the box = centre of indices x 4..13, y 3..8, z 2..5 in mm
    assert kidney["centroid_lps_mm"] == pytest.approx([8.5 * 0.7, 5.5 * 0.8, 3.5 * 2.5])
    assert result["tumors"]["count"] == 1
    assert result["tumors"]["total_volume_ml"] == pytest.approx(18 * 1.4 / 1000)
    assert result["cysts"]["count"] == 1
    assert result["labels_present"] == [1, 2, 3]
    json.dumps(result)


def two_kidneys_along(axis, shape=(16, 16, 16)):
    """Kidney A (with a tumor) at the low end and kidney B (bigger) at the high end of numpy ``axis``."""
    a = np.zeros(shape, np.uint8)
    low = [slice(5, 9)] * 3
    high = [slice(5, 10)] * 3
    low[axis] = slice(1, 5)
    high[axis] = slice(10, 15)
    a[tuple(low)] = 1
    a[tuple(high)] = 1
    tumor = list(low)
    tumor[axis] = slice(1, 3)
    a[tuple(tumor)] = 2
    return a


@pytest.mark.parametrize(
    "direction, axis, low_end_side",
    [
        (IDENTITY, 2, "right"),  # numpy axis 2 = sitk x; +x is the patient's left, so low x = right
        (FLIPPED_X, 2, "left"),
        (KITS_DIRECTION, 0, "right"),  # KiTS19: LPS x comes from sitk axis 2 = numpy axis 0
    ],
)
def test_sides_follow_the_direction_matrix(direction, axis, low_end_side):
    spacing = (0.9, 0.8, 1.5)
    img = make(two_kidneys_along(axis), spacing, direction, origin=(-30.0, 12.0, 100.0))
    result = measure(img)
    other = "left" if low_end_side == "right" else "right"
    kidneys = result["kidneys"]
    assert [k["side"] for k in kidneys] == ["right", "left"]
    by_side = {k["side"]: k for k in kidneys}
    voxel_ml = 0.9 * 0.8 * 1.5 / 1000
    assert by_side[low_end_side]["volume_ml"] == pytest.approx(64 * voxel_ml)
    assert by_side[low_end_side]["tumor_volume_ml"] == pytest.approx(32 * voxel_ml)
    assert by_side[other]["volume_ml"] == pytest.approx(125 * voxel_ml)
    assert by_side[other]["tumor_volume_ml"] == 0.0
    assert result["tumors"]["items"][0]["side"] == low_end_side
    # centroids are the physical points of the index centroids
    low_idx = [6.5, 6.5, 6.5]
    low_idx[2 - axis] = 2.5  # numpy axis -> sitk index position
    expected = img.TransformContinuousIndexToPhysicalPoint(low_idx)
    assert by_side[low_end_side]["centroid_lps_mm"] == pytest.approx(list(expected))
    xs = [k["centroid_lps_mm"][0] for k in kidneys]
    assert xs[0] < xs[1]
    assert result["midline_x_lps_mm"] == pytest.approx(sum(xs) / 2)


def test_horseshoe_kidney_is_midline_and_midline_defaults_to_image_centre():
    a = np.zeros((10, 10, 41), np.uint8)
    a[3:7, 3:7, 4:37] = 1  # one bar across the image centre (x index 20)
    a[3:7, 3:7, 30:34] = 2
    result = measure(make(a, (1.0, 1.0, 1.0), origin=(-20.0, 0.0, 0.0)))
    assert result["midline_x_lps_mm"] == pytest.approx(0.0)
    assert [k["side"] for k in result["kidneys"]] == ["midline"]
    assert result["tumors"]["items"][0]["side"] == "midline"


def test_two_components_on_one_side_keep_the_image_centre_as_midline():
    a = np.zeros((10, 10, 41), np.uint8)
    a[2:6, 2:6, 26:30] = 1  # both to the patient's left of the image centre x = 20 mm
    a[2:6, 2:6, 34:40] = 1
    result = measure(make(a, (1.0, 1.0, 1.0)))
    assert result["midline_x_lps_mm"] == pytest.approx(20.0)
    assert [k["side"] for k in result["kidneys"]] == ["left", "left"]
    assert result["kidneys"][0]["volume_ml"] > result["kidneys"][1]["volume_ml"]  # then by volume


def test_box_tumor_diameter_is_the_distance_between_corner_voxel_centres():
    a = np.zeros((12, 14, 16), np.uint8)
    a[1:11, 1:13, 1:15] = 1
    a[3:7, 2:11, 5:12] = 2  # 4 (z) x 9 (y) x 7 (x) voxels
    spacing = (0.7, 0.8, 2.5)
    expected = math.sqrt((6 * 0.7) ** 2 + (8 * 0.8) ** 2 + (3 * 2.5) ** 2)
    for direction in (IDENTITY, KITS_DIRECTION):
        tumors = measure(make(a, spacing, direction))["tumors"]
        assert tumors["count"] == 1
        assert tumors["items"][0]["max_diameter_mm"] == pytest.approx(expected)
        assert tumors["largest_diameter_mm"] == pytest.approx(expected)


def test_sphere_tumor_diameter_within_one_voxel():
    r = 7
    z, y, x = np.mgrid[:20, :20, :20] - 10
    a = np.zeros((20, 20, 20), np.uint8)
    a[1:19, 1:19, 1:19] = 1
    a[x * x + y * y + z * z <= r * r] = 2
    spacing = (0.8, 0.8, 0.8)
    d = measure(make(a, spacing))["tumors"]["items"][0]["max_diameter_mm"]
    assert abs(d - 2 * r * 0.8) <= 0.8
    assert d == pytest.approx(2 * r * 0.8)  # the axis extremes are voxel centres 2r apart


def test_lesion_items_sorted_and_summarised():
    a = np.zeros((10, 10, 30), np.uint8)
    a[1:9, 1:9, 1:29] = 1
    a[2:4, 2:4, 3:5] = 2  # 8 voxels, diameter sqrt(3)
    a[2:5, 2:5, 20:23] = 2  # 27 voxels, diameter sqrt(12)
    a[6, 6, 10] = 3  # single-voxel cyst: diameter 0
    result = measure(make(a, (1.0, 1.0, 1.0)))
    tumors = result["tumors"]
    assert tumors["count"] == 2
    assert [t["volume_ml"] for t in tumors["items"]] == pytest.approx([0.027, 0.008])
    assert [t["max_diameter_mm"] for t in tumors["items"]] == pytest.approx([math.sqrt(12), math.sqrt(3)])
    assert tumors["total_volume_ml"] == pytest.approx(0.035)
    assert tumors["largest_diameter_mm"] == pytest.approx(math.sqrt(12))
    assert tumors["items"][0]["centroid_lps_mm"] == pytest.approx([21.0, 3.0, 3.0])
    assert result["cysts"]["count"] == 1
    assert result["cysts"]["items"][0]["max_diameter_mm"] == 0.0


def random_blob(rng, shape=(14, 15, 16), n=6):
    """Union of a few random ellipsoids: an irregular, non-convex mask."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    mask = np.zeros(shape, bool)
    for _ in range(n):
        c = rng.uniform(3, np.array(shape) - 3)
        r = rng.uniform(1.5, 4.0, 3)
        mask |= ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
    return mask


def test_feret_matches_brute_force_and_itk_with_and_without_the_fast_path(monkeypatch):
    rng = np.random.default_rng(3)
    spacing = (0.7, 1.1, 2.3)
    matrix = np.diag(spacing)
    for _ in range(4):
        mask = random_blob(rng)
        pts = np.argwhere(mask)[:, ::-1] * np.array(spacing)
        brute = max(np.linalg.norm(pts - p, axis=1).max() for p in pts)
        img = make(mask, spacing)
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.ComputeFeretDiameterOn()
        stats.Execute(sitk.ConnectedComponent(img, True) > 0)
        assert feret_diameter_mm(mask, matrix) == pytest.approx(brute, rel=1e-9)
        assert stats.GetFeretDiameter(1) == pytest.approx(brute, rel=1e-9)
        monkeypatch.setattr(measurements, "EXACT_MAX_POINTS", 10)  # force the directional narrowing
        fast = feret_diameter_mm(mask, matrix)
        monkeypatch.undo()
        assert brute * (1 - 1e-3) <= fast <= brute * (1 + 1e-9)


def test_empty_map():
    result = measure(make(np.zeros((4, 5, 6)), (1.0, 2.0, 3.0), origin=(-2.5, 0.0, 0.0)))
    empty = {"count": 0, "total_volume_ml": 0.0, "largest_diameter_mm": 0.0, "items": []}
    assert result == {
        "kidneys": [],
        "tumors": empty,
        "cysts": empty,
        "labels_present": [],
        "midline_x_lps_mm": 0.0,
    }
    json.dumps(result)


def test_bad_label_values_rejected():
    with pytest.raises(ValueError, match="0..3"):
        measure(make(np.full((3, 3, 3), 7), (1.0, 1.0, 1.0)))


# -- lesion confidence -------------------------------------------------------------------------
def _two_lesions():
    a = np.zeros((6, 10, 20), np.uint8)
    a[1:5, 1:9, 1:19] = 1
    a[2:4, 2:4, 2:6] = 2    # tumor: 16 voxels
    a[2:4, 6:8, 12:14] = 3  # cyst: 8 voxels
    return a


def test_lesion_confidence_is_the_mean_lesion_probability_over_the_lesion():
    a = _two_lesions()
    p = np.zeros(a.shape, np.uint8)
    p[2:4, 2:4, 2:4] = 255  # half the tumor sure, the other half 0.5 (128/255), the kidney around it 1.0 (ignored)
    p[2:4, 2:4, 4:6] = 128
    p[a == 1] = 255
    p[2:4, 6:8, 12:14] = 51  # the cyst: 0.2
    result = measure(make(a, (1.0, 1.0, 1.0)), lesion_probability=p)
    assert result["tumors"]["items"][0]["confidence"] == pytest.approx((1.0 + 128 / 255) / 2, abs=1e-3)
    assert result["cysts"]["items"][0]["confidence"] == pytest.approx(0.2, abs=1e-3)
    floats = measure(make(a, (1.0, 1.0, 1.0)), lesion_probability=p / 255.0)
    assert floats["tumors"]["items"][0]["confidence"] == result["tumors"]["items"][0]["confidence"]
    assert "confidence" not in measure(make(a, (1.0, 1.0, 1.0)))["tumors"]["items"][0]  # unknown, not invented


def test_lesion_probability_of_another_shape_or_range_is_refused():
    img = make(_two_lesions(), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"shape \(z, y, x\) \(6, 10, 20\), got \(6, 10, 19\)"):
        measure(img, lesion_probability=np.zeros((6, 10, 19), np.uint8))
    with pytest.raises(ValueError, match="float in \\[0, 1\\]"):
        measure(img, lesion_probability=np.full((6, 10, 20), 2.0))
    with pytest.raises(ValueError, match="int64"):
        measure(img, lesion_probability=np.zeros((6, 10, 20), np.int64))


def test_low_confidence_notes_name_each_lesion_and_leave_out_the_fragments():
    stats = {"tumors": {"items": [{"volume_ml": 183.7, "confidence": 0.646, "side": "right"},
                                  {"volume_ml": 21.0, "confidence": 0.81, "side": "left"},
                                  {"volume_ml": 0.4, "confidence": 0.3, "side": "left"},
                                  {"volume_ml": 5.0, "side": "left"}]},  # no confidence: no note
             "cysts": {"items": [{"volume_ml": 2.5, "confidence": 0.5, "side": "midline"},
                                 {"volume_ml": 0.2, "confidence": 0.74, "side": "left"}]}}
    notes = measurements.low_confidence_notes(stats, 0.75)
    assert notes == [
        "the model is unsure of the 183.7 mL tumor at the right kidney (mean probability 0.65, under 0.75): "
        "check whether it is a lesion at all",
        "the model is unsure of the 2.5 mL cyst (mean probability 0.50, under 0.75): check whether it is a lesion at all",
    ]
    assert measurements.low_confidence_notes(stats, 0.0) == []
    assert measurements.low_confidence_notes({"tumors": {"count": 0, "items": []}}, 0.75) == []
