"""Test-time mirroring flips the axes the manifest names: manifest x / y / z -> tensor W / H / D (an inverted mapping
once cost a phantom model 0.19 kidney Dice). Checked with a network that looks one voxel to its +x side, which only a
flip along x can change, on the Segmenter's own predictors."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import classifier_manifest, save_test_package
from KidneyTumorSegLib.models import load_package
from KidneyTumorSegLib.networks import _REGISTRY, register
from KidneyTumorSegLib.pipeline import Segmenter

if "test_looks_plus_x" not in _REGISTRY:

    @register("test_looks_plus_x")
    class LooksPlusX(torch.nn.Module):
        """Logits from the input one voxel along +x (tensor W): orientation-sensitive along x only."""

        min_input_multiple = (1, 1, 1)
        spatial_dims = 3

        def __init__(self, in_channels: int = 1, num_classes: int = 2):
            super().__init__()
            self.num_classes = num_classes

        def forward(self, x):
            shifted = torch.roll(x[:, :1], shifts=-1, dims=4)
            return torch.cat([-shifted, shifted] + [torch.zeros_like(shifted)] * (self.num_classes - 2), dim=1) * 10.0


def _coarse_predictor(tmp_path, axes, tta):
    manifest = copy.deepcopy(classifier_manifest())
    coarse = manifest["stages"][0]
    coarse["network"] = {"name": "test_looks_plus_x", "kwargs": {}}
    coarse["tta_mirror_axes"] = list(axes)
    package = load_package(str(save_test_package(tmp_path / f"pkg{''.join(map(str, axes))}{tta}", manifest).root))
    segmenter = Segmenter(package, device="cpu", tta=tta)
    return segmenter._predictor(package.manifest.stage("coarse"))


@pytest.fixture
def x_step():
    x = torch.zeros((1, 1, 6, 6, 8))
    x[..., 4:] = 1.0  # a step along x (tensor W)
    return x


def test_mirroring_along_x_flips_tensor_w(tmp_path, x_step):
    plain = _coarse_predictor(tmp_path, [0], tta=False)(x_step)
    mirrored = _coarse_predictor(tmp_path, [0], tta=True)(x_step)
    assert not torch.allclose(plain, mirrored)  # only a W flip changes what a +x-looking network sees
    # the mirrored pass looks one voxel to -x: the average is the two one-voxel looks
    back = torch.roll(x_step[:, :1], shifts=1, dims=4)
    expected_kidney = (torch.sigmoid(20.0 * torch.roll(x_step[:, :1], shifts=-1, dims=4)) + torch.sigmoid(20.0 * back)) / 2
    assert torch.allclose(mirrored[:, 1:2], expected_kidney, atol=1e-5)


@pytest.mark.parametrize("axis", [1, 2])
def test_mirroring_along_y_or_z_leaves_an_x_only_network_alone(tmp_path, x_step, axis):
    plain = _coarse_predictor(tmp_path, [axis], tta=False)(x_step)
    mirrored = _coarse_predictor(tmp_path, [axis], tta=True)(x_step)
    assert torch.allclose(plain, mirrored, atol=1e-6)  # an inverted mapping would flip W here
