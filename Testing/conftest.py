"""Shared fixtures: tiny model packages, simple CT volumes, the shared data folder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from KidneyTumorSegLib.networks import _REGISTRY, register

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

#: HU of the piecewise-constant test CTs (the intensity classifier below separates them exactly)
TEST_HU = {0: -100.0, 1: 150.0, 2: 320.0, 3: 5.0}


def benchmark_script(name: str):
    """``benchmarks/<name>.py`` loaded as a module (the benchmarks folder is no package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return shared_path()


def shared_path(*parts: str) -> Path:
    """A file or folder inside ``../shared``. Skips, saying so, only when ``../shared`` itself is absent; a
    checkout that has it but lacks this path is broken, and that fails the test instead of hiding it."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED} (only present in the project's CI and dev checkouts)")
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"{path} is missing although the shared folder {SHARED} is there (an incomplete shared checkout)")
    return path


if "test_intensity_classifier" not in _REGISTRY:

    @register("test_intensity_classifier")
    class IntensityClassifier(torch.nn.Module):
        """Test network: each class's logit is minus the distance of the first input channel to that
        class's normalised intensity ``centers[c]`` - a trivial, exact predictor for pipeline tests."""

        min_input_multiple = (1, 1, 1)
        spatial_dims = 3

        def __init__(self, in_channels: int = 1, num_classes: int = 3, centers=(0.0, 1.0, 2.0), sharpness: float = 20.0):
            super().__init__()
            if len(centers) != num_classes:
                raise ValueError("one center per class")
            self.register_buffer("centers", torch.tensor(centers, dtype=torch.float32).view(1, -1, 1, 1, 1), persistent=False)
            self.sharpness = sharpness

        def forward(self, x):
            return -self.sharpness * (x[:, :1] - self.centers).abs()


def window_vb():
    return {"kind": "window", "low": -200.0, "high": 500.0, "center": 150.0, "scale": 350.0}


def normalized(hu: float) -> float:
    return (min(max(hu, -200.0), 500.0) - 150.0) / 350.0


def classifier_manifest(name="test-c2f", fine_role="segment", region=None, classes=("background", "kidney", "tumor"),
                        coarse_spacing=(6.0, 6.0, 6.0), fine_spacing=(1.5, 1.5, 1.5), extra_stages=(), postprocessing=None,
                        fine_inputs=None):
    """A two-stage coarse-to-fine manifest using the intensity classifier network."""
    centers = [normalized(TEST_HU[{"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}[c]]) for c in classes]
    coarse_centers = [normalized(TEST_HU[0]), normalized((TEST_HU[1] + TEST_HU[2]) / 2)]
    stages = [
        {"name": "coarse", "role": "localize", "classes": ["background", "kidney"],
         "network": {"name": "test_intensity_classifier", "kwargs": {"centers": coarse_centers}},
         "weights": [{"file": "coarse.pt"}], "spacing_mm": list(coarse_spacing), "normalization": window_vb(),
         "patch_size": [32, 32, 32]},
        {"name": "fine", "role": fine_role, "classes": list(classes),
         "network": {"name": "test_intensity_classifier", "kwargs": {"centers": centers}},
         "weights": [{"file": "fine.pt"}], "spacing_mm": list(fine_spacing), "normalization": window_vb(),
         "patch_size": [32, 32, 32], "region": region or {"kind": "components", "margin_mm": 10.0, "labels": ["kidney"]},
         **({"inputs": fine_inputs} if fine_inputs else {})},
        *extra_stages,
    ]
    labels = {"background": 0, "kidney": 1, "tumor": 2}
    if "cyst" in classes:
        labels["cyst"] = 3
    return {"schema_version": 1, "name": name, "version": "0.0.1", "description": "test package",
            "intended_use": "tests only", "licence": "Apache-2.0", "labels": labels, "stages": stages,
            "postprocessing": postprocessing if postprocessing is not None else {"fill_holes": False},
            "provenance": {"trained_on": "nothing: a fixed intensity classifier for tests"}}


def save_test_package(root: Path, manifest: dict):
    from KidneyTumorSegLib.models import save_package

    files = {w["file"] for s in manifest["stages"] for w in s["weights"]}
    return save_package(root, manifest, {f: {} for f in files})


@pytest.fixture
def classifier_package(tmp_path):
    return save_test_package(tmp_path / "pkg", classifier_manifest())


def ct_from_labels(labels: sitk.Image) -> sitk.Image:
    """Piecewise-constant CT (int16 HU) from a label map, using TEST_HU, with air (-1000 HU)
    outside the body: voxels in the outer 5 % of every array axis that hold no label. Same geometry."""
    arr = sitk.GetArrayViewFromImage(labels)
    lut = np.array([TEST_HU[0], TEST_HU[1], TEST_HU[2], TEST_HU[3]], dtype=np.int16)
    hu = lut[arr]
    border = np.zeros(arr.shape, dtype=bool)
    for axis, n in enumerate(arr.shape):
        w = max(1, n // 20)
        index = [slice(None)] * 3
        index[axis] = np.r_[0:w, n - w:n]
        border[tuple(index)] = True
    hu[border & (arr == 0)] = -1000
    ct = sitk.GetImageFromArray(hu)
    ct.CopyInformation(labels)
    return ct


