"""Tests of the phantom synthesizer (Training.phantoms) and procedural shapes (Training.phantom_anatomy)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_path
from KidneyTumorSegLib.errors import InputError
from Training.phantom_anatomy import ADULT_KIDNEY_SEPARATION_MM, Grid, grid_scale
from Training.phantoms import procedural_labels, procedural_phantom, synthesize_ct

KITS_DIRECTION = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)  # slices along sitk axis 0, as KiTS19 stores them


def arr(img):
    return sitk.GetArrayFromImage(img)


def physical_points(img, mask):
    """LPS coordinates (N, 3) of the voxels where ``mask`` (z, y, x) is true."""
    z, y, x = np.nonzero(mask)
    return Grid.of(img).to_physical(np.stack([x, y, z], axis=1))


def same_geometry(a, b):
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


def faces(a):
    return [a[0], a[-1], a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]]


def corner_blocks(a, n=3):
    return [a[zs, ys, xs] for zs in (slice(0, n), slice(-n, None)) for ys in (slice(0, n), slice(-n, None))
            for xs in (slice(0, n), slice(-n, None))]


def ellipsoid_labels(size=(180, 150, 70), spacing=(2.0, 2.0, 2.0), direction=None):
    """Hand-made adult-size label map: two kidney ellipsoids 130 mm apart, a 15 mm-radius tumor on the
    left kidney's lateral side, a 9 mm-radius cyst inside the right kidney."""
    img = sitk.Image(size, sitk.sitkUInt8)
    img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(direction)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    img.SetOrigin(tuple(-(d @ np.diag(spacing) @ ((np.asarray(size) - 1) / 2))))
    g = Grid.of(img)
    X, Y, Z = g.coords()
    lab = np.zeros(g.shape, np.uint8)
    for cx in (65.0, -65.0):
        lab[((X - cx) / 30) ** 2 + ((Y - 30) / 24) ** 2 + (Z / 55) ** 2 <= 1] = 1
    lab[(X - 95) ** 2 + (Y - 30) ** 2 + (Z - 5) ** 2 <= 15 ** 2] = 2
    lab[(X + 65) ** 2 + (Y - 30) ** 2 + (Z + 20) ** 2 <= 9 ** 2] = 3
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(img)
    return out


def test_procedural_phantom_is_deterministic_per_seed():
    ct1, lab1 = procedural_phantom((40, 40, 32), (3.0, 3.0, 4.0), seed=5, tumors=2, cysts=1)
    ct2, lab2 = procedural_phantom((40, 40, 32), (3.0, 3.0, 4.0), seed=5, tumors=2, cysts=1)
    ct3, lab3 = procedural_phantom((40, 40, 32), (3.0, 3.0, 4.0), seed=6, tumors=2, cysts=1)
    assert np.array_equal(arr(ct1), arr(ct2)) and np.array_equal(arr(lab1), arr(lab2))
    assert not np.array_equal(arr(lab1), arr(lab3))
    assert ct1.GetPixelID() == sitk.sitkInt16 and lab1.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(arr(lab1))) <= {0, 1, 2, 3} and (arr(lab1) == 1).any() and (arr(lab1) == 2).any()


@pytest.mark.parametrize("direction", [None, KITS_DIRECTION, (0.8, -0.6, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 1.0)])
def test_outputs_have_exact_label_geometry_and_labels(direction):
    size = (48, 40, 36) if direction != KITS_DIRECTION else (36, 40, 48)
    lab = procedural_labels(size, (3.0, 3.5, 4.0), rng=np.random.default_rng(1), direction=direction,
                            origin=(12.5, -40.0, 300.0), tumors=1, cysts=2)
    assert (arr(lab) == 3).any()
    ct, out = synthesize_ct(lab, rng=np.random.default_rng(2))
    assert same_geometry(ct, lab) and same_geometry(out, lab)
    assert np.array_equal(arr(out), arr(lab))
    _, folded = synthesize_ct(lab, rng=np.random.default_rng(2), cyst_as_label=False)
    expected = arr(lab)
    expected[expected == 3] = 1
    assert np.array_equal(arr(folded), expected)


def test_hu_of_tissues_is_plausible_and_ordered():
    lab = ellipsoid_labels()
    a_lab = arr(lab)
    organ = lab > 0
    layer2 = arr(sitk.BinaryErode(organ, [1, 1, 1]) & ~sitk.BinaryErode(organ, [2, 2, 2])).astype(bool) & (a_lab == 1)
    tumor_in = arr(sitk.BinaryErode(lab == 2, [1, 1, 1])).astype(bool)
    cyst_in = arr(sitk.BinaryErode(lab == 3, [1, 1, 1])).astype(bool)
    assert layer2.sum() > 500 and tumor_in.sum() > 500 and cyst_in.sum() > 100
    for seed in range(3):
        ct = arr(synthesize_ct(lab, rng=np.random.default_rng(seed))[0]).astype(float)
        cortex, tumor, cyst = ct[layer2].mean(), ct[tumor_in].mean(), ct[cyst_in].mean()
        assert 135 < cortex < 260, cortex
        assert 30 < tumor < cortex - 10, (tumor, cortex)
        assert -15 < cyst < tumor - 10, (cyst, tumor)
        body = ct[ct > -500]
        fat_fraction = ((body > -160) & (body < -60)).mean()
        assert fat_fraction > 0.1, fat_fraction
        for block in corner_blocks(ct):
            assert -1024 <= block.mean() < -970


def test_intensity_shift_moves_enhanced_tissue_only_and_noise_is_calibrated():
    lab = ellipsoid_labels()
    kidney_in = arr(sitk.BinaryErode(lab == 1, [2, 2, 2])).astype(bool)
    lateral = kidney_in & (np.abs(Grid.of(lab).coords()[0]) > 70)  # away from the renal sinus (not enhanced)
    cyst_in = arr(sitk.BinaryErode(lab == 3, [1, 1, 1])).astype(bool)
    base = arr(synthesize_ct(lab, rng=np.random.default_rng(4))[0]).astype(float)
    shifted = arr(synthesize_ct(lab, rng=np.random.default_rng(4), intensity_shift_hu=50.0)[0]).astype(float)
    diff = shifted - base
    assert np.abs(diff[lateral] - 50).max() <= 1 and lateral.sum() > 1000
    assert diff[kidney_in].min() >= -1 and diff[kidney_in].max() <= 51 and np.median(diff[kidney_in]) == 50
    assert np.abs(diff[cyst_in]).max() <= 1  # cysts do not enhance
    assert all(np.abs(b).max() == 0 for b in corner_blocks(diff))
    quiet = arr(synthesize_ct(lab, rng=np.random.default_rng(4), noise_scale=0.0)[0]).astype(float)
    assert quiet[cyst_in].std() < 1.0  # cysts are homogeneous
    assert 7.0 < base[cyst_in].std() < 32.0  # 10-25 HU correlated noise


@pytest.mark.parametrize("direction", [None, KITS_DIRECTION])
def test_kidneys_sit_on_the_patient_side_in_lps(direction):
    size = (64, 64, 48) if direction is None else (48, 64, 64)
    spacing = (2.0, 2.0, 2.5) if direction is None else (2.5, 2.0, 2.0)
    for kidneys, sign in (("left", 1.0), ("right", -1.0)):
        for seed in range(3):
            lab = procedural_labels(size, spacing, rng=np.random.default_rng(seed), direction=direction,
                                    kidneys=kidneys, tumors=0)
            centre = Grid.of(lab).centre()
            s = grid_scale(Grid.of(lab))
            p = physical_points(lab, arr(lab) > 0)
            assert sign * (p[:, 0].mean() - centre[0]) > 30 * s  # +x is the patient's left
            assert p[:, 1].mean() - centre[1] > 20 * s  # kidneys are posterior (+y)
            assert p[:, 2].std() > 1.25 * max(p[:, 0].std(), p[:, 1].std())  # long axis head-foot (z)
    both = procedural_labels(size, spacing, rng=np.random.default_rng(7), direction=direction, kidneys="both", tumors=0)
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(both > 0))
    xs = [physical_points(both, arr(cc) == k)[:, 0].mean() - Grid.of(both).centre()[0] for k in (1, 2)]
    assert min(xs) < -30 * grid_scale(Grid.of(both)) and max(xs) > 30 * grid_scale(Grid.of(both))


def test_same_seed_builds_the_same_physical_anatomy_on_identity_and_kits_grids():
    ident = procedural_labels((64, 64, 48), (2.0, 2.0, 2.5), rng=np.random.default_rng(3), tumors=1)
    kits = procedural_labels((48, 64, 64), (2.5, 2.0, 2.0), rng=np.random.default_rng(3), direction=KITS_DIRECTION,
                             tumors=1)
    for value in (1, 2):
        a = physical_points(ident, arr(ident) == value).mean(0)
        b = physical_points(kits, arr(kits) == value).mean(0)
        assert np.abs(a - b).max() < 1.5, (value, a, b)


@pytest.mark.parametrize("direction", [None, KITS_DIRECTION])
def test_spine_lies_between_the_kidneys_in_physical_space(direction):
    size = (128, 96, 60) if direction is None else (60, 96, 128)
    lab = procedural_labels(size, (2.5, 2.5, 2.5), rng=np.random.default_rng(11), direction=direction, tumors=0)
    ct, _ = synthesize_ct(lab, rng=np.random.default_rng(12), noise_scale=0.0)
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(lab > 0))
    cents = [physical_points(lab, arr(cc) == k).mean(0) for k in (1, 2)]
    mid = (cents[0] + cents[1]) / 2
    s = abs(cents[0][0] - cents[1][0]) / ADULT_KIDNEY_SEPARATION_MM

    def max_hu_on_ap_line(x):
        vals = []
        for dy in np.arange(-40, 60, 1.0) * s:
            idx = ct.TransformPhysicalPointToIndex((float(x), float(mid[1] + dy), float(mid[2])))
            vals.append(ct[idx])
        return max(vals)

    assert max_hu_on_ap_line(mid[0]) > 250  # vertebra
    assert max_hu_on_ap_line(mid[0] + 0.45 * (cents[0][0] - mid[0])) < 250  # beside the spine: no bone


def test_tiny_grid_still_gets_two_kidneys_and_layouts_count_components():
    tiny = procedural_labels((32, 32, 32), (2.0, 2.0, 2.0), rng=np.random.default_rng(0), tumors=1)
    assert sitk.GetArrayViewFromImage(sitk.ConnectedComponent(tiny > 0)).max() == 2
    ct, _ = synthesize_ct(tiny, rng=np.random.default_rng(0))
    assert same_geometry(ct, tiny)
    for seed in range(3):
        horseshoe = procedural_labels((64, 64, 48), (2.0, 2.0, 2.5), rng=np.random.default_rng(seed),
                                      kidneys="horseshoe", tumors=0)
        assert sitk.GetArrayViewFromImage(sitk.ConnectedComponent(horseshoe > 0)).max() == 1
        x = physical_points(horseshoe, arr(horseshoe) > 0)[:, 0]
        s = grid_scale(Grid.of(horseshoe))
        assert x.min() < -25 * s and x.max() > 25 * s  # one mass across the midline
        left = procedural_labels((64, 64, 48), (2.0, 2.0, 2.5), rng=np.random.default_rng(seed), kidneys="left")
        assert sitk.GetArrayViewFromImage(sitk.ConnectedComponent(left > 0)).max() == 1
    none = procedural_labels((32, 32, 32), (2.0, 2.0, 2.0), rng=np.random.default_rng(0), kidneys="none", tumors=2)
    assert not arr(none).any()
    ct, out = synthesize_ct(none, rng=np.random.default_rng(0))
    assert not arr(out).any() and arr(ct).max() > 100  # a body without kidneys


@pytest.mark.parametrize("direction", [None, KITS_DIRECTION])
def test_cut_by_fov_touches_the_grid_border(direction):
    size = (64, 64, 48) if direction is None else (48, 64, 64)
    for seed in range(4):
        a = arr(procedural_labels(size, (2.0, 2.0, 2.0), rng=np.random.default_rng(seed), direction=direction,
                                  cut_by_fov=True)) > 0
        plain = arr(procedural_labels(size, (2.0, 2.0, 2.0), rng=np.random.default_rng(seed), direction=direction)) > 0
        assert any(f.any() for f in faces(a))
        assert not any(f.any() for f in faces(plain))  # the same anatomy fits when not shifted


def test_bad_label_images_raise_input_error():
    good = procedural_labels((24, 24, 24), (3.0, 3.0, 3.0), rng=np.random.default_rng(0))
    with pytest.raises(InputError):
        synthesize_ct(sitk.Cast(good, sitk.sitkFloat32), rng=np.random.default_rng(0))
    with pytest.raises(InputError):
        synthesize_ct(good * 2 + 1, rng=np.random.default_rng(0))  # values up to 7
    with pytest.raises(InputError):
        synthesize_ct(sitk.Cast(good, sitk.sitkInt16) - 1, rng=np.random.default_rng(0))  # -1
    with pytest.raises(InputError):
        synthesize_ct(sitk.Image([8, 8], sitk.sitkUInt8), rng=np.random.default_rng(0))


def test_real_kits19_label_map_downsampled():
    case = shared_path("data", "kits19_labels", "case_00061", "segmentation.nii.gz")
    full = sitk.ReadImage(str(case))
    assert np.allclose(full.GetDirection(), KITS_DIRECTION, atol=1e-6)
    size = [full.GetSize()[0], full.GetSize()[1] // 4, full.GetSize()[2] // 4]
    spacing = [full.GetSpacing()[0], full.GetSpacing()[1] * 4, full.GetSpacing()[2] * 4]
    origin = full.TransformContinuousIndexToPhysicalPoint((0.0, 1.5, 1.5))
    lab = sitk.Resample(full, size, sitk.Transform(), sitk.sitkNearestNeighbor, origin, spacing,
                        full.GetDirection(), 0, sitk.sitkUInt8)
    a_lab = arr(lab)
    assert (a_lab == 1).sum() > 100 and (a_lab == 2).sum() > 100
    ct, out = synthesize_ct(lab, rng=np.random.default_rng(0))
    assert same_geometry(ct, lab) and np.array_equal(arr(out), a_lab)
    a = arr(ct).astype(float)
    kidney_in = arr(sitk.BinaryErode(lab == 1, [1, 1, 0])).astype(bool)  # not across the 5 mm slices
    tumor_in = arr(sitk.BinaryErode(lab == 2, [1, 1, 0])).astype(bool)
    assert a[kidney_in].mean() > a[tumor_in].mean() + 10
    assert 20 < a[tumor_in].mean() < 140
    for block in corner_blocks(a, 2):
        assert block.mean() < -950
    # the two kidneys lie either side of the spine: bone on the midline between them, posterior-ish
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(lab > 0))
    cents = [physical_points(lab, arr(cc) == k).mean(0) for k in (1, 2)]
    assert abs(cents[0][0] - cents[1][0]) > 80
    mid = (cents[0] + cents[1]) / 2
    vals = [ct[ct.TransformPhysicalPointToIndex((float(mid[0]), float(mid[1] + dy), float(mid[2])))]
            for dy in np.arange(-40, 60, 2.0)]
    assert max(vals) > 250
