"""Anatomical plausibility of kidney components and the bounds on the fine stage's regions.

A synthetic CT built in physical LPS mm (body, a spine, lungs at the top, two kidneys, and
kidney-dense structures where no kidney can be), segmented by a band classifier (kidney = 100..200 HU,
so the answer is known exactly): implausible components are dropped with a note, the fine stage
runs on at most two bounded regions, and rules whose landmark is missing are skipped with a note.
"""

import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import normalized, save_test_package, window_vb
from KidneyTumorSegLib import geometry as geo
from KidneyTumorSegLib import pipeline
from KidneyTumorSegLib.anatomy import PlausibilityConfig, estimate_landmarks, judge_components
from KidneyTumorSegLib.labels import connected_components
from KidneyTumorSegLib.manifest import ModelManifest
from KidneyTumorSegLib.metrics import dice
from KidneyTumorSegLib.networks import _REGISTRY, register
from KidneyTumorSegLib.pipeline import Segmenter, StageOutput, stage_regions
from KidneyTumorSegLib.postprocessing import PostprocessingConfig, postprocess

if "test_band_kidney" not in _REGISTRY:

    @register("test_band_kidney")
    class BandKidney(torch.nn.Module):
        """Test network: kidney where the (normalised) intensity lies in [low, high], background elsewhere."""

        min_input_multiple = (1, 1, 1)
        spatial_dims = 3

        def __init__(self, in_channels=1, num_classes=2, low=normalized(100.0), high=normalized(200.0)):
            super().__init__()
            self.low, self.high = low, high

        def forward(self, x):
            x0 = x[:, :1]
            inside = torch.minimum(x0 - self.low, self.high - x0)
            return torch.cat([torch.zeros_like(x0), 50.0 * inside], dim=1)


KIDNEY_HU, BODY_HU, BONE_HU, LUNG_HU = 150.0, 40.0, 700.0, -850.0
SPINE = (0.0, 70.0)                     # LPS x, y of the spine axis (mm)
LUNG_BASE_Z = 80.0
KIDNEYS = [((-70.0, 45.0, -20.0), (25.0, 28.0, 50.0)), ((70.0, 45.0, -20.0), (25.0, 28.0, 50.0))]   # 147 mL each
ANTERIOR_BLOB = ((-20.0, -60.0, -10.0), (70.0, 40.0, 70.0))     # 821 mL, 130 mm anterior of the spine: bowel/liver-like
CHEST_BLOB = ((60.0, 40.0, 105.0), (20.0, 20.0, 25.0))          # 42 mL, beside the spine but above the lung bases
IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
KITS_PERMUTED = (0, 0, 1, 0, 1, 0, -1, 0, 0)


def _ellipsoid(p, centre, semi):
    return sum(((p[k] - centre[k]) / semi[k]) ** 2 for k in range(3)) <= 1.0


def phantom(size=(100, 84, 80), spacing=(3.5, 3.5, 3.5), direction=IDENTITY, spine=True, lungs=True, kidneys=KIDNEYS,
            blobs=(ANTERIOR_BLOB, CHEST_BLOB), origin_shift=(0.0, 0.0, 0.0)):
    """(CT in HU, truth kidney mask) on a grid centred at LPS (0, 0, 0) + ``origin_shift``, built in physical space."""
    d = np.asarray(direction, float).reshape(3, 3)
    size_a, spacing_a = np.asarray(size), np.asarray(spacing, float)
    origin = -d @ (spacing_a * (size_a - 1) / 2.0) + np.asarray(origin_shift)
    idx = np.indices(tuple(reversed(size))).reshape(3, -1)[::-1].astype(float)   # (x, y, z) index, array order
    p = origin[:, None] + d @ (spacing_a[:, None] * idx)
    hu = np.full(p.shape[1], -1000.0)
    hu[(p[0] / 150.0) ** 2 + (p[1] / 110.0) ** 2 <= 1.0] = BODY_HU
    if lungs:
        for x in (-70.0, 70.0):
            hu[(((p[0] - x) / 55.0) ** 2 + ((p[1] - 10.0) / 80.0) ** 2 <= 1.0) & (p[2] > LUNG_BASE_Z)] = LUNG_HU
    if spine:
        hu[(p[0] - SPINE[0]) ** 2 + (p[1] - SPINE[1]) ** 2 <= 15.0 ** 2] = BONE_HU
    truth = np.zeros(p.shape[1], bool)
    for centre, semi in kidneys:
        m = _ellipsoid(p, centre, semi)
        hu[m] = KIDNEY_HU
        truth |= m
    for centre, semi in blobs:
        hu[_ellipsoid(p, centre, semi)] = KIDNEY_HU
    shape = tuple(reversed(size))
    ct = sitk.GetImageFromArray(hu.reshape(shape).astype(np.int16))
    ct.SetSpacing(tuple(float(s) for s in spacing))
    ct.SetDirection(tuple(float(v) for v in direction))
    ct.SetOrigin(tuple(float(o) for o in origin))
    return ct, truth.reshape(shape)


def band_manifest(region_extra=None, post_plausibility=None, max_components=2):
    band = {"name": "test_band_kidney", "kwargs": {}}
    region = {"kind": "components", "labels": ["kidney"], "margin_mm": 10.0, "max_components": max_components}
    region.update(region_extra or {})
    post = {"fill_holes": False, "keep_largest_kidneys": False}
    if post_plausibility is not None:
        post["plausibility"] = post_plausibility
    return {"schema_version": 1, "name": "test-plausibility", "version": "0.0.1", "description": "test package",
            "intended_use": "tests only", "licence": "Apache-2.0", "labels": {"background": 0, "kidney": 1, "tumor": 2},
            "stages": [
                {"name": "coarse", "role": "localize", "classes": ["background", "kidney"], "network": band,
                 "weights": [{"file": "coarse.pt"}], "spacing_mm": [6.0, 6.0, 6.0], "normalization": window_vb(),
                 "patch_size": [32, 32, 32]},
                {"name": "fine", "role": "segment", "classes": ["background", "kidney"], "network": band,
                 "weights": [{"file": "fine.pt"}], "spacing_mm": [3.0, 3.0, 3.0], "normalization": window_vb(),
                 "patch_size": [16, 16, 16], "region": region}],
            "postprocessing": post, "provenance": {"trained_on": "nothing: a fixed band classifier for tests"}}


def run_recording_regions(tmp_path, manifest, ct, monkeypatch):
    """Segment ``ct``; return the result and the working grids the fine stage ran on."""
    package = save_test_package(tmp_path / "pkg", manifest)
    grids = []
    original = pipeline.stage_input_channels

    def spy(stage, manifest_, source, grid, previous, outputs):
        if stage.name == "fine":
            grids.append(grid)
        return original(stage, manifest_, source, grid, previous, outputs)

    monkeypatch.setattr(pipeline, "stage_input_channels", spy)
    return Segmenter(package, device="cpu").segment(ct), grids


def with_checksums(manifest):
    for stage in manifest["stages"]:
        for w in stage["weights"]:
            w["sha256"] = "0" * 64
    return manifest


# ------------------------------------------------------------------------------- landmarks
@pytest.mark.parametrize("direction", [IDENTITY, KITS_PERMUTED], ids=["identity", "kits_permuted"])
def test_landmarks_in_lps_for_any_direction(direction):
    ct, _ = phantom(direction=direction, size=(100, 84, 80) if direction == IDENTITY else (80, 84, 100),
                    origin_shift=(12.0, -7.0, 30.0))
    lm = estimate_landmarks(ct)
    assert lm.has_spine and lm.lung_base_z is not None
    # the field of view moved, the anatomy did not: the same LPS landmarks, within one 4 mm landmark voxel
    assert np.all(np.abs(lm.spine_x - SPINE[0]) <= 3.0), lm.spine_x
    assert np.all(np.abs(lm.spine_y - SPINE[1]) <= 3.0), lm.spine_y
    assert abs(lm.lung_base_z - LUNG_BASE_Z) <= 4.0, lm.lung_base_z


def test_no_spine_and_no_lungs_are_reported_not_guessed():
    ct, _ = phantom(spine=False, lungs=False)
    lm = estimate_landmarks(ct)
    assert not lm.has_spine and "no spine found" in lm.spine_reason
    assert lm.lung_base_z is None and "no lung bases" in lm.lung_reason


# ------------------------------------------------------------------------------- (a), (b): end to end
def test_implausible_components_are_dropped_before_the_fine_stage_and_kidneys_kept(tmp_path, monkeypatch):
    ct, truth = phantom()
    manifest = band_manifest(region_extra={"plausibility": {"enabled": True}}, post_plausibility={"enabled": True})
    result, grids = run_recording_regions(tmp_path, manifest, ct, monkeypatch)
    out = sitk.GetArrayFromImage(result.labels) > 0
    assert dice(out, truth) > 0.95
    assert sorted(k["side"] for k in result.stats["kidneys"]) == ["left", "right"]
    dropped = [n for n in result.notes if "dropped an implausible kidney component" in n]
    assert len(dropped) == 2, result.notes
    assert all(n.startswith("stage 'fine' regions:") for n in dropped)
    assert any("130 mm anterior of the spine" in n and re.search(r"\(8[0-4]\d mL", n) for n in dropped)  # the 821 mL blob
    assert any("above the lung bases" in n for n in dropped)                           # the one in the chest
    assert not any("skipped" in n for n in result.notes)                               # every landmark was found
    assert len(grids) == 2                                                              # one region per kidney
    for g in grids:
        assert all(n * s <= 130.0 for n, s in zip(g.size, g.spacing)), g                # kidney boxes, not the blob's


def test_without_plausibility_the_blob_takes_a_kidney_slot_and_its_box_is_cut_to_max_size(tmp_path, monkeypatch):
    ct, truth = phantom()
    limit = [120.0, 120.0, 150.0]
    result, grids = run_recording_regions(tmp_path, band_manifest(region_extra={"max_size_mm": limit}), ct, monkeypatch)
    assert len(grids) == 2
    for g in grids:   # the grid covers its box by whole voxels: at most one voxel more than the limit
        assert all(n * s <= m + s for n, s, m in zip(g.size, g.spacing, limit)), g
    cut = [n for n in result.notes if "was cut to" in n]
    assert len(cut) == 1 and re.search(r"region of 1[56]\d x \d+ x 1[56]\d mm was cut to 120 x \d+ x 150 mm", cut[0]), result.notes
    out = sitk.GetArrayFromImage(result.labels) > 0
    assert dice(out, truth) < 0.8    # one kidney lost to the blob: what plausibility is for


# ------------------------------------------------------------------------------- (c) cut by the field of view
def test_components_cut_by_the_field_of_view_are_exempt_from_the_minimum_volume():
    # right kidney centred at the image's inferior edge: half of it is outside the field of view
    kidneys = [((-70.0, 45.0, -140.0), (25.0, 28.0, 50.0)), ((70.0, 45.0, -20.0), (12.0, 14.0, 25.0))]  # 18 mL
    ct, truth = phantom(kidneys=kidneys, blobs=())
    labels = sitk.GetImageFromArray(truth.astype(np.uint8))
    labels.CopyInformation(ct)
    cfg = PlausibilityConfig(enabled=True, min_volume_ml=100.0)
    verdicts, skipped = judge_components(connected_components(truth), labels, geo.image_box(ct), estimate_landmarks(ct), cfg)
    assert not skipped
    by_side = {("left" if v.centroid_lps[0] > 0 else "right"): v for v in verdicts}
    assert by_side["right"].cut_by_fov and by_side["right"].keep and by_side["right"].volume_ml < 100.0
    assert not by_side["left"].cut_by_fov and not by_side["left"].keep and "less than the plausible 100 mL" in by_side["left"].reason

    notes = []
    out = sitk.GetArrayFromImage(postprocess(labels, ct, PostprocessingConfig(fill_holes=False, plausibility=cfg), notes=notes))
    right = truth & (np.indices(truth.shape)[2] < truth.shape[2] // 2)
    np.testing.assert_array_equal(out > 0, right)
    assert len(notes) == 1 and notes[0].startswith("post-processing: dropped an implausible kidney component (18 mL")


def test_horseshoe_kidney_on_the_midline_is_kept_but_a_midline_blob_is_not():
    ct, _ = phantom(kidneys=(), blobs=())
    lm = estimate_landmarks(ct)
    arr = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    labels = sitk.GetImageFromArray(arr)
    labels.CopyInformation(ct)
    idx = np.indices(arr.shape).reshape(3, -1)[::-1].astype(float)
    p = (np.asarray(ct.GetOrigin())[:, None] + np.diag(ct.GetSpacing()) @ idx).reshape(3, *arr.shape)
    horseshoe = (((np.abs(p[0]) - 60.0) / 25.0) ** 2 + ((p[1] - 45.0) / 25.0) ** 2 + ((p[2] + 20.0) / 50.0) ** 2 <= 1)
    horseshoe |= (np.abs(p[0]) <= 60) & (np.abs(p[1] - 10.0) <= 12) & (np.abs(p[2] + 55.0) <= 12)   # the isthmus, in front of the spine
    aorta = (p[0] ** 2 + (p[1] - 20.0) ** 2 <= 12.0 ** 2) & (p[2] > 20) & (p[2] < 120)
    cc = connected_components(horseshoe | aorta)
    assert cc.max() == 2
    verdicts, _ = judge_components(cc, labels, geo.image_box(ct), lm, PlausibilityConfig(enabled=True))
    by_volume = sorted(verdicts, key=lambda v: -v.volume_ml)
    assert by_volume[0].keep, by_volume[0].reason                                        # the horseshoe kidney
    assert not by_volume[1].keep and "from the spine axis" in by_volume[1].reason        # aorta-like, on the midline


# ------------------------------------------------------------------------------- (d) no landmark
def test_without_a_spine_or_lungs_the_position_rules_are_skipped_with_a_note():
    ct, truth = phantom(spine=False, lungs=False)
    arr = sitk.GetArrayFromImage(ct)
    labels = sitk.GetImageFromArray((arr == KIDNEY_HU).astype(np.uint8))   # kidneys + both blobs
    labels.CopyInformation(ct)
    notes = []
    out = postprocess(labels, ct, PostprocessingConfig(fill_holes=False, keep_largest_kidneys=False,
                                                        plausibility=PlausibilityConfig(enabled=True)), notes=notes)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(labels))   # nothing judged by position
    assert any("beside the spine) skipped: no spine found" in n for n in notes), notes
    assert any("lung bases' skipped: no lung bases in the field of view" in n for n in notes), notes
    assert not any("dropped" in n for n in notes)
    # the volume rule still applies without landmarks
    notes = []
    postprocess(labels, None, PostprocessingConfig(fill_holes=False, plausibility=PlausibilityConfig(enabled=True, max_volume_ml=500.0)),
                notes=notes)
    assert any("no CT to find the spine" in n for n in notes)
    assert sum("more than the plausible 500 mL" in n for n in notes) == 1


# ------------------------------------------------------------------------------- (f) at most two regions
def test_the_fine_stage_runs_on_at_most_two_regions_when_the_coarse_stage_gives_five(tmp_path, monkeypatch):
    kidneys = [((x, 45.0, z), (14.0, 14.0, 14.0)) for x, z in ((-110, -80), (-60, 0), (60, -80), (110, 0), (-70, 80))]
    ct, _ = phantom(kidneys=kidneys, blobs=(), lungs=False)
    manifest = band_manifest()
    package = save_test_package(tmp_path / "pkg", manifest)
    from KidneyTumorSegLib.pipeline import RunState

    coarse = Segmenter(package, device="cpu")._run_stage(package.manifest.stage("coarse"), RunState(ct, None),
                                                         lambda *a: None)
    assert connected_components(sitk.GetArrayFromImage(coarse.labels) > 0).max() == 5
    boxes = stage_regions(package.manifest.stage("fine"), ct, coarse, (3.0, 3.0, 3.0))
    assert len(boxes) == 2
    result, grids = run_recording_regions(tmp_path / "run", manifest, ct, monkeypatch)
    assert len(grids) == 2
    assert len(result.stats["kidneys"]) == 2


# ------------------------------------------------------------------------------- (e) manifest validation
@pytest.mark.parametrize("region_extra, message", [
    ({"max_components": 3}, "max_components must be 1 or 2"),
    ({"max_components": 0}, "max_components must be 1 or 2"),
    ({"max_size_mm": [250, 250]}, "max_size_mm must be a list of 3 numbers"),
    ({"max_size_mm": [250, -1, 300]}, "max_size_mm entries must be positive"),
    ({"plausibility": {"enabled": "yes"}}, "stages[1].region.plausibility: 'enabled' must be true or false"),
    ({"plausibility": {"min_volume_ml": 50, "max_volume_ml": 40}}, "min_volume_ml (50) must be below max_volume_ml (40)"),
    ({"plausibility": {"max_lateral_mm": 0}}, "'max_lateral_mm' must be a number > 0"),
    ({"plausibility": {"max_fraction_above_lung_base": 1.5}}, "'max_fraction_above_lung_base' must be a number in (0, 1]"),
    ({"plausibility": {"lateral_mm": [15, 150]}}, "unknown key(s) ['lateral_mm']; valid keys are enabled, min_volume_ml"),
])
def test_region_manifest_keys_are_validated(region_extra, message):
    manifest = with_checksums(band_manifest(region_extra=region_extra))
    with pytest.raises(ValueError) as info:
        ModelManifest.from_dict(manifest)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_new_keys_only_where_they_apply_and_round_trip():
    manifest = with_checksums(band_manifest())
    manifest["stages"][0]["region"] = {"kind": "whole", "plausibility": {"enabled": True}}
    with pytest.raises(ValueError, match=r"stages\[0\].region.plausibility only applies to components regions"):
        ModelManifest.from_dict(manifest)
    manifest["stages"][0]["region"] = {"kind": "whole", "max_size_mm": [1, 2, 3]}
    with pytest.raises(ValueError, match="max_size_mm only applies to components regions"):
        ModelManifest.from_dict(manifest)
    manifest = with_checksums(band_manifest(post_plausibility={"enabled": True, "max_anterior_mm": "80"}))
    with pytest.raises(ValueError, match=r"manifest.postprocessing: post-processing key 'plausibility': 'max_anterior_mm' must be a finite number; got '80'"):
        ModelManifest.from_dict(manifest)
    m = ModelManifest.from_dict(with_checksums(band_manifest(region_extra={"plausibility": {"enabled": True, "min_volume_ml": 10}},
                                                             post_plausibility={"enabled": True})))
    region = m.stage("fine").region
    assert region.max_size_mm == (300.0, 250.0, 300.0) and region.plausibility.min_volume_ml == 10.0
    assert m.postprocessing.plausibility.enabled and not m.stage("coarse").region.plausibility.enabled
    assert ModelManifest.from_dict(m.to_dict()) == m


def test_fragments_get_one_summary_note_and_components_one_note_each():
    ct, _ = phantom(kidneys=(), blobs=(), lungs=False)
    arr = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    for k in range(5):                      # five single-voxel fragments (0.04 mL each), inside the image
        arr[10 + 4 * k, 40, 20] = 1
    arr[60:66, 40:46, 40:46] = 1            # a 9 mL blob on the midline, not cut by the field of view
    labels = sitk.GetImageFromArray(arr)
    labels.CopyInformation(ct)
    notes = []
    out = postprocess(labels, ct, PostprocessingConfig(fill_holes=False, plausibility=PlausibilityConfig(enabled=True)), notes=notes)
    assert not sitk.GetArrayViewFromImage(out).any()
    dropped = [n for n in notes if "dropped" in n]
    assert len(dropped) == 2, notes
    assert "dropped 5 implausible kidney fragment(s) under 1 mL (0.2 mL in all)" in dropped[1]
    assert "(9 mL" in dropped[0] and "less than the plausible 20 mL" in dropped[0]


def test_region_memory_is_checked_from_the_real_region_sizes():
    from KidneyTumorSegLib.errors import InsufficientMemoryError
    from KidneyTumorSegLib.validation import check_region_memory, estimate_region_memory_bytes

    assert estimate_region_memory_bytes((10, 20, 30), 1, 4) == 4 * 6000 * (1 + 2 * 4 + 1)
    check_region_memory("fine", [(10, 20, 30), (5, 5, 5)], 1, 4, available=240_000)
    with pytest.raises(InsufficientMemoryError, match=r"stage 'fine': its largest region \(10x20x30 voxels\)"):
        check_region_memory("fine", [(5, 5, 5), (10, 20, 30)], 1, 4, available=239_999)


def test_a_dropped_blob_does_not_count_as_the_largest_kidney_afterwards():
    ct, _ = phantom(kidneys=(), blobs=(), lungs=False)
    arr = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    arr[40:71, 5:35, 10:40] = 1           # 27 900 voxels of 42.875 mm^3: 1196 mL, over the 1000 mL allowed
    arr[28:39, 49:60, 64:75] = 1          # 57 mL at LPS ~(70, 45, -20): beside the spine, under 10 % of the blob
    labels = sitk.GetImageFromArray(arr)
    labels.CopyInformation(ct)
    config = PostprocessingConfig(fill_holes=False, plausibility=PlausibilityConfig(enabled=True, max_volume_ml=1000.0))
    notes = []
    out = sitk.GetArrayFromImage(postprocess(labels, ct, config, notes=notes))
    expected = np.zeros_like(arr)
    expected[28:39, 49:60, 64:75] = 1
    np.testing.assert_array_equal(out, expected)
    assert sum("more than the plausible 1000 mL" in n for n in notes) == 1
