"""Data side of Training: dataset layout, folds, phantom grids, fingerprint, cache, sampling, augmentation,
schedules, registration augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from KidneyTumorSegLib import geometry as geo
from KidneyTumorSegLib.errors import InputError
from Training.augmentation import Augmenter
from Training.dataset import fold_split, list_cases, parse_case_selection
from Training.fingerprint import compute_fingerprint
from Training.phantom_dataset import add_cysts, crop_fov, reduce_grid
from Training.preprocess import Cache, class_lookup, init_cache, preprocess, stage_volumes
from Training.sampling import PatchSampler, crop
from Training.schedules import EpochSchedule

torch.set_num_threads(1)
KITS_DIRECTION = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)


def kits_like_labels(slices=40, inplane=48, slice_mm=2.5, pixel_mm=3.0):
    """A label map stored like KiTS19 (sitk axis 0 = slices, permuted direction): two kidney balls, a tumor."""
    arr = np.zeros((inplane, inplane, slices), np.uint8)  # numpy (z, y, x) = sitk (x=slices, y, z)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((slice_mm, pixel_mm, pixel_mm))
    img.SetDirection(KITS_DIRECTION)
    img.SetOrigin((-70.0, -70.0, 100.0))
    g = np.stack(np.meshgrid(*[np.arange(n) for n in img.GetSize()], indexing="ij"), -1).reshape(-1, 3)
    pts = np.asarray(img.GetOrigin()) + g @ (np.asarray(KITS_DIRECTION).reshape(3, 3) @ np.diag(img.GetSpacing())).T
    centre = pts.mean(axis=0)
    lab = np.zeros(len(g), np.uint8)
    for side in (-1, 1):
        lab[np.linalg.norm((pts - centre - [side * 45, 20, 0]) / [22, 20, 35], axis=1) <= 1] = 1
    lab[np.linalg.norm(pts - centre - [60, 20, 10], axis=1) <= 12] = 2
    out = np.zeros(img.GetSize()[::-1], np.uint8)
    out[g[:, 2], g[:, 1], g[:, 0]] = lab
    labels = sitk.GetImageFromArray(out)
    labels.CopyInformation(img)
    return labels


def write_dataset(root, cases):
    for n, (ct, lab) in cases.items():
        d = root / f"case_{n:05d}"
        d.mkdir(parents=True)
        sitk.WriteImage(ct, str(d / "imaging.nii.gz"))
        sitk.WriteImage(lab, str(d / "segmentation.nii.gz"))


def ct_for(labels, rng):
    arr = sitk.GetArrayFromImage(labels)
    hu = np.choose(arr, [-100, 160, 80, 5]).astype(np.int16) + rng.integers(-20, 21, arr.shape).astype(np.int16)
    ct = sitk.GetImageFromArray(hu)
    ct.CopyInformation(labels)
    return ct


def test_case_selection_listing_and_folds(tmp_path):
    assert parse_case_selection("0-3,7,5-5") == [0, 1, 2, 3, 5, 7]
    assert parse_case_selection("all") is None
    with pytest.raises(InputError):
        parse_case_selection("3-1")
    with pytest.raises(InputError):
        list_cases(tmp_path)
    numbers = list(range(23))
    vals = []
    for k in range(5):
        train, val = fold_split(numbers, k)
        assert not set(train) & set(val) and sorted(train + val) == numbers
        vals += val
    assert sorted(vals) == numbers  # every case validates in exactly one fold
    assert fold_split(numbers, 2) == fold_split(list(reversed(numbers)), 2)
    assert fold_split(numbers, None) == (numbers, [])


def test_reduce_grid_keeps_physical_geometry_on_a_permuted_grid():
    labels = kits_like_labels()
    small = reduce_grid(labels, downsample_inplane=4.0)
    assert small.GetSize() == (40, 12, 12) and small.GetDirection() == labels.GetDirection()
    assert np.allclose(geo.image_box(small).lower, geo.image_box(labels).lower)
    assert np.allclose(geo.image_box(small).upper, geo.image_box(labels).upper)
    vol = lambda img: (sitk.GetArrayViewFromImage(img) > 0).sum() * np.prod(img.GetSpacing())  # noqa: E731
    assert vol(small) == pytest.approx(vol(labels), rel=0.15)
    # cap the slices: the labelled region (+10 mm) does not fit 10 slices, so slices get thicker
    capped = reduce_grid(labels, 1.0, max_slices=10)
    assert capped.GetSize()[0] == 10 and capped.GetSpacing()[0] > 2.5
    assert (sitk.GetArrayViewFromImage(capped) == 2).any()
    # 36 slices fit the labelled region: a crop at the original slice thickness
    cropped = reduce_grid(labels, 1.0, max_slices=36)
    assert cropped.GetSize() == (36, 48, 48) and cropped.GetSpacing()[0] == pytest.approx(2.5)
    assert (sitk.GetArrayViewFromImage(cropped) > 0).sum() == (sitk.GetArrayViewFromImage(labels) > 0).sum()
    with_cysts = add_cysts(labels, np.random.default_rng(0), 2)
    a, b = sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(with_cysts)
    assert (b == 3).any() and np.array_equal(a == 2, b == 2)
    # thicker slices for a robustness set: 40 x 2.5 mm -> 20 x 5 mm, same slab of the body
    thick = reduce_grid(labels, 1.0, slice_mm=5.0)
    assert thick.GetSize() == (20, 48, 48) and thick.GetSpacing()[0] == pytest.approx(5.0)
    assert np.allclose(geo.image_box(thick).lower, geo.image_box(labels).lower)
    assert vol(thick) == pytest.approx(vol(labels), rel=0.15)
    with pytest.raises(InputError):
        reduce_grid(labels, 1.0, slice_mm=0.0)


def test_crop_fov_keeps_the_centre_of_the_in_plane_axes_in_place():
    labels = kits_like_labels()  # image axis 0 is the slice axis (permuted direction)
    small = crop_fov(labels, 0.5)
    assert small.GetSize() == (40, 24, 24) and small.GetSpacing() == labels.GetSpacing()
    # the kept voxels are the same voxels, at the same physical places
    centre = labels.TransformIndexToPhysicalPoint((0, 12, 12))
    assert np.allclose(small.TransformIndexToPhysicalPoint((0, 0, 0)), centre)
    assert np.array_equal(sitk.GetArrayViewFromImage(small), sitk.GetArrayViewFromImage(labels)[12:36, 12:36, :])
    with pytest.raises(InputError):
        crop_fov(labels, 1.5)


def test_fingerprint_numbers_on_a_tiny_dataset(tmp_path):
    rng = np.random.default_rng(0)
    lab1 = kits_like_labels()
    lab2 = reduce_grid(kits_like_labels(slices=30, slice_mm=3.5), 2.0)
    lab2 = add_cysts(lab2, rng, 1)
    cts = {1: (ct_for(lab1, rng), lab1), 4: (ct_for(lab2, rng), lab2)}
    write_dataset(tmp_path, cts)
    fp = compute_fingerprint(list_cases(tmp_path))
    pooled = np.concatenate([sitk.GetArrayFromImage(ct)[sitk.GetArrayFromImage(lab) > 0] for ct, lab in cts.values()])
    fi = fp["foreground_intensity"]
    assert fi["samples"] == pooled.size
    assert fi["mean"] == pytest.approx(pooled.mean()) and fi["std"] == pytest.approx(pooled.std())
    assert fi["percentile_00_5"] == pytest.approx(np.percentile(pooled, 0.5))
    assert fi["percentile_99_5"] == pytest.approx(np.percentile(pooled, 99.5))
    # canonical (x, y, z) spacing: the slice axis is z whatever the storage order
    assert fp["cases"][0]["spacing"] == [3.0, 3.0, 2.5] and fp["cases"][0]["size"] == [48, 48, 40]
    assert fp["median_spacing"] == pytest.approx([4.5, 4.5, 3.0])
    assert fp["has_cyst"] and fp["cases"][1]["cyst_voxels"] > 0
    small = compute_fingerprint(list_cases(tmp_path), samples_per_case=100)
    assert small["foreground_intensity"]["samples"] == 200


def _stage(**kw):
    m = {"name": "fine", "role": "segment", "classes": ["background", "kidney", "tumor"],
         "network": {"name": "vbnet", "kwargs": {}}, "spacing_mm": [4.0, 4.0, 4.0],
         "normalization": {"kind": "window", "low": -200.0, "high": 500.0, "center": 150.0, "scale": 350.0},
         "patch_size": [16, 16, 16], "region": {"kind": "components", "labels": ["kidney", "tumor"], "margin_mm": 8.0}}
    m.update(kw)
    return m


def test_class_lookup_and_stage_volumes_follow_the_truth():
    assert list(class_lookup(["background", "kidney", "tumor"])[:4]) == [0, 1, 2, 1]   # cyst -> kidney
    assert list(class_lookup(["background", "tumor"])[:4]) == [0, 0, 1, 0]             # kidney, cyst -> background
    assert list(class_lookup(["background", "kidney"])[:4]) == [0, 1, 1, 1]            # tumor -> kidney
    labels = kits_like_labels()
    ct = ct_for(labels, np.random.default_rng(1))
    vols = stage_volumes(_stage(), ct, labels)
    assert len(vols) == 2  # one volume per kidney component
    for image, target in vols:
        assert image.dtype == np.float32 and image.shape[1:] == target.shape and image.shape[0] == 1
        assert (target == 1).any()
        assert float(np.median(image[0][target == 1])) == pytest.approx((160 - 150) / 350, abs=0.03)
    masked = stage_volumes(_stage(inputs={"mask_labels": ["kidney", "tumor"], "slices_as_channels": 3}), ct, labels)
    image, target = masked[0]
    assert image.shape[0] == 3 and np.all(image[1][target == 0] <= (10 - 150) / 350 + 0.12)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(2)
    write_dataset(root / "data", {n: (ct_for(lab, rng), lab) for n, lab in
                                  ((1, kits_like_labels()), (2, kits_like_labels(slices=32)), (3, kits_like_labels(inplane=40)))})
    c = Cache(root / "cache")
    init_cache(c, root / "data", None)
    preprocess(c, [_stage()])
    return c


def test_cache_index_and_reuse(cache):
    records = cache.records(_stage())
    assert sorted({r["case"] for r in records}) == [1, 2, 3] and all(r["class_voxels"][1] > 0 for r in records)
    assert preprocess(cache, [_stage()]) == {next(iter(cache.meta()["specs"])): len(records)}  # nothing redone
    assert cache.folder(_stage(spacing_mm=[5.0, 5.0, 5.0])).path != cache.folder(_stage()).path


def _sampler(cache, **training):
    t = {"batch_size": 4, "patches_per_case": 2, "sampler": {"kind": "foreground", "foreground_fraction": 1.0},
         "iterations_per_epoch": "dataset"}
    t.update(training)
    return PatchSampler(cache.folder(_stage()).path, cache.records(_stage()), (16, 16, 16), t, -1.0, 3, seed=7)


def test_batches_are_reproducible_functions_of_their_key(cache):
    s = _sampler(cache)
    x1, y1 = s.batch(3, 5)
    x2, y2 = _sampler(cache).batch(3, 5)
    x3, _ = s.batch(3, 6)
    assert x1.shape == (4, 1, 16, 16, 16) and y1.shape == (4, 16, 16, 16)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and not np.array_equal(x1, x3)
    assert np.all(y1[:, 8, 8, 8] > 0)  # centred on foreground
    assert s.iterations_per_epoch() == 2  # 3 cases, 2 cases per batch
    balanced = _sampler(cache, sampler={"kind": "class_balanced"}, patches_per_case=1)
    centres = np.concatenate([balanced.batch(0, i)[1][:, 8, 8, 8] for i in range(60)])
    counts = np.bincount(centres, minlength=3) / centres.size
    assert np.all(np.abs(counts - 1 / 3) < 0.1)


def test_crop_pads_outside_the_volume():
    v = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    c = crop(v, (-1, 0, 2), (4, 3, 4), -5.0)
    assert c.shape == (1, 4, 3, 4)
    assert np.all(c[0, 0] == -5) and np.all(c[0, 3] == -5) and np.all(c[0, 1:3, :, 2:] == -5)
    assert np.array_equal(c[0, 1:3, :, :2], v[0, :, :, 2:])


def _blob_batch():
    y = torch.zeros(3, 20, 24, 24, dtype=torch.uint8)
    y[:, 5:15, 6:18, 4:14] = 1
    y[:, 8:12, 10:14, 10:14] = 2
    x = torch.where(y > 0, 1.0, -1.0).unsqueeze(1)
    return x, y


def test_spatial_augmentation_keeps_labels_aligned_with_the_image():
    aug = Augmenter({"rotation_deg": [0, 0, 30], "rotation_probability": 1.0, "scale": [0.8, 1.2], "scale_probability": 1.0,
                     "elastic": {"probability": 1.0, "magnitude_mm": 3.0, "sigma_mm": 20.0}}, (1.0, 1.0, 2.5), 3, pad_value=-1.0)
    x, y = _blob_batch()
    xa, ya = aug(x, y, torch.Generator().manual_seed(1))
    xb, yb = aug(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # reproducible from the seed
    assert not torch.equal(ya, y)
    fg_img, fg_lab = xa[:, 0] > 0, ya > 0
    overlap = 2 * (fg_img & fg_lab).sum() / (fg_img.sum() + fg_lab.sum())
    assert overlap > 0.97  # the augmented label covers what the augmented image shows
    assert set(torch.unique(ya).tolist()) <= {0, 1, 2} and (ya == 2).any()
    assert torch.all(xa >= -1.0 - 1e-5)  # outside the input: padding value (air), not zero


def test_mirroring_and_intensity_augmentation():
    x, y = _blob_batch()
    y[:, :, :, :3] = 2  # asymmetric in x
    x = torch.where(y > 0, 1.0, -1.0).unsqueeze(1)
    aug = Augmenter({"mirror_axes": [0], "mirror_probability": 1.0}, (1, 1, 1), 3, -1.0)
    xa, ya = aug(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(ya, y.flip(-1)) and torch.equal(xa, x.flip(-1))
    two_d = Augmenter({"rotation_deg": [0, 0, 20], "rotation_probability": 1.0, "gamma": [0.7, 1.5], "gamma_probability": 1.0,
                       "intensity_gain": [0.9, 1.1], "intensity_shift_hu": 20.0, "noise_hu": [0, 10], "blur_sigma_voxels": [0.5, 1.0],
                       "blur_probability": 1.0}, (1.0, 1.0, 1.0), 2, -1.0, image_channels=3, norm_scale=350.0)
    x2 = torch.randn(2, 4, 16, 16)
    y2 = torch.randint(0, 2, (2, 16, 16))
    xa2, ya2 = two_d(x2, y2, torch.Generator().manual_seed(4))
    assert xa2.shape == x2.shape and ya2.shape == y2.shape
    assert not torch.equal(xa2[:, :3], x2[:, :3])
    with pytest.raises(ValueError):
        Augmenter({"rotate": 1}, (1, 1, 1), 3, -1.0)


def test_low_resolution_augmentation_averages_slices_and_keeps_labels():
    # z stripes of period 2 voxels: averaging over pairs of slices along z (factor 2, z only) makes them flat
    x = torch.zeros(1, 1, 8, 6, 6)
    x[:, :, 0::2] = 1.0
    y = torch.randint(0, 3, (1, 8, 6, 6))
    aug = Augmenter({"low_resolution": {"probability": 1.0, "factor": [2.0, 2.0], "axes": [2]}}, (1, 1, 1), 3, -1.0)
    xa, ya = aug(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(ya, y)  # labels untouched
    assert torch.allclose(xa, torch.full_like(x, 0.5))  # slab means, interpolated back: exactly 0.5 everywhere
    in_plane = Augmenter({"low_resolution": {"probability": 1.0, "factor": [2.0, 2.0], "axes": [0, 1]}}, (1, 1, 1), 3, -1.0)
    assert torch.equal(in_plane(x, y, torch.Generator().manual_seed(0))[0], x)  # constant in-plane: nothing to lose
    off = Augmenter({"low_resolution": {"probability": 0.0, "factor": [2.0, 3.0]}}, (1, 1, 1), 3, -1.0)
    assert torch.equal(off(x, y, torch.Generator().manual_seed(0))[0], x)
    # its own in-plane factor: x stripes of period 2 flatten in-plane while the z stripes stay (z factor 1)
    both = torch.zeros(1, 1, 8, 6, 6)
    both[:, :, 0::2] = 1.0
    both[..., 0::2] += 2.0
    split = Augmenter({"low_resolution": {"probability": 1.0, "factor": [1.0, 1.0], "axes": [2],
                                          "inplane_factor": [2.0, 2.0]}}, (1, 1, 1), 3, -1.0)
    xs = split(both, y, torch.Generator().manual_seed(0))[0]
    assert torch.allclose(xs[:, :, 0::2], torch.full_like(xs[:, :, 0::2], 2.0))
    assert torch.allclose(xs[:, :, 1::2], torch.full_like(xs[:, :, 1::2], 1.0))


def test_schedules_follow_their_rules_and_resume_exactly():
    step = EpochSchedule({"name": "step", "step_epochs": 200, "gamma": 0.5}, 1e-4, 600)
    assert [step.lr_for_epoch(e) for e in (0, 199, 200, 400)] == pytest.approx([1e-4, 1e-4, 5e-5, 2.5e-5])
    cos = EpochSchedule({"name": "cosine", "min_lr": 0.0}, 1.0, 10)
    assert cos.lr_for_epoch(0) == 1.0 and cos.lr_for_epoch(5) == pytest.approx(0.5)
    plateau = EpochSchedule({"name": "ema_plateau", "factor": 0.2, "patience": 3, "ema_alpha": 0.5, "min_delta": 1e-3,
                             "min_lr": 1e-3}, 1e-2, 100)
    lrs, stopped_at = [], None
    for e, loss in enumerate([1.0, 0.9] + [0.8] * 28):
        lrs.append(plateau.lr_for_epoch(e))
        if plateau.end_epoch(e, loss):
            stopped_at = e
            break
    # EMA (alpha 0.5) approaches 0.8 by halving steps: 1, .95, .875, ... Best so far 0.801172 (epoch 8); epochs 9, 10
    # miss it by < 1e-3, epoch 11 (0.800146) beats it by 1.03e-3; then epochs 12-14 miss -> lr x0.2 after epoch 14,
    # 15-17 miss -> 4e-4 < min_lr stops training after epoch 17
    assert lrs[14] == pytest.approx(1e-2) and lrs[15] == pytest.approx(2e-3)
    assert stopped_at == 17 and plateau.lr == pytest.approx(4e-4)
    a = EpochSchedule({"name": "plateau", "factor": 0.1, "patience": 2}, 1.0, 10)
    b = EpochSchedule({"name": "plateau", "factor": 0.1, "patience": 2}, 1.0, 10)
    seq = [1.0, 1.0, 0.5, 0.6, 0.6, 0.7, 0.4]
    for e, loss in enumerate(seq[:4]):
        a.end_epoch(e, loss)
    b.load_state_dict(a.state_dict())
    for e, loss in enumerate(seq[4:], start=4):
        a.end_epoch(e, loss)
        b.end_epoch(e, loss)
    assert a.state_dict() == b.state_dict() and a.lr == pytest.approx(0.1)


def test_registration_augmentation_moves_anatomy_onto_the_hard_case():
    from Training.registration import deform_onto

    def case(shift, radius):
        arr = np.zeros((24, 32, 32), np.uint8)
        zz, yy, xx = np.meshgrid(*[np.arange(n) for n in arr.shape], indexing="ij")
        arr[((zz - 12) ** 2 + (yy - 16 - shift) ** 2 + (xx - 16 - shift) ** 2) <= radius ** 2] = 1
        lab = sitk.GetImageFromArray(arr)
        lab.SetSpacing((2.0, 2.0, 3.0))
        return ct_for(lab, np.random.default_rng(0)), lab

    fixed_ct, fixed_lab = case(0, 7)
    moving_ct, moving_lab = case(4, 8)
    ct, lab = deform_onto(moving_ct, moving_lab, fixed_ct, mesh_mm=32.0, iterations=20)
    f = sitk.GetArrayFromImage(fixed_lab) > 0
    before = 2 * (f & (sitk.GetArrayFromImage(moving_lab) > 0)).sum() / (f.sum() + (sitk.GetArrayFromImage(moving_lab) > 0).sum())
    after_m = sitk.GetArrayFromImage(lab) > 0
    after = 2 * (f & after_m).sum() / (f.sum() + after_m.sum())
    assert lab.GetSize() == fixed_lab.GetSize() and ct.GetPixelID() == moving_ct.GetPixelID()
    assert after > before + 0.1 and after > 0.85


def _coarse(**kw):
    return _stage(**dict({"name": "coarse", "role": "localize", "classes": ["background", "kidney"],
                          "spacing_mm": [6.0, 6.0, 6.0], "region": {"kind": "whole"}}, **kw))


def _gaussian_1d(arr: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """``arr`` convolved along ``axis`` with the discrete Gaussian of variance ``sigma``^2 voxels^2 (Lindeberg's kernel
    exp(-t) I_n(t), t = sigma^2, from the Bessel series; 6 sigma wide, normalised; borders repeated)."""
    from math import factorial

    t, r = sigma ** 2, int(np.ceil(6 * sigma))
    k = np.array([np.exp(-t) * sum((t / 2) ** (2 * j + abs(n)) / (factorial(j) * factorial(j + abs(n))) for j in range(30))
                  for n in range(-r, r + 1)])
    k /= k.sum()
    padded = np.pad(arr, [(r, r) if a == axis else (0, 0) for a in range(arr.ndim)], mode="edge")
    return sum(w * np.take(padded, np.arange(i, i + arr.shape[axis]), axis=axis) for i, w in enumerate(k))


def test_cascade_volumes_carry_the_truths_smoothed_one_hot_as_the_prior_stage_would(tmp_path):
    """The prior channels of a cached cascade volume are, recomputed here step by step: the truth by nearest neighbour
    on the coarse stage's whole-image grid (6 mm), kidney = any non-background label, [background, kidney] one-hot,
    smoothed by a one-voxel (discrete) Gaussian, resampled linearly onto the fine region's grid. Tolerance 5e-4: ITK
    truncates its kernel where the tails hold under 1e-4 (preprocessing's maximum error), this one 6 sigma out; float32.
    The unsmoothed one-hot is more than 0.1 away, zeros for the priors 1 away."""
    from KidneyTumorSegLib.stages import StageOutput, stage_regions
    from Training.preprocess import PRIOR_SIGMA_VOXELS, load_volume, spec_key

    labels = kits_like_labels()
    write_dataset(tmp_path / "data", {1: (ct_for(labels, np.random.default_rng(3)), labels)})
    cache = Cache(tmp_path / "cache")
    init_cache(cache, tmp_path / "data", None)
    fine = _stage(inputs={"prior_from": "coarse"})
    preprocess(cache, [_coarse(), fine])
    records = cache.records(fine, [_coarse()])
    assert len(records) == 2 and all(r["channels"] == 3 for r in records)

    canonical, _, _ = geo.canonical_axes(labels.GetDirection())
    coarse_grid = geo.grid_for_box(geo.image_box(labels), (6.0, 6.0, 6.0), canonical)
    lab = sitk.GetArrayFromImage(geo.resample(labels, coarse_grid, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    assert set(np.unique(lab)) == {0, 1, 2}  # the tumor is there: it must count as kidney
    hard = np.stack([lab == 0, lab > 0], axis=-1).astype(np.float64)
    soft = hard
    for axis in range(3):
        soft = _gaussian_1d(soft, PRIOR_SIGMA_VOXELS, axis)
    prior = geo.array_to_image(soft.astype(np.float32), coarse_grid, is_vector=True)
    hard_prior = geo.array_to_image(hard.astype(np.float32), coarse_grid, is_vector=True)
    boxes = stage_regions(_stage_spec(fine), labels, StageOutput(labels), (4.0, 4.0, 4.0))
    assert len(boxes) == 2
    for record, box in zip(records, boxes):
        image, target = load_volume(cache.folder(fine, [_coarse()]).path, record["stem"])
        grid = geo.grid_for_box(box, (4.0, 4.0, 4.0), canonical)
        expected = np.moveaxis(sitk.GetArrayFromImage(geo.resample(prior, grid, sitk.sitkLinear, 0.0)), -1, 0)
        unsmoothed = np.moveaxis(sitk.GetArrayFromImage(geo.resample(hard_prior, grid, sitk.sitkLinear, 0.0)), -1, 0)
        assert image.shape == (3,) + target.shape == (3,) + expected.shape[1:]
        assert np.max(np.abs(image[1:] - expected)) < 5e-4
        assert np.max(np.abs(image[1:] - unsmoothed)) > 0.1  # smoothed, not the hard one-hot
        assert np.allclose(image[1] + image[2], 1.0, atol=1e-4)
        assert float(np.median(image[0][np.asarray(target) == 1])) == pytest.approx((160 - 150) / 350, abs=0.03)

    # the folder key covers the prior stage's classes and spacing; a stage without prior_from keeps its old key
    assert spec_key(_stage()) == "fine-d9addeebd1" and spec_key(_stage(), [_coarse()]) == "fine-d9addeebd1"
    keys = {spec_key(fine, [_coarse()]), spec_key(fine, [_coarse(spacing_mm=[8.0, 8.0, 8.0])]),
            spec_key(fine, [_coarse(classes=["background", "kidney", "tumor"])]), spec_key(_stage())}
    assert len(keys) == 4
    with pytest.raises(InputError, match="prior_from"):
        spec_key(fine)  # the prior stage is not among the stages given


def _stage_spec(entry):
    from KidneyTumorSegLib.manifest import unweighted_stage

    return unweighted_stage(entry, "test")


def test_a_synthesis_cache_refuses_a_cascade(tmp_path):
    from Training.synth import preprocess_synth

    labels = kits_like_labels()
    (tmp_path / "labels" / "case_00001").mkdir(parents=True)
    sitk.WriteImage(labels, str(tmp_path / "labels" / "case_00001" / "segmentation.nii.gz"))
    with pytest.raises(InputError, match="synthesis cache holds tissue ids only"):
        preprocess_synth(tmp_path / "synth", [_coarse(), _stage(inputs={"prior_from": "coarse"})], tmp_path / "labels", None)


@pytest.mark.parametrize("writer", ["phantoms", "validation"])
def test_dataset_writers_say_when_their_output_folder_cannot_be_made(tmp_path, writer):
    from KidneyTumorSegLib.errors import OutputError
    from Training.phantom_anatomy import procedural_labels
    from Training.phantom_dataset import make_phantom_dataset
    from Training.validation_phantoms import make_validation_dataset

    labels = tmp_path / "labels" / "case_00001"
    labels.mkdir(parents=True)
    sitk.WriteImage(procedural_labels((40, 40, 20), (4.0, 4.0, 5.0), rng=np.random.default_rng(1)),
                    str(labels / "segmentation.nii.gz"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    make = make_phantom_dataset if writer == "phantoms" else make_validation_dataset
    with pytest.raises(OutputError, match="cannot create .*a_file/out"):
        make(tmp_path / "labels", blocker / "out")
    assert blocker.read_text() == "not a folder"
