"""A cascade's prior channels and a masked stage's mask change what the pipeline returns.

The intensity classifier reads channel 0 only, so elsewhere these inputs could be zeros or missing and every test
would pass. Here each scene holds a structure that only the extra input can keep out of the result: a faint blob
the coarse stage does not call kidney (only a network that reads the priors leaves it out), and a tumor-bright blob
beside the kidney (only the kidney mask keeps the tumor stage from calling it tumor). Post-processing is off, so
what is checked is the stages' own output.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from conftest import TEST_HU, classifier_manifest, normalized, save_test_package, window_vb
from KidneyTumorSegLib.metrics import dice
from KidneyTumorSegLib.networks import _REGISTRY, register
from KidneyTumorSegLib.pipeline import Segmenter

SIZE, SPACING = (80, 64, 64), 2.0  # (x, y, z) voxels of 2 mm: 160 x 128 x 128 mm
KIDNEY_CENTRE, KIDNEY_RADII = (55.0, 64.0, 64.0), (20.0, 18.0, 25.0)  # x from 35 to 75 mm
TUMOR_CENTRE, TUMOR_RADIUS = (60.0, 64.0, 64.0), 7.0
NO_POSTPROCESSING = {"fill_holes": False, "keep_largest_kidneys": False, "drop_detached_lesions": False}

if "test_prior_gated_classifier" not in _REGISTRY:

    @register("test_prior_gated_classifier")
    class PriorGatedClassifier(torch.nn.Module):
        """The intensity classifier on channel 0, overruled to background wherever the last input channel (a
        localize stage's kidney probability) is below ``gate``: its answer depends on the priors."""

        min_input_multiple = (1, 1, 1)
        spatial_dims = 3

        def __init__(self, in_channels: int = 3, num_classes: int = 3, centers=(0.0, 1.0, 2.0), gate: float = 1e-3):
            super().__init__()
            if in_channels < 2:
                raise ValueError(f"needs the image and prior channels, got in_channels={in_channels}")
            self.register_buffer("centers", torch.tensor(centers, dtype=torch.float32).view(1, -1, 1, 1, 1), persistent=False)
            self.gate = gate

        def forward(self, x):
            logits = -20.0 * (x[:, :1] - self.centers).abs()
            outside = (x[:, -1:] < self.gate).float() * 100.0
            return torch.cat([logits[:, :1] + outside, logits[:, 1:]], dim=1)


def _ellipsoid(centre_mm, radii_mm) -> np.ndarray:
    """Boolean (z, y, x) array of the voxels whose centres lie inside the ellipsoid."""
    z, y, x = np.meshgrid(*[(np.arange(n) + 0.5) * SPACING for n in reversed(SIZE)], indexing="ij")
    r = np.broadcast_to(radii_mm, (3,))
    return ((x - centre_mm[0]) / r[0]) ** 2 + ((y - centre_mm[1]) / r[1]) ** 2 + ((z - centre_mm[2]) / r[2]) ** 2 <= 1.0


def _scene(extra_hu: float, extra_centre_mm, extra_radius_mm: float):
    """(CT, truth, blob, the blob's core): a kidney with a tumor in it, and a blob of ``extra_hu`` that is neither
    (its edge voxels are partial volume once resampled: what the blob is called is judged on its core)."""
    truth = np.zeros(tuple(reversed(SIZE)), np.uint8)
    truth[_ellipsoid(KIDNEY_CENTRE, KIDNEY_RADII)] = 1
    truth[_ellipsoid(TUMOR_CENTRE, TUMOR_RADIUS)] = 2
    blob = _ellipsoid(extra_centre_mm, extra_radius_mm)
    assert not np.any(blob & (truth > 0))
    hu = np.choose(truth, [TEST_HU[0], TEST_HU[1], TEST_HU[2]]).astype(np.float32)
    hu[blob] = extra_hu
    hu[:, :, :3] = hu[:, :, -3:] = -1000.0  # some air, as a CT has
    ct = sitk.GetImageFromArray(hu)
    ct.SetSpacing((SPACING,) * 3)
    return ct, truth, blob, _ellipsoid(extra_centre_mm, extra_radius_mm - 2.5)


def _segment(manifest, tmp_path, ct):
    package = save_test_package(tmp_path / "pkg", manifest)
    return sitk.GetArrayFromImage(Segmenter(package, device="cpu").segment(ct).labels)


def test_a_cascade_stage_reads_the_coarse_probabilities(tmp_path):
    """A 40 HU blob 15 mm off the kidney: background to the coarse stage, kidney to the fine stage's intensities.
    Only the coarse kidney probability (zero there) keeps it out; with zeros for priors nothing is kidney."""
    ct, truth, blob, core = _scene(40.0, (KIDNEY_CENTRE[0] + KIDNEY_RADII[0] + 15.0 + 6.0, 64.0, 64.0), 6.0)
    manifest = classifier_manifest(region={"kind": "components", "margin_mm": 35.0, "labels": ["kidney"]},
                                   fine_inputs={"prior_from": "coarse"}, postprocessing=NO_POSTPROCESSING,
                                   fine_spacing=(SPACING,) * 3)
    manifest["stages"][0]["network"]["kwargs"]["sharpness"] = 100.0  # a coarse kidney probability of ~0 at 40 HU
    fine = manifest["stages"][1]
    fine["network"] = {"name": "test_prior_gated_classifier", "kwargs": fine["network"]["kwargs"]}
    out = _segment(manifest, tmp_path, ct)
    assert dice(out > 0, truth > 0) > 0.95
    assert dice(out == 2, truth == 2) > 0.85
    assert not np.any(out[blob]), "the blob the coarse stage left out came back: the priors did not reach the network"

    # the blob is in the fine stage's region and looks like kidney there: without the priors it is labelled
    fine["network"] = {"name": "test_intensity_classifier", "kwargs": fine["network"]["kwargs"]}
    assert np.all(_segment(manifest, tmp_path / "plain", ct)[core] == 1)


def test_a_masked_tumor_stage_sees_only_the_kidney(tmp_path):
    """A tumor-bright blob 20 mm off the kidney: outside the kidney stage's region (5 mm margin, one component), inside
    the tumor stage's (40 mm margin). The kidney mask fills it with kidney HU; without the mask it is tumor."""
    ct, truth, blob, core = _scene(TEST_HU[2], (KIDNEY_CENTRE[0] + KIDNEY_RADII[0] + 20.0 + 6.0, 64.0, 64.0), 6.0)
    manifest = classifier_manifest(classes=("background", "kidney"), postprocessing=NO_POSTPROCESSING, fine_spacing=(SPACING,) * 3,
                                   region={"kind": "components", "margin_mm": 5.0, "labels": ["kidney"], "max_components": 1})
    manifest["stages"][1]["network"]["kwargs"]["centers"] = [normalized(TEST_HU[0]), normalized(TEST_HU[1])]
    tumor = {
        "name": "tumor", "role": "overlay", "classes": ["background", "tumor"],
        "network": {"name": "test_intensity_classifier", "kwargs": {"centers": [normalized(TEST_HU[1]), normalized(TEST_HU[2])]}},
        "weights": [{"file": "fine.pt"}], "spacing_mm": [SPACING] * 3, "normalization": window_vb(), "patch_size": [32, 32, 32],
        "region": {"kind": "components", "labels": ["kidney"], "margin_mm": 40.0},
        "inputs": {"mask_labels": ["kidney", "tumor"], "mask_fill_hu": TEST_HU[1]}}
    manifest["stages"].append(tumor)
    out = _segment(manifest, tmp_path, ct)
    assert dice(out > 0, truth > 0) > 0.95
    assert dice(out == 2, truth == 2) > 0.85
    assert not np.any(out[blob]), "the tumor stage labelled the blob outside the kidney: it did not see the masked CT"

    # the blob is in the tumor stage's region and looks like tumor there: unmasked it is labelled
    del tumor["inputs"]
    assert np.all(_segment(manifest, tmp_path / "unmasked", ct)[core] == 2)
