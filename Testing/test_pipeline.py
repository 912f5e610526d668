"""Coarse-to-fine pipeline end to end with an exact intensity-classifier network.

The classifier (conftest) labels each voxel by its intensity, so the right answer is known
exactly; what these tests check is the pipeline: regions, resampling, geometry, paste-back,
cascades, masking, 2.5D stacking, ensembles and the awkward anatomies.
"""

import math
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TEST_HU, classifier_manifest, ct_from_labels, normalized, save_test_package, window_vb
from KidneyTumorSegLib.errors import CancelledError
from KidneyTumorSegLib.metrics import dice
from KidneyTumorSegLib.networks import _REGISTRY, register
from KidneyTumorSegLib.pipeline import Segmenter, stage_input_channels
from KidneyTumorSegLib.predictor import StagePredictor
from KidneyTumorSegLib import geometry as geo
from Training.phantoms import procedural_labels

if "test_intensity_classifier_2d" not in _REGISTRY:

    @register("test_intensity_classifier_2d")
    class IntensityClassifier2d(torch.nn.Module):
        """2.5D test network: classifies the centre one of its k slice channels by intensity."""

        min_input_multiple = (1, 1)
        spatial_dims = 2

        def __init__(self, in_channels=3, num_classes=3, centers=(0.0, 1.0, 2.0)):
            super().__init__()
            self.k = in_channels
            self.register_buffer("centers", torch.tensor(centers, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

        def forward(self, x):
            return -20.0 * (x[:, self.k // 2:self.k // 2 + 1] - self.centers).abs()


def segment_and_score(package, labels, **kwargs):
    result = Segmenter(package, device="cpu", **kwargs).segment(ct_from_labels(labels))
    out = sitk.GetArrayFromImage(result.labels)
    truth = sitk.GetArrayFromImage(labels)
    for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(result.labels, getter)() == getattr(labels, getter)(), getter
    assert result.labels.GetPixelID() == sitk.sitkUInt8
    return result, dice(out > 0, truth > 0), dice(out == 2, truth == 2)


def rotation(deg_x, deg_z):
    a, b = math.radians(deg_x), math.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    return tuple((rz @ rx).ravel())


GEOMETRIES = {
    "identity": dict(size=(96, 80, 64), spacing=(2.0, 2.0, 2.5)),
    "kits_permuted": dict(size=(64, 80, 96), spacing=(2.5, 2.0, 2.0), direction=(0, 0, 1, 0, 1, 0, -1, 0, 0)),
    "oblique": dict(size=(96, 80, 64), spacing=(2.0, 2.0, 2.5), direction=rotation(20, 15)),
    "anisotropic_0.5x5": dict(size=(320, 256, 24), spacing=(0.6, 0.6, 5.0)),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_output_is_on_the_input_grid_and_matches_truth(classifier_package, name):
    labels = procedural_labels(rng=np.random.default_rng(1), tumors=1, **GEOMETRIES[name])
    result, kidney, tumor = segment_and_score(classifier_package, labels)
    assert kidney > 0.95, kidney
    assert tumor > 0.85, tumor
    assert sorted(k["side"] for k in result.stats["kidneys"]) == ["left", "right"]
    assert set(result.timings) >= {"coarse", "fine", "postprocessing", "total"}


@pytest.mark.parametrize("kidneys,n_components", [("left", 1), ("right", 1), ("horseshoe", 1), ("both", 2)])
def test_solitary_and_horseshoe_kidneys(classifier_package, kidneys, n_components):
    labels = procedural_labels(rng=np.random.default_rng(2), kidneys=kidneys, tumors=1, **GEOMETRIES["identity"])
    result, kidney, _ = segment_and_score(classifier_package, labels)
    assert kidney > 0.95
    assert len(result.stats["kidneys"]) == n_components


def test_no_kidney_gives_an_empty_map_and_a_note(classifier_package):
    labels = procedural_labels(rng=np.random.default_rng(3), kidneys="none", tumors=0, **GEOMETRIES["identity"])
    result = Segmenter(classifier_package, device="cpu").segment(ct_from_labels(labels))
    assert not sitk.GetArrayViewFromImage(result.labels).any()
    assert any("no kidney" in n for n in result.notes)


def test_a_scan_whose_kidneys_do_not_enhance_gets_a_warning(classifier_package):
    from KidneyTumorSegLib.enhancement import ENHANCED_KIDNEY_MIN_HU, enhancement_note

    labels = procedural_labels(rng=np.random.default_rng(1), tumors=1, **GEOMETRIES["identity"])
    enhanced = Segmenter(classifier_package, device="cpu").segment(ct_from_labels(labels))
    assert not any("contrast-enhanced" in n for n in enhanced.notes)  # kidneys at 150 HU: no warning
    lab = sitk.GetArrayFromImage(labels)
    hu = np.where(lab == 1, 30.0, np.where(lab > 1, 25.0, -100.0)).astype(np.float32)  # unenhanced kidney, lesion
    ct = sitk.GetImageFromArray(hu)
    ct.CopyInformation(labels)
    note = enhancement_note(ct, labels)
    assert note and "30 HU" in note and f"{ENHANCED_KIDNEY_MIN_HU:.0f} HU" in note
    # under 1 mL of parenchyma (a model that calls the whole kidney a lesion): judged on kidney + lesions
    lesion_only = sitk.GetImageFromArray(np.where(lab > 0, 2, 0).astype(np.uint8))
    lesion_only.CopyInformation(labels)
    assert "30 HU" in enhancement_note(ct, lesion_only)  # mostly former parenchyma voxels: median 30
    bright = sitk.GetImageFromArray(np.where(lab > 0, 180.0, -100.0).astype(np.float32))
    bright.CopyInformation(labels)
    assert enhancement_note(bright, labels) is None


def test_a_kidney_called_mostly_tumor_at_unenhanced_density_gets_a_warning():
    """The failure seen on a real unenhanced CT: one kidney labelled almost all tumor at ~11 HU, and
    the parenchyma label on some other bright structure (so the parenchyma median looks enhanced)."""
    from KidneyTumorSegLib.enhancement import ENHANCED_LESION_MIN_HU, enhancement_note

    lab = np.zeros((40, 40, 40), np.uint8)
    lab[5:20, 5:20, 5:20] = 2            # a 3375-voxel kidney region
    lab[5:20, 5:20, 5:8] = 1             # 675 voxels of it parenchyma: 80 % tumor
    lab[25:35, 25:35, 25:35] = 1         # a separate bright "kidney"
    hu = np.full(lab.shape, -100.0, np.float32)
    hu[lab == 1] = 180.0
    hu[lab == 2] = 11.0
    labels, ct = sitk.GetImageFromArray(lab), sitk.GetImageFromArray(hu)
    for img in (labels, ct):
        img.SetSpacing((2.0, 2.0, 2.0))   # 8 mm^3 voxels: that kidney is 27 mL
    note = enhancement_note(ct, labels)
    assert note and "27 mL" in note and "11 HU" in note and f"{ENHANCED_LESION_MIN_HU:.0f} HU" in note
    enhancing = sitk.GetImageFromArray(np.where(lab == 2, 60.0, hu).astype(np.float32))
    enhancing.CopyInformation(ct)
    assert enhancement_note(enhancing, labels) is None        # an enhancing tumor: no warning
    half = lab.copy()
    half[5:20, 5:20, 5:13] = 1                                # 47 % tumor: judged by the parenchyma only
    half_labels = sitk.GetImageFromArray(half)
    half_labels.CopyInformation(ct)
    assert enhancement_note(ct, half_labels) is None


def test_kidney_cut_by_the_field_of_view(classifier_package):
    labels = procedural_labels(rng=np.random.default_rng(4), cut_by_fov=True, tumors=1, **GEOMETRIES["identity"])
    _, kidney, _ = segment_and_score(classifier_package, labels)
    assert kidney > 0.95


def test_fixed_size_roi_two_phase_style(tmp_path):
    manifest = classifier_manifest(region={"kind": "fixed_box", "size_mm": [150.0, 120.0, 120.0], "labels": ["kidney"]})
    package = save_test_package(tmp_path / "pkg", manifest)
    labels = procedural_labels(rng=np.random.default_rng(5), tumors=1, **GEOMETRIES["identity"])
    _, kidney, tumor = segment_and_score(package, labels)
    assert kidney > 0.95 and tumor > 0.85


def test_cascade_feeds_the_coarse_probabilities(tmp_path):
    manifest = classifier_manifest(fine_inputs={"prior_from": "coarse"})
    package = save_test_package(tmp_path / "pkg", manifest)
    m = package.manifest
    assert m.network_in_channels(m.stage("fine")) == 3  # image + 2 coarse classes
    labels = procedural_labels(rng=np.random.default_rng(6), tumors=1, **GEOMETRIES["identity"])
    _, kidney, tumor = segment_and_score(package, labels)
    assert kidney > 0.95 and tumor > 0.85


def test_tumor_stage_on_the_kidney_masked_image(tmp_path):
    # kidney stage writes kidney (tumor included), then a tumor-only stage sees the masked image
    manifest = classifier_manifest(classes=("background", "kidney"))
    manifest["stages"][1]["network"]["kwargs"]["centers"] = [normalized(TEST_HU[0]), normalized(TEST_HU[1])]
    manifest["stages"].append({
        "name": "tumor", "role": "overlay", "classes": ["background", "tumor"],
        "network": {"name": "test_intensity_classifier", "kwargs": {"centers": [normalized(TEST_HU[1]), normalized(TEST_HU[2])]}},
        "weights": [{"file": "fine.pt"}], "spacing_mm": [1.0, 1.0, 1.0], "normalization": window_vb(), "patch_size": [32, 32, 32],
        "region": {"kind": "components", "labels": ["kidney"], "margin_mm": 5.0},
        "inputs": {"mask_labels": ["kidney", "tumor"], "mask_fill_hu": TEST_HU[1]}})
    package = save_test_package(tmp_path / "pkg", manifest)
    labels = procedural_labels(rng=np.random.default_rng(7), tumors=1, **GEOMETRIES["identity"])
    _, kidney, tumor = segment_and_score(package, labels)
    assert kidney > 0.95 and tumor > 0.85


def test_2p5d_network_gets_k_adjacent_slices(tmp_path):
    manifest = classifier_manifest()
    fine = manifest["stages"][1]
    fine["network"] = {"name": "test_intensity_classifier_2d", "kwargs": {"centers": fine["network"]["kwargs"]["centers"]}}
    fine["inputs"] = {"slices_as_channels": 3}
    fine["patch_size"] = [32, 32, 4]
    package = save_test_package(tmp_path / "pkg", manifest)
    labels = procedural_labels(rng=np.random.default_rng(8), tumors=1, **GEOMETRIES["identity"])
    _, kidney, tumor = segment_and_score(package, labels, tta=True)
    assert kidney > 0.95 and tumor > 0.85

    # channel j holds slice z + j - k//2 (edges repeated)
    stage = package.manifest.stage("fine")
    ct = sitk.GetImageFromArray(np.arange(5, dtype=np.int16).repeat(16).reshape(5, 4, 4) * 10)
    grid = geo.Grid.of(ct)
    channels = stage_input_channels(stage, package.manifest, ct, grid, None, {})
    z_values = channels[:, :, 0, 0] * 350.0 + 150.0
    np.testing.assert_allclose(z_values[0], [0, 0, 10, 20, 30], atol=1e-3)
    np.testing.assert_allclose(z_values[1], [0, 10, 20, 30, 40], atol=1e-3)
    np.testing.assert_allclose(z_values[2], [10, 20, 30, 40, 40], atol=1e-3)


def test_ensemble_and_mirroring_average_probabilities():
    class Const(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.tensor(logits).view(1, -1, 1, 1, 1)

        def forward(self, x):
            return self.logits.expand(x.shape[0], -1, *x.shape[2:])

    a, b = Const([0.0, 2.0]), Const([1.0, -1.0])
    x = torch.zeros(2, 1, 4, 4, 4)
    expected = (torch.softmax(a.logits, 1) + torch.softmax(b.logits, 1)) / 2
    out = StagePredictor([a, b], mirror_dims=(2, 3, 4))(x)
    torch.testing.assert_close(out, expected.expand_as(out))

    class Ramp(torch.nn.Module):  # position-dependent: mirroring must flip the output back
        def forward(self, x):
            r = torch.linspace(-1, 1, x.shape[-1]).view(1, 1, 1, 1, -1)
            return torch.cat([torch.zeros_like(x), x + r], dim=1)

    x = torch.randn(1, 1, 3, 3, 6)
    plain = StagePredictor([Ramp()])(x)
    mirrored = StagePredictor([Ramp()], mirror_dims=(4,))(x)
    r = torch.linspace(-1, 1, 6).view(1, 1, 1, 1, -1)
    expected = (torch.sigmoid(x + r) + torch.sigmoid(x - r)) / 2  # flipped input, flipped ramp, flipped back
    torch.testing.assert_close(mirrored[:, 1:], expected)
    assert not torch.allclose(plain, mirrored)


def test_labels_resampled_back_with_nearest_neighbour(tmp_path):
    manifest = classifier_manifest()
    manifest["stages"][1]["resample_back"] = "labels"
    package = save_test_package(tmp_path / "pkg", manifest)
    labels = procedural_labels(rng=np.random.default_rng(9), tumors=1, **GEOMETRIES["kits_permuted"])
    _, kidney, tumor = segment_and_score(package, labels)
    assert kidney > 0.95 and tumor > 0.8


def test_cancel_and_progress(classifier_package):
    labels = procedural_labels(rng=np.random.default_rng(10), **GEOMETRIES["identity"])
    ct = ct_from_labels(labels)
    seen = []
    Segmenter(classifier_package, device="cpu").segment(ct, progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("coarse" in m for _, m in seen) and any("fine" in m for _, m in seen)

    event = threading.Event()

    def cancel_in_fine(fraction, message):
        if "fine" in message:
            event.set()

    with pytest.raises(CancelledError):
        Segmenter(classifier_package, device="cpu").segment(ct, progress=cancel_in_fine, cancel=event)


def test_input_image_is_not_modified(classifier_package):
    labels = procedural_labels(rng=np.random.default_rng(11), **GEOMETRIES["kits_permuted"])
    ct = ct_from_labels(labels)
    before = sitk.GetArrayFromImage(ct).copy()
    geometry = (ct.GetSize(), ct.GetSpacing(), ct.GetOrigin(), ct.GetDirection())
    Segmenter(classifier_package, device="cpu").segment(ct)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct), before)
    assert geometry == (ct.GetSize(), ct.GetSpacing(), ct.GetOrigin(), ct.GetDirection())


# -- lesion confidence -------------------------------------------------------------------------
def _soft_tumor_probability(sharpness: float) -> float:
    """The intensity classifier's tumor probability inside a tumor (TEST_HU[2]) at ``sharpness``."""
    x = normalized(TEST_HU[2])
    logits = np.array([-sharpness * abs(x - normalized(TEST_HU[c])) for c in (0, 1, 2)])
    e = np.exp(logits - logits.max())
    return float(e[2] / e.sum())


@pytest.mark.parametrize("fine_role,resample_back", [("segment", "probabilities"), ("segment", "labels"),
                                                     ("overlay", "probabilities")])
def test_each_lesion_carries_the_models_confidence_and_an_unsure_one_gets_a_note(tmp_path, fine_role, resample_back):
    """A soft fine network (tumor probability ~0.68 inside tumors) gives lesions that confidence and the note the
    manifest asks for below 0.75; the same network made sharp (~1.0) gives no note."""
    labels = procedural_labels(rng=np.random.default_rng(1), tumors=1, **GEOMETRIES["identity"])
    found = {}
    for sharpness in (2.0, 20.0):
        manifest = classifier_manifest(fine_role=fine_role, postprocessing={"fill_holes": False,
                                                                             "lesion_confidence_note_below": 0.75})
        manifest["stages"][1]["network"]["kwargs"]["sharpness"] = sharpness
        manifest["stages"][1]["resample_back"] = resample_back
        package = save_test_package(tmp_path / f"pkg{sharpness}", manifest)
        result, kidney, tumor = segment_and_score(package, labels)
        assert kidney > 0.95 and tumor > 0.8
        items = result.stats["tumors"]["items"]
        largest = items[0]
        expected = _soft_tumor_probability(sharpness)
        # inside the tumor the network says ``expected``; its rim, resampled twice (to the stage grid and back),
        # mixes in the kidney's lower tumor probability (0.23 at sharpness 2), so the mean lies a little below
        assert expected - 0.15 < largest["confidence"] <= expected + 1e-3, (largest["confidence"], expected)
        unsure = [n for n in result.notes if "unsure" in n]
        found[sharpness] = (largest["volume_ml"], unsure)
    assert _soft_tumor_probability(2.0) < 0.72 and _soft_tumor_probability(20.0) > 0.999
    volume, unsure = found[2.0]
    assert unsure and unsure[0].startswith(f"the model is unsure of the {volume:.1f} mL tumor"), unsure
    assert found[20.0][1] == []


def test_confidence_notes_stay_off_unless_the_manifest_asks(classifier_package):
    labels = procedural_labels(rng=np.random.default_rng(1), tumors=1, **GEOMETRIES["identity"])
    result = Segmenter(classifier_package, device="cpu").segment(ct_from_labels(labels))
    assert all("confidence" in t for t in result.stats["tumors"]["items"])
    assert not any("unsure" in n for n in result.notes)
