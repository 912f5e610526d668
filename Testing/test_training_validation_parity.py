"""Training validates a stage exactly as inference runs it: one stage contract, not two readings of the recipe.

Checkpoints are chosen by validation Dice, so a trainer that blends windows, pads or sizes its network otherwise
than the deployed package would choose them on a different model. The network here answers differently depending
on where a voxel sits in its window, so how windows are blended (Gaussian, or only each window's core with a
``window_margin``) shows in its labels; the intensity classifier (it reads one voxel) could not tell them apart.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TEST_HU, normalized, save_test_package, window_vb
from KidneyTumorSegLib import pipeline
from KidneyTumorSegLib.manifest import ModelManifest, network_in_channels, unweighted_stage
from KidneyTumorSegLib.networks import _REGISTRY, register
from KidneyTumorSegLib.pipeline import Segmenter
from KidneyTumorSegLib.stages import stage_labels
from Training.preprocess import stage_volumes
from Training.trainer import StageTrainer

torch.set_num_threads(1)

SIZE, SPACING = (40, 36, 44), 2.0  # (x, y, z) voxels of 2 mm
NO_POSTPROCESSING = {"fill_holes": False, "keep_largest_kidneys": False, "drop_detached_lesions": False}
CLASSES = ["background", "kidney", "tumor"]

if "test_window_position_classifier" not in _REGISTRY:

    @register("test_window_position_classifier")
    class WindowPositionClassifier(torch.nn.Module):
        """The intensity classifier on channel 0 plus a ramp along the window's z (D) axis on the kidney logit:
        the same voxel gets another answer in another window, so the blending of windows decides the labels."""

        min_input_multiple = (1, 1, 1)
        spatial_dims = 3

        def __init__(self, in_channels: int = 1, num_classes: int = 3, centers=(0.0, 1.0, 2.0), ramp: float = 200.0):
            super().__init__()
            self.register_buffer("centers", torch.tensor(centers, dtype=torch.float32).view(1, -1, 1, 1, 1), persistent=False)
            self.ramp = ramp
            self.in_channels = in_channels

        def forward(self, x):
            assert x.shape[1] == self.in_channels, "fed another number of channels than it was built for"
            logits = -20.0 * (x[:, :1] - self.centers).abs()
            d = x.shape[2]
            position = (torch.arange(d, dtype=x.dtype, device=x.device) - (d - 1) / 2.0) / d  # -0.5 .. 0.5
            bias = torch.zeros_like(logits)
            bias[:, 1] = self.ramp * position.view(1, d, 1, 1)
            return logits + bias


def _stage(window_margin=(0, 0, 2), overlap=0.5, batch_size=2, patch=(16, 16, 16)) -> dict:
    """A whole-volume segment stage on the input's own grid (spacing null), as a recipe phase holds it (no weights)."""
    centers = [normalized(TEST_HU[v]) for v in (0, 1, 2)]
    return {"name": "fine", "role": "segment", "classes": list(CLASSES),
            "network": {"name": "test_window_position_classifier", "kwargs": {"centers": centers}},
            "spacing_mm": [None, None, None], "normalization": window_vb(), "patch_size": list(patch),
            "overlap": overlap, "batch_size": batch_size, "window_margin": list(window_margin),
            "resample_back": "labels", "tta_mirror_axes": [0, 1, 2]}


def _case():
    """(CT, truth) on an identity-direction grid: a kidney ellipsoid with a tumor in it, air at the x borders."""
    z, y, x = np.meshgrid(*[(np.arange(n) + 0.5) * SPACING for n in reversed(SIZE)], indexing="ij")
    truth = np.zeros(tuple(reversed(SIZE)), np.uint8)
    truth[((x - 40) / 22) ** 2 + ((y - 36) / 18) ** 2 + ((z - 44) / 30) ** 2 <= 1] = 1
    truth[(x - 46) ** 2 + (y - 36) ** 2 + (z - 50) ** 2 <= 64] = 2
    hu = np.choose(truth, [TEST_HU[0], TEST_HU[1], TEST_HU[2]]).astype(np.float32)
    hu[:, :, :2] = hu[:, :, -2:] = -1000.0
    ct = sitk.GetImageFromArray(hu)
    ct.SetSpacing((SPACING,) * 3)
    labels = sitk.GetImageFromArray(truth)
    labels.CopyInformation(ct)
    return ct, labels


def _trainer(tmp_path, entry, earlier_stages=()):
    """A trainer of ``entry`` (one phase) whose validation cache holds the case's training volume."""
    ct, labels = _case()
    folder = tmp_path / "cache"
    folder.mkdir(parents=True)
    (image, target), = stage_volumes(entry, ct, labels)
    np.save(folder / "case_00000_r0_image.npy", image)
    np.save(folder / "case_00000_r0_target.npy", target)
    stage = {"name": entry["name"], "phases": [{"epochs": 1, "manifest": entry, "training": {}}]}
    record = {"case": 0, "region": 0, "stem": "case_00000_r0"}
    trainer = StageTrainer(tmp_path / "run", stage, [folder], [[]], [[record]], torch.device("cpu"),
                           earlier_stages=earlier_stages)
    return trainer, image


def _package_manifest(entry) -> dict:
    return {"schema_version": 1, "name": "parity", "version": "0", "description": "", "intended_use": "tests only",
            "licence": "Apache-2.0", "labels": {"background": 0, "kidney": 1, "tumor": 2},
            "stages": [dict(entry, weights=[{"file": "fine.pt"}])], "postprocessing": NO_POSTPROCESSING}


def _segment_recording(tmp_path, entry, monkeypatch):
    """(labels on the input grid, the stage's probabilities on its grid) of the library's Segmenter."""
    package = save_test_package(tmp_path / "pkg", _package_manifest(entry))
    seen = []
    original = pipeline.write_back

    def spy(stage, probs, *args):
        seen.append(np.array(probs))
        return original(stage, probs, *args)

    monkeypatch.setattr(pipeline, "write_back", spy)
    result = Segmenter(package, device="cpu", tta=False).segment(_case()[0])
    assert len(seen) == 1, "one whole-volume region"
    return sitk.GetArrayFromImage(result.labels), seen[0]


@pytest.mark.parametrize("margin", [(0, 0, 2), (2, 2, 2), (0, 0, 0)])
def test_validation_predicts_exactly_what_the_segmenter_does(tmp_path, monkeypatch, margin):
    """The trainer's prediction of its cached validation volume equals the Segmenter's on the same case: the same
    probabilities on the stage grid, and (on the input's own grid) the same labels; so does its Dice."""
    entry = _stage(window_margin=margin)
    trainer, image = _trainer(tmp_path, entry)
    probs = trainer.predict(0, image)
    labels, segmenter_probs = _segment_recording(tmp_path, entry, monkeypatch)
    assert probs.shape == segmenter_probs.shape == (3,) + tuple(reversed(SIZE))
    np.testing.assert_array_equal(probs, segmenter_probs)
    np.testing.assert_array_equal(stage_labels(trainer.specs[0], probs), labels)
    truth = sitk.GetArrayFromImage(_case()[1])
    expected = {}
    for name, values in (("kidney", (1, 2)), ("tumor", (2,))):
        a, b = np.isin(labels, values), np.isin(truth, values)
        expected[name] = 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
    assert trainer.validate(0) == pytest.approx(expected, abs=1e-12)


def test_the_scene_tells_window_blendings_apart(tmp_path):
    """Guard of the test above: with and without the window margin the labels differ, so a path that dropped
    the margin (or blended otherwise) could not pass it."""
    with_margin, image = _trainer(tmp_path / "a", _stage(window_margin=(0, 0, 2)))
    without, _ = _trainer(tmp_path / "b", _stage(window_margin=(0, 0, 0)))
    a = stage_labels(with_margin.specs[0], with_margin.predict(0, image))
    b = stage_labels(without.specs[0], without.predict(0, image))
    assert np.count_nonzero(a != b) > 100


def test_trainer_reads_the_typed_stage_not_the_raw_recipe(tmp_path):
    """The trainer's phase specs are the library's StageSpec of the entry (defaults filled by the manifest, not
    restated), and its network's input channels are the manifest's for that stage."""
    entry = _stage()
    for key in ("overlap", "batch_size", "window_margin", "tta_mirror_axes", "resample_back"):
        entry.pop(key)
    trainer, _ = _trainer(tmp_path, entry)
    spec = trainer.specs[0]
    assert spec == unweighted_stage(entry)
    assert (spec.overlap, spec.batch_size, spec.window_margin) == (0.5, 1, (0, 0, 0))
    weighted = [{"file": "fine.pt", "sha256": "0" * 64}]
    manifest = ModelManifest.from_dict({**_package_manifest(entry), "stages": [dict(entry, weights=weighted)]})
    assert trainer.in_channels == manifest.network_in_channels(manifest.stages[0]) == 1


def test_a_cascade_stage_gets_the_prior_channels_the_package_feeds_it(tmp_path):
    """A prior_from stage's network has 1 + (prior classes) input channels, as ``ModelManifest.network_in_channels``
    says, and the trainer refuses to guess them without the earlier stages."""
    coarse = dict(_stage(), name="coarse", role="localize", classes=["background", "kidney"],
                  network={"name": "test_window_position_classifier", "kwargs": {"centers": [0.0, 1.0]}})
    fine = dict(_stage(), inputs={"prior_from": "coarse", "slices_as_channels": 3})
    stage = {"name": "fine", "phases": [{"epochs": 1, "manifest": fine, "training": {}}]}
    resolved_coarse = {"name": "coarse", "phases": [{"epochs": 1, "manifest": coarse, "training": {}}]}
    trainer = StageTrainer(tmp_path / "run", stage, [tmp_path], [[]], [[]], torch.device("cpu"),
                           earlier_stages=[resolved_coarse])
    weighted = [{"file": "w.pt", "sha256": "0" * 64}]
    manifest = ModelManifest.from_dict({**_package_manifest(fine), "stages": [dict(coarse, weights=weighted),
                                                                            dict(fine, weights=weighted)]})
    assert trainer.in_channels == manifest.network_in_channels(manifest.stage("fine")) == 3 + 2
    assert trainer.in_channels == network_in_channels(trainer.specs[0], [unweighted_stage(coarse)])
    assert trainer.net.in_channels == 5
    with pytest.raises(ValueError, match="prior_from"):
        StageTrainer(tmp_path / "run2", stage, [tmp_path], [[]], [[]], torch.device("cpu"))
