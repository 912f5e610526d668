"""KiTS19 metrics of Training.metrics: Dice, HD95 and surface Dice in physical space (anisotropic, permuted grids)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from Training.metrics import dice, hd95, kits_metrics, surface_dice, surface_distances

KITS_DIRECTION = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)


def test_dice_of_known_boxes():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[0:4, 0:5, 0:5] = True   # 100 voxels
    b[2:6, 0:5, 0:5] = True   # 100 voxels, 50 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0


def test_parallel_sheets_give_exact_distances_in_millimetres():
    spacing = (0.8, 0.8, 3.0)  # (x, y, z): thick slices
    a = np.zeros((12, 10, 10), bool)  # (z, y, x)
    b = np.zeros_like(a)
    a[4] = True
    b[6] = True  # two slices apart: 6 mm
    d_ab, d_ba = surface_distances(a, b, spacing)
    assert np.allclose(d_ab, 6.0) and np.allclose(d_ba, 6.0) and d_ab.size == 100
    assert hd95(a, b, spacing) == pytest.approx(6.0)
    assert surface_dice(a, b, spacing, 2.0) == 0.0
    assert surface_dice(a, b, spacing, 6.0) == 1.0
    c = np.zeros_like(a)
    e = np.zeros_like(a)
    c[:, :, 3] = True
    e[:, :, 5] = True  # two columns apart in x: 1.6 mm
    assert hd95(c, e, spacing) == pytest.approx(1.6)
    assert surface_dice(c, e, spacing, 2.0) == 1.0
    assert surface_dice(c, e, spacing, 1.5) == 0.0


def test_empty_masks():
    a = np.zeros((5, 5, 5), bool)
    b = a.copy()
    b[2, 2, 2] = True
    assert hd95(a, a, (1, 1, 1)) == 0.0 and surface_dice(a, a, (1, 1, 1)) == 1.0
    assert math.isinf(hd95(a, b, (1, 1, 1))) and surface_dice(a, b, (1, 1, 1)) == 0.0


def _image(arr, spacing, direction):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    img.SetOrigin((12.0, -30.0, 400.0))
    return img


def _brute_force(pred: sitk.Image, truth: sitk.Image, value_test, tol):
    """Reference: surface voxels (a face neighbour outside), LPS points via the image's own index-to-physical map,
    all pairwise distances."""
    def points(img):
        m = value_test(sitk.GetArrayFromImage(img))
        p = np.pad(m, 1)
        inner = p[1:-1, 1:-1, 1:-1]
        surf = inner & ~(p[:-2, 1:-1, 1:-1] & p[2:, 1:-1, 1:-1] & p[1:-1, :-2, 1:-1] & p[1:-1, 2:, 1:-1]
                         & p[1:-1, 1:-1, :-2] & p[1:-1, 1:-1, 2:])
        return np.array([img.TransformIndexToPhysicalPoint((int(x), int(y), int(z))) for z, y, x in np.argwhere(surf)])
    pa, pb = points(pred), points(truth)
    d = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
    d_ab, d_ba = d.min(axis=1), d.min(axis=0)
    hd = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    sd = (np.sum(d_ab <= tol) + np.sum(d_ba <= tol)) / (d_ab.size + d_ba.size)
    return hd, sd


def test_kits_metrics_match_a_brute_force_reference_on_a_permuted_anisotropic_grid():
    rng = np.random.default_rng(3)
    shape = (14, 16, 18)  # array (z, y, x) of a KiTS19-like storage: sitk axis 0 is the slice axis
    spacing = (3.0, 0.7, 0.9)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    truth = np.zeros(shape, np.uint8)
    truth[((zz - 7) / 5.0) ** 2 + ((yy - 8) / 6.0) ** 2 + ((xx - 8) / 5.0) ** 2 <= 1] = 1
    truth[((zz - 8) / 3.0) ** 2 + ((yy - 9) / 3.0) ** 2 + ((xx - 10) / 3.0) ** 2 <= 1] = 2
    pred = np.roll(truth, (1, 0, 1), axis=(0, 1, 2))
    pred[rng.random(shape) < 0.01] = 1  # scattered false positives pull the 95th percentile up
    t_img, p_img = _image(truth, spacing, KITS_DIRECTION), _image(pred, spacing, KITS_DIRECTION)
    m = kits_metrics(p_img, t_img)
    hd_k, sd_k = _brute_force(p_img, t_img, lambda a: a > 0, 2.0)
    hd_t, sd_t = _brute_force(p_img, t_img, lambda a: a == 2, 2.0)
    assert m["kidney_hd95_mm"] == pytest.approx(hd_k, abs=1e-4)
    assert m["kidney_surface_dice"] == pytest.approx(sd_k, abs=1e-9)
    assert m["tumor_hd95_mm"] == pytest.approx(hd_t, abs=1e-4)
    assert m["tumor_surface_dice"] == pytest.approx(sd_t, abs=1e-9)
    assert m["kidney_dice"] == pytest.approx(dice(pred > 0, truth > 0))
    assert m["tumor_dice"] == pytest.approx(dice(pred == 2, truth == 2))
    assert m["mean_dice"] == pytest.approx((m["kidney_dice"] + m["tumor_dice"]) / 2)
    assert 0 < m["kidney_surface_dice"] < 1 and m["kidney_hd95_mm"] > 0


def test_kits_metrics_resample_a_prediction_on_another_grid_and_count_cyst_as_kidney():
    truth = np.zeros((10, 12, 12), np.uint8)
    truth[2:8, 3:9, 3:9] = 1
    truth[4:6, 4:6, 4:6] = 3  # a cyst counts as kidney for KiTS19
    t_img = _image(truth, (1.0, 1.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    pred = sitk.Resample(t_img, [24, 24, 20], sitk.Transform(), sitk.sitkNearestNeighbor, t_img.GetOrigin(), (0.5, 0.5, 1.0),
                         t_img.GetDirection(), 0, sitk.sitkUInt8)
    pred = sitk.ChangeLabel(pred, {3: 1})
    m = kits_metrics(pred, t_img)
    assert m["kidney_dice"] == pytest.approx(1.0)
    assert m["tumor_dice"] == 1.0 and m["tumor_hd95_mm"] == 0.0  # no tumor anywhere
