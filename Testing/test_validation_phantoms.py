"""Tests of the independent validation phantom generator (Training.validation_phantoms)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_path
from KidneyTumorSegLib.errors import InputError
from Training.phantom_anatomy import procedural_labels  # a source of shapes only
from Training.validation_phantoms import PHASES, synthesize_validation_ct

MODULE = Path(__file__).resolve().parents[1] / "Training" / "validation_phantoms.py"
KITS_DIRECTION = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)  # slices along sitk axis 0, as KiTS stores them
# a small grid at adult physical size: 200 mm along z (index axis 0), 290 x 290 mm in-plane
SIZE, SPACING = (40, 58, 58), (5.0, 5.0, 5.0)


def _labels(seed=3, **kw):
    kw.setdefault("tumors", 1)
    return procedural_labels(SIZE, SPACING, rng=np.random.default_rng(seed), direction=KITS_DIRECTION, **kw)


@pytest.fixture(scope="module")
def labels():
    return _labels()


@pytest.fixture(scope="module")
def portal(labels):
    info = {}
    ct, lab = synthesize_validation_ct(labels, np.random.default_rng(7), phase="portal", noise_scale=0.0, info=info)
    return ct, lab, info


def _points(img, mask):
    """LPS points (N, 3) of the voxels where ``mask`` (numpy order of ``img``) holds."""
    z, y, x = np.nonzero(mask)
    idx = np.stack([x, y, z], 1).astype(float)
    m = np.asarray(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    return np.asarray(img.GetOrigin()) + idx @ m.T


def _hu_at(ct, point):
    return float(ct.GetPixel(ct.TransformPhysicalPointToIndex([float(v) for v in point])))


def test_geometry_is_the_label_grid_on_a_permuted_direction(labels, portal):
    ct, lab, _ = portal
    assert ct.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt8
    for img in (ct, lab):
        assert img.GetSize() == labels.GetSize()
        assert img.GetSpacing() == labels.GetSpacing()
        assert img.GetOrigin() == labels.GetOrigin()
        assert img.GetDirection() == labels.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(lab), sitk.GetArrayFromImage(labels))


def test_background_anatomy_sits_around_the_kidneys_in_physical_space(labels, portal):
    ct, lab, info = portal
    a, la = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(lab)
    pts = _points(lab, la > 0)
    mid = info["midline_x"]
    left, right = pts[pts[:, 0] > mid], pts[pts[:, 0] < mid]
    assert len(left) and len(right), "the midline must fall between the two kidneys"
    lc, rc = left.mean(0), right.mean(0)
    # bone (the spine) at kidney level lies medially, between the kidneys
    bone = _points(ct, (a > 300) & (la == 0))
    level = (np.abs(bone[:, 2] - (lc[2] + rc[2]) / 2) < 40) & (np.abs(bone[:, 1] - (lc[1] + rc[1]) / 2) < 50)
    bx = bone[level, 0]
    assert bx.size > 10
    assert np.mean((bx > rc[0]) & (bx < lc[0])) > 0.6
    assert abs(np.median(bx) - mid) < 25
    # the body outline contains the kidneys: soft tissue / fat lateral and posterior of each kidney, air far out
    for c, side, kid in ((lc, 1, left), (rc, -1, right)):
        edge = kid[:, 0].max() if side > 0 else kid[:, 0].min()
        assert _hu_at(ct, (edge + side * 20, c[1], c[2])) > -300
        assert _hu_at(ct, (c[0], kid[:, 1].max() + 15, c[2])) > -300
    assert a.min() <= -900  # air outside the body (and bowel gas)


def test_hu_per_phase(labels):
    medians, spreads = {}, {}
    for phase in PHASES:
        info = {}
        ct, lab = synthesize_validation_ct(labels, np.random.default_rng(11), phase=phase, noise_scale=0.0, info=info)
        assert info["phase"] == phase
        a, la = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(lab)
        k = a[la == 1]
        medians[phase] = float(np.median(k))
        spreads[phase] = float(np.percentile(k, 90) - np.percentile(k, 10))
    assert 10 < medians["unenhanced"] < 60
    for phase in ("arterial", "portal", "delayed"):
        assert medians[phase] > medians["unenhanced"] + 60, medians
        assert medians[phase] < 320, medians
    assert spreads["arterial"] > spreads["unenhanced"]  # corticomedullary differentiation


def test_cysts_are_water_and_kept_as_label_3():
    lab = _labels(seed=5, tumors=0, cysts=2)
    arr = sitk.GetArrayFromImage(lab)
    # one big cyst inside a kidney, so its interior is free of partial volume at 5 mm voxels
    z, y, x = np.argwhere(arr == 1)[len(np.argwhere(arr == 1)) // 2]
    zz, yy, xx = np.ogrid[:arr.shape[0], :arr.shape[1], :arr.shape[2]]
    arr[((zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= 4) & (arr > 0)] = 3
    big = sitk.GetImageFromArray(arr)
    big.CopyInformation(lab)
    ct, out = synthesize_validation_ct(big, np.random.default_rng(2), phase="portal", noise_scale=0.0)
    a, la = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(out)
    core = (arr == 3) & ((zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= 1)
    assert (la == 3).sum() == (arr == 3).sum()
    assert -5 <= np.median(a[core]) <= 25
    small = sitk.Cast(sitk.Resample(big, [n // 2 for n in big.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                                    big.GetOrigin(), [v * 2 for v in big.GetSpacing()], big.GetDirection()), sitk.sitkUInt8)
    assert (sitk.GetArrayFromImage(small) == 3).any()
    _, folded = synthesize_validation_ct(small, np.random.default_rng(2), cyst_as_label=False)
    assert not (sitk.GetArrayFromImage(folded) == 3).any()


def test_deterministic_from_the_seed():
    small = procedural_labels((24, 36, 36), (8.0, 8.0, 8.0), rng=np.random.default_rng(1), direction=KITS_DIRECTION)
    a = sitk.GetArrayFromImage(synthesize_validation_ct(small, np.random.default_rng(21))[0])
    b = sitk.GetArrayFromImage(synthesize_validation_ct(small, np.random.default_rng(21))[0])
    c = sitk.GetArrayFromImage(synthesize_validation_ct(small, np.random.default_rng(22))[0])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_one_kidney_cut_by_the_field_of_view():
    lab = procedural_labels(SIZE, SPACING, rng=np.random.default_rng(4), direction=KITS_DIRECTION, kidneys="left",
                            cut_by_fov=True, tumors=1)
    info = {}
    ct, out = synthesize_validation_ct(lab, np.random.default_rng(1), noise_scale=0.5, info=info)
    assert ct.GetSize() == lab.GetSize() and info["kidneys"] == [1]
    kid = _points(out, sitk.GetArrayFromImage(out) > 0)
    assert info["midline_x"] < kid[:, 0].mean() - 30  # the midline lies medial (to the right) of a left kidney


def test_bad_input_is_an_input_error(labels):
    rng = np.random.default_rng(0)
    with pytest.raises(InputError):
        synthesize_validation_ct(np.zeros((4, 4, 4), np.uint8), rng)
    with pytest.raises(InputError):
        synthesize_validation_ct(sitk.Image(8, 8, sitk.sitkUInt8), rng)
    with pytest.raises(InputError):
        synthesize_validation_ct(sitk.Cast(labels, sitk.sitkFloat32), rng)
    with pytest.raises(InputError):
        synthesize_validation_ct(sitk.Cast(labels, sitk.sitkUInt8) * 2, rng)  # values up to 6
    with pytest.raises(InputError):
        synthesize_validation_ct(labels, rng, phase="venous")
    with pytest.raises(InputError):
        synthesize_validation_ct(labels, 42)


def test_does_not_import_or_reuse_the_training_synthesizer():
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    forbidden_modules = {"phantoms", "phantom_anatomy", "Training.phantoms", "Training.phantom_anatomy"}
    forbidden_names = {"body_tissues", "draw_intensities", "smooth_noise", "synthesize_ct", "Tissue", "_tissue_tables"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name for a in node.names} & forbidden_modules
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "") not in forbidden_modules, node.module
            assert not {a.name for a in node.names} & forbidden_names
        elif isinstance(node, ast.Name):
            assert node.id not in forbidden_names, node.id
        elif isinstance(node, ast.Attribute):
            assert node.attr not in forbidden_names, node.attr
    code = (
        "import sys, numpy as np, SimpleITK as sitk\n"
        "from Training.validation_phantoms import synthesize_validation_ct, make_validation_case\n"
        "a = np.zeros((20, 30, 30), np.uint8); a[8:13, 12:18, 4:10] = 1; a[8:13, 12:18, 20:26] = 1\n"
        "img = sitk.GetImageFromArray(a); img.SetSpacing((8.0, 8.0, 8.0))\n"
        "make_validation_case(img, 1, downsample_inplane=1.5)\n"
        "print(sorted(m for m in sys.modules if m in ('Training.phantoms', 'Training.phantom_anatomy')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1")).stdout.strip()
    assert out == "[]", out


def test_validation_phantoms_command(tmp_path):
    from Training.cli import main

    src = tmp_path / "labels"
    for n in (3, 4):
        lab = procedural_labels((24, 40, 40), (8.0, 7.5, 7.5), rng=np.random.default_rng(n), direction=KITS_DIRECTION)
        (src / f"case_{n:05d}").mkdir(parents=True)
        sitk.WriteImage(lab, str(src / f"case_{n:05d}" / "segmentation.nii.gz"))
    out = tmp_path / "val"
    args = ["--quiet", "validation-phantoms", "--labels", str(src), "--out", str(out), "--cases", "3-4", "--seed", "5",
            "--downsample-inplane", "2", "--max-slices", "20"]
    assert main(args) == 0
    record = json.loads((out / "validation_phantoms.json").read_text())
    assert record["never_train"] is True and record["cases"] == [3, 4]
    assert set(record["per_case"]["case_00003"]) >= {"phase", "tumor_type", "kernel"}
    ct = sitk.ReadImage(str(out / "case_00003" / "imaging.nii.gz"))
    seg = sitk.ReadImage(str(out / "case_00003" / "segmentation.nii.gz"))
    assert ct.GetSize() == seg.GetSize() == (20, 20, 20)
    assert np.allclose(ct.GetDirection(), KITS_DIRECTION) and np.allclose(ct.GetOrigin(), seg.GetOrigin())
    assert ct.GetPixelID() == sitk.sitkInt16
    assert not list(out.rglob(".*tmp*")), "no temporary files left"
    assert main(args[:-2] + ["--max-slices", "16"]) == 2  # other options into the same folder: refused


def test_real_kits_label_map():
    from Training.phantom_dataset import reduce_grid

    labels = sitk.ReadImage(str(shared_path("data", "kits23_labels", "case_00130", "segmentation.nii.gz")))
    reduced = reduce_grid(sitk.Cast(labels, sitk.sitkUInt8), 4.0, 24)
    info = {}
    ct, lab = synthesize_validation_ct(reduced, np.random.default_rng(0), phase="arterial", info=info)
    assert ct.GetSize() == reduced.GetSize() and ct.GetDirection() == reduced.GetDirection()
    assert ct.GetOrigin() == reduced.GetOrigin() and ct.GetSpacing() == reduced.GetSpacing()
    la, a = sitk.GetArrayFromImage(lab), sitk.GetArrayFromImage(ct)
    pts = _points(lab, la > 0)
    assert pts[:, 0].min() < info["midline_x"] < pts[:, 0].max()
    assert np.median(a[la == 1]) > 100
