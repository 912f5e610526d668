"""Working grids, boxes and intensity normalisation."""

import numpy as np
import pytest
import SimpleITK as sitk

from KidneyTumorSegLib import geometry as geo
from KidneyTumorSegLib.normalization import IntensityNormalization

KITS_DIRECTION = (0, 0, 1, 0, 1, 0, -1, 0, 0)


def test_canonical_axes_of_kits_direction_is_lps():
    c, perm, signs = geo.canonical_axes(KITS_DIRECTION)
    np.testing.assert_array_equal(c, np.eye(3))
    assert perm == (2, 1, 0) and signs == (1, 1, -1)


def test_canonical_spacing_follows_the_permutation():
    image = sitk.Image([611, 512, 512], sitk.sitkUInt8)
    image.SetSpacing((0.5, 0.92, 0.8))
    image.SetDirection(KITS_DIRECTION)
    assert geo.canonical_spacing(image) == (0.8, 0.92, 0.5)


def test_working_grid_resampling_reorders_axes_without_interpolation():
    # A KiTS-style image resampled to its own spacing on the canonical grid is a pure re-indexing.
    arr = np.random.default_rng(0).integers(0, 100, (7, 5, 6)).astype(np.int16)  # (k, j, i)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((2.0, 1.5, 1.0))
    image.SetDirection(KITS_DIRECTION)
    image.SetOrigin((10.0, -5.0, 3.0))
    c, _, _ = geo.canonical_axes(image.GetDirection())
    grid = geo.grid_for_box(geo.image_box(image), geo.canonical_spacing(image), c)
    out = sitk.GetArrayFromImage(geo.resample(image, grid, sitk.sitkNearestNeighbor))
    assert out.shape == (6, 5, 7)
    # every voxel keeps its physical position: compare through physical points
    for idx in [(0, 0, 0), (3, 2, 4), (5, 4, 6)]:
        p = image.TransformIndexToPhysicalPoint(idx)
        q = np.asarray(grid.origin) + c @ (np.asarray(geo_index(grid, p)) * np.asarray(grid.spacing))
        np.testing.assert_allclose(q, p, atol=1e-6)
        gi = geo_index(grid, p)
        assert out[gi[2], gi[1], gi[0]] == arr[idx[2], idx[1], idx[0]]


def geo_index(grid, point):
    image = sitk.Image([int(s) for s in grid.size], sitk.sitkUInt8)
    grid.apply_to(image)
    return image.TransformPhysicalPointToIndex(point)


def test_grid_for_box_covers_the_box_and_is_centred():
    box = geo.Box((0.0, 0.0, 0.0), (10.0, 9.0, 4.0))
    grid = geo.grid_for_box(box, (2.0, 2.0, 2.0), np.eye(3))
    assert grid.size == (5, 5, 2)
    first = np.asarray(grid.origin)
    last = first + (np.asarray(grid.size) - 1) * 2.0
    np.testing.assert_allclose((first + last) / 2, box.center)


def test_region_index_range_clips_to_the_image():
    image = sitk.Image([10, 10, 10], sitk.sitkUInt8)
    image.SetSpacing((1.0, 1.0, 2.0))
    box = geo.Box((2.5, -5.0, 3.0), (6.4, 3.0, 100.0))
    start, size = geo.region_index_range(image, box)
    assert start == (3, 0, 2) and size == (4, 4, 8)
    assert geo.region_index_range(image, geo.Box((50.0, 50.0, 50.0), (60.0, 60.0, 60.0))) is None


def test_shrink_keeps_physical_extent():
    image = sitk.Image([64, 64, 20], sitk.sitkInt16)
    image.SetSpacing((0.75, 0.75, 3.0))
    shrunk = geo.shrink_for_spacing(image, (6.0, 6.0, 6.0))
    assert shrunk.GetSize() == (8, 8, 10)
    before, after = geo.image_box(image), geo.image_box(shrunk)
    np.testing.assert_allclose(before.lower, after.lower)
    np.testing.assert_allclose(before.upper, after.upper)


@pytest.mark.parametrize("norm,hu,expected", [
    (IntensityNormalization.window(-90, 310, 110, 200), [-500, -90, 110, 310, 900], [-1, -1, 0, 1, 1]),   # Liu
    (IntensityNormalization.window(-200, 500), [-1000, -200, 150, 500], [-1, -1, 0, 1]),                  # Mu (VB-Net)
    (IntensityNormalization.window(-250, 250), [-1000, 0, 125, 250], [-1, 0, 0.5, 1]),                    # Wei
    (IntensityNormalization.ct_zscore(-80, 300, 100, 50), [-1000, 100, 150, 2000], [-3.6, 0, 1, 4]),       # nnU-Net CT
])
def test_seed_normalisations(norm, hu, expected):
    np.testing.assert_allclose(norm.apply(np.asarray(hu, dtype=np.int16)), expected, atol=1e-6)


def test_normalisation_refuses_nonsense():
    with pytest.raises(ValueError, match="high > low"):
        IntensityNormalization.window(100, -100)
    with pytest.raises(ValueError, match="exactly the keys"):
        IntensityNormalization.from_dict({"kind": "window", "low": 0, "high": 1})
