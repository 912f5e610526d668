"""Exact tests of KidneyTumorSegLib.postprocessing on tiny synthetic label maps."""

import math

import numpy as np
import pytest
import SimpleITK as sitk

from KidneyTumorSegLib.postprocessing import PostprocessingConfig, postprocess

KITS_DIRECTION = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)
ALL_OFF = PostprocessingConfig(
    keep_largest_kidneys=False, drop_detached_lesions=False, cyst_intensity_rule=False, fill_holes=False
)


def make(arr, spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, 30.0), direction=KITS_DIRECTION, dtype=np.uint8):
    img = sitk.GetImageFromArray(np.asarray(arr, dtype=dtype))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def run(arr, config=PostprocessingConfig(), hu=None):
    labels = make(arr)
    image = None if hu is None else make(hu, dtype=np.float32)
    return sitk.GetArrayFromImage(postprocess(labels, image, config))


def two_kidneys():
    """(z, y, x) = (12, 14, 40) map with two 6x6x6 kidneys (216 voxels each), x = 2..7 and 30..35."""
    a = np.zeros((12, 14, 40), np.uint8)
    a[3:9, 4:10, 2:8] = 1
    a[3:9, 4:10, 30:36] = 1
    return a


# ---------------------------------------------------------------- largest components
def test_third_component_removed_even_when_not_tiny():
    a = two_kidneys()
    a[4:8, 4:8, 17:21] = 1  # 64 voxels: 0.30 of the largest, but ranked third
    expected = two_kidneys()
    np.testing.assert_array_equal(run(a), expected)
    # with three components allowed it stays
    np.testing.assert_array_equal(run(a, PostprocessingConfig(max_kidney_components=3)), a)


def test_tiny_second_component_dropped_single_kidney():
    a = np.zeros((12, 14, 40), np.uint8)
    a[3:9, 4:10, 2:8] = 1  # 216 voxels
    a[3:6, 4:7, 30:33] = 1  # 27 voxels = 0.125 of the largest
    a[0:2, 0:2, 38:40] = 1  # 8 voxels = 0.037 (third, also tiny)
    only_first = np.zeros_like(a)
    only_first[3:9, 4:10, 2:8] = 1
    np.testing.assert_array_equal(run(a, PostprocessingConfig(min_component_fraction=0.2)), only_first)
    kept_two = only_first.copy()
    kept_two[3:6, 4:7, 30:33] = 1
    np.testing.assert_array_equal(run(a, PostprocessingConfig(min_component_fraction=0.1)), kept_two)
    np.testing.assert_array_equal(
        run(a, PostprocessingConfig(max_kidney_components=1, min_component_fraction=0.0)), only_first
    )


def test_components_use_full_26_connectivity():
    a = two_kidneys()
    a[9, 10, 8] = 1  # touches the first kidney only through a corner: same component
    a[4:8, 4:8, 17:21] = 1  # a real third component, removed
    expected = two_kidneys()
    expected[9, 10, 8] = 1
    np.testing.assert_array_equal(run(a), expected)


def test_lesions_count_as_kidney_for_component_size():
    a = two_kidneys()
    a[3:9, 4:10, 30:36] = 2  # second "kidney" is all tumor
    a[4:8, 4:8, 17:21] = 1  # 64 kidney voxels: second if tumor voxels did not count, third if they do
    expected = a.copy()
    expected[4:8, 4:8, 17:21] = 0
    # the all-tumor component has no kidney voxel, so only check step 1 here
    cfg = PostprocessingConfig(drop_detached_lesions=False)
    np.testing.assert_array_equal(run(a, cfg), expected)


# ---------------------------------------------------------------- detached lesions
def test_detached_tumor_removed_attached_chain_kept():
    a = two_kidneys()
    a[4:7, 5:8, 7:10] = 2  # tumor overlapping the first kidney's edge and bulging out
    a[4:7, 5:8, 10:12] = 3  # cyst touching only the tumor: attached through it
    a[5:8, 5:8, 20:23] = 2  # tumor blob with no kidney around it
    expected = a.copy()
    expected[5:8, 5:8, 20:23] = 0
    cfg = PostprocessingConfig(keep_largest_kidneys=False)
    np.testing.assert_array_equal(run(a, cfg), expected)


def test_lesion_touching_kidney_by_corner_is_attached():
    a = two_kidneys()
    a[9:11, 10:12, 8:10] = 2  # shares only the corner (8, 9, 7) -> (9, 10, 8)
    a[0:2, 0:2, 18:20] = 3  # detached cyst
    expected = a.copy()
    expected[0:2, 0:2, 18:20] = 0
    np.testing.assert_array_equal(run(a, PostprocessingConfig(keep_largest_kidneys=False)), expected)


# ---------------------------------------------------------------- intensity rule
def intensity_case():
    a = two_kidneys()
    a[4:6, 5:8, 3:6] = 2  # tumor A: 18 voxels inside kidney 1
    a[4:6, 5:8, 31:34] = 2  # tumor B: 18 voxels inside kidney 2
    hu = np.full(a.shape, -100.0)
    hu[a == 1] = 160.0
    hu[4:6, 5:8, 3:6] = np.where(np.arange(18).reshape(2, 3, 3) % 2 == 0, -10.0, 26.0)  # mean 8 < 10
    hu[4:6, 5:8, 31:34] = 12.0  # mean 12 >= 10
    return a, hu


@pytest.mark.parametrize("target, value", [("kidney", 1), ("cyst", 3), ("background", 0)])
def test_low_intensity_tumor_relabelled(target, value):
    a, hu = intensity_case()
    expected = a.copy()
    expected[4:6, 5:8, 3:6] = value
    cfg = PostprocessingConfig(cyst_intensity_rule=True, cyst_relabel_to=target, fill_holes=False)
    np.testing.assert_array_equal(run(a, cfg, hu), expected)


def test_intensity_threshold_is_configurable():
    a, hu = intensity_case()
    expected = a.copy()
    expected[4:6, 5:8, 3:6] = 1
    expected[4:6, 5:8, 31:34] = 1
    cfg = PostprocessingConfig(cyst_intensity_rule=True, cyst_threshold_hu=12.5)
    np.testing.assert_array_equal(run(a, cfg, hu), expected)


def test_intensity_rule_needs_an_image_on_the_same_grid():
    a, hu = intensity_case()
    cfg = PostprocessingConfig(cyst_intensity_rule=True)
    with pytest.raises(ValueError, match="no CT image"):
        postprocess(make(a), None, cfg)
    shifted = make(hu, dtype=np.float32, origin=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="grid"):
        postprocess(make(a), shifted, cfg)
    # without the rule the image is not needed
    np.testing.assert_array_equal(sitk.GetArrayFromImage(postprocess(make(a), None, PostprocessingConfig())), a)


# ---------------------------------------------------------------- hole filling
def test_enclosed_holes_filled_open_notch_kept():
    a = two_kidneys()
    a[5, 6, 4] = 0  # one-voxel cavity
    a[5:7, 7:9, 31:33] = 0  # 2x2x2 cavity inside the second kidney
    a[3, 4:7, 5] = 0  # notch open to the outside: not a hole
    expected = a.copy()
    expected[5, 6, 4] = 1
    expected[5:7, 7:9, 31:33] = 1
    np.testing.assert_array_equal(run(a), expected)


def test_hole_enclosed_by_tumor_becomes_kidney_and_diagonal_gap_is_closed():
    a = two_kidneys()
    a[4:9, 5:10, 3:8] = 2  # tumor filling a corner of kidney 1
    a[6, 7, 5] = 0  # cavity inside the tumor
    a[5, 7, 32] = 0  # a diagonal chain of cavities in kidney 2: (5, 7, 32) - (5, 8, 33) - (5, 9, 34),
    a[5, 8, 33] = 0  # each touching the next by an edge only; the last one opens through
    a[5, 9, 34] = 0  # a face (y = 9 -> 10) to the outside
    expected = a.copy()
    expected[6, 7, 5] = 1
    # the 26-connected wall is closed: the outside spreads through faces only, so the two
    # inner cavities are holes and only the open one stays background
    expected[5, 7, 32] = 1
    expected[5, 8, 33] = 1
    out = run(a)
    assert out[5, 9, 34] == 0
    np.testing.assert_array_equal(out, expected)


def test_holes_near_the_image_border():
    a = np.zeros((5, 6, 7), np.uint8)
    a[:, :, :] = 1  # object fills the whole image: the crop must clamp to the borders
    a[2, 3, 3] = 0
    a[0, 2, 2] = 0  # on the border: connected to the outside, not a hole
    expected = a.copy()
    expected[2, 3, 3] = 1
    np.testing.assert_array_equal(run(a), expected)


# ---------------------------------------------------------------- switches, geometry, inputs
def everything_case():
    a = two_kidneys()
    a[4:8, 4:8, 17:21] = 1  # third component -> rule 1
    a[0:2, 0:2, 38:40] = 2  # detached tumor (also a 4th component) -> rules 1 and 2
    a[4:6, 5:8, 3:6] = 2  # low-HU tumor -> rule 3
    a[6, 7, 33] = 0  # hole -> rule 4
    hu = np.full(a.shape, 150.0)
    hu[4:6, 5:8, 3:6] = 0.0
    return a, hu


def test_all_rules_together():
    a, hu = everything_case()
    expected = two_kidneys()
    out = run(a, PostprocessingConfig(cyst_intensity_rule=True), hu)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "switch", ["keep_largest_kidneys", "drop_detached_lesions", "cyst_intensity_rule", "fill_holes"]
)
def test_each_switch_off_leaves_its_target_unchanged(switch):
    a, hu = everything_case()
    on = dict(keep_largest_kidneys=True, drop_detached_lesions=True, cyst_intensity_rule=True, fill_holes=True)
    out = run(a, PostprocessingConfig(**{**on, switch: False}), hu)
    if switch == "keep_largest_kidneys":
        np.testing.assert_array_equal(out[4:8, 4:8, 17:21], 1)
        assert out[0:2, 0:2, 38:40].max() == 0  # the detached tumor still goes (rule 2)
    elif switch == "drop_detached_lesions":
        np.testing.assert_array_equal(out, two_kidneys())  # rule 1 already removed the blob
        out = run(a, PostprocessingConfig(**{**on, switch: False, "keep_largest_kidneys": False}), hu)
        np.testing.assert_array_equal(out[0:2, 0:2, 38:40], 2)
    elif switch == "cyst_intensity_rule":
        np.testing.assert_array_equal(out[4:6, 5:8, 3:6], 2)
    else:
        assert out[6, 7, 33] == 0
    np.testing.assert_array_equal(run(a, ALL_OFF, hu), a)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_geometry_preserved_input_untouched_and_uint8(dtype):
    a, hu = everything_case()
    labels = make(a, dtype=dtype)
    image = make(hu, dtype=np.float32)
    before = sitk.GetArrayFromImage(labels).copy()
    out = postprocess(labels, image, PostprocessingConfig(cyst_intensity_rule=True))
    assert out.GetPixelID() == sitk.sitkUInt8
    assert out.GetSize() == labels.GetSize()
    assert out.GetSpacing() == labels.GetSpacing()
    assert out.GetOrigin() == labels.GetOrigin()
    assert out.GetDirection() == labels.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), before)
    assert not np.array_equal(sitk.GetArrayFromImage(out), before)


def test_empty_map_returns_an_independent_copy():
    labels = make(np.zeros((4, 5, 6)))
    out = postprocess(labels, None, PostprocessingConfig())
    assert out.GetSize() == (6, 5, 4) and out.GetDirection() == KITS_DIRECTION
    assert sitk.GetArrayViewFromImage(out).max() == 0
    out[0, 0, 0] = 1
    assert sitk.GetArrayViewFromImage(labels).max() == 0


def test_bad_label_maps_rejected():
    with pytest.raises(ValueError, match="0..3"):
        postprocess(make(np.full((3, 3, 3), 4)), None, PostprocessingConfig())
    with pytest.raises(ValueError, match="0..3"):
        postprocess(make(np.full((3, 3, 3), -1), dtype=np.int16), None, PostprocessingConfig())
    with pytest.raises(ValueError, match="integer pixel type"):
        postprocess(make(np.ones((3, 3, 3)), dtype=np.float32), None, PostprocessingConfig())
    with pytest.raises(ValueError, match="3D"):
        postprocess(sitk.Image(4, 4, sitk.sitkUInt8), None, PostprocessingConfig())


# ---------------------------------------------------------------- config
def test_config_round_trip_and_defaults():
    cfg = PostprocessingConfig(max_kidney_components=1, cyst_intensity_rule=True, cyst_threshold_hu=15)
    d = cfg.to_dict()
    assert d["cyst_threshold_hu"] == 15.0 and isinstance(d["cyst_threshold_hu"], float)
    assert PostprocessingConfig.from_dict(d) == cfg
    assert PostprocessingConfig.from_dict({}) == PostprocessingConfig()
    assert set(d) == {
        "keep_largest_kidneys", "max_kidney_components", "min_component_fraction", "drop_detached_lesions",
        "cyst_intensity_rule", "cyst_threshold_hu", "cyst_relabel_to", "min_lesion_volume_ml", "largest_tumor_only", "fill_holes",
        "plausibility", "lesion_confidence_note_below",
    }
    assert d["plausibility"]["enabled"] is False  # off unless a manifest switches it on
    assert d["lesion_confidence_note_below"] == 0.0  # so are the confidence notes


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"keep_largest": True}, "keep_largest"),
        ({"max_kidney_components": 0}, "max_kidney_components"),
        ({"max_kidney_components": 2.0}, "max_kidney_components"),
        ({"max_kidney_components": True}, "max_kidney_components"),
        ({"min_component_fraction": 1.5}, "min_component_fraction"),
        ({"min_component_fraction": "0.1"}, "min_component_fraction"),
        ({"fill_holes": 1}, "fill_holes"),
        ({"cyst_threshold_hu": math.nan}, "cyst_threshold_hu"),
        ({"cyst_relabel_to": "tumor"}, "cyst_relabel_to"),
        ({"lesion_confidence_note_below": 75}, "lesion_confidence_note_below"),
        ({"lesion_confidence_note_below": -0.1}, "lesion_confidence_note_below"),
    ],
)
def test_config_errors_name_key_valid_keys_and_value(bad, key):
    with pytest.raises(ValueError) as info:
        PostprocessingConfig.from_dict(bad)
    message = str(info.value)
    assert "\n" not in message
    assert key in message
    assert "cyst_relabel_to" in message and "keep_largest_kidneys" in message  # the valid keys
    assert repr(next(iter(bad.values()))) in message


def test_config_from_non_dict_rejected():
    with pytest.raises(ValueError, match="must be a dict"):
        PostprocessingConfig.from_dict([("fill_holes", True)])


def _two_tumor_kidney():
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[2:18, 2:18, 2:18] = 1
    arr[4:10, 4:10, 4:10] = 2          # 216 voxels
    arr[13:15, 13:15, 13:15] = 2       # 8 voxels
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 2.0))    # 8 mm^3 per voxel
    return arr, img


def test_small_lesions_go_to_kidney_and_largest_tumor_only():
    arr, img = _two_tumor_kidney()
    base = dict(keep_largest_kidneys=False, drop_detached_lesions=False, fill_holes=False)
    # 8 voxels * 8 mm^3 = 0.064 mL < 0.1 mL; 216 * 8 = 1.728 mL kept
    out = sitk.GetArrayFromImage(postprocess(img, None, PostprocessingConfig(min_lesion_volume_ml=0.1, **base)))
    assert (out[13:15, 13:15, 13:15] == 1).all() and (out[4:10, 4:10, 4:10] == 2).all()
    out = sitk.GetArrayFromImage(postprocess(img, None, PostprocessingConfig(largest_tumor_only=True, **base)))
    assert (out == 2).sum() == 216 and (out[13:15, 13:15, 13:15] == 1).all()
    out = sitk.GetArrayFromImage(postprocess(img, None, PostprocessingConfig(**base)))
    np.testing.assert_array_equal(out, arr)
    with pytest.raises(ValueError, match="min_lesion_volume_ml"):
        PostprocessingConfig.from_dict({"min_lesion_volume_ml": -1})
