"""Out of device memory, one sliding-window call steps down (stitch on the CPU, then half the batch, then compute on
the CPU) and the next call tries the device again; the result is the same as without the error and the notes say
what happened. No GPU here: a pretend one (torch's ``meta`` device) that is always out of memory, or a predictor
that raises ``torch.OutOfMemoryError`` on chosen batches."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import classifier_manifest, ct_from_labels, save_test_package
from KidneyTumorSegLib.models import load_package
from KidneyTumorSegLib.pipeline import Segmenter
from KidneyTumorSegLib.predictor import StagePredictor
from KidneyTumorSegLib.sliding_window import OutOfMemory, sliding_window_inference
from Training.phantoms import procedural_labels

PRETEND_GPU = torch.device("meta")  # not the CPU, holds no data: what runs there must fail before computing


def window_function(b: torch.Tensor) -> torch.Tensor:
    """A window-dependent answer (its mean enters every voxel), so blending and double counting both show."""
    return torch.cat([torch.sin(b), b.mean(dim=(2, 3, 4), keepdim=True).expand_as(b)], dim=1)


class PretendGpuPredictor:
    """Out of memory whenever it sits on the pretend GPU; records each call's (device, batch size) and each move."""

    def __init__(self):
        self.device = PRETEND_GPU
        self.calls, self.moves = [], []

    def to(self, device):
        self.device = torch.device(device)
        self.moves.append(self.device)
        return self

    def __call__(self, b):
        self.calls.append((self.device, b.shape[0]))
        if self.device == PRETEND_GPU or b.device.type == "meta":
            raise torch.cuda.OutOfMemoryError("fake: CUDA out of memory")
        return window_function(b)


def test_the_steps_come_in_order_and_the_next_call_starts_on_the_device_again(caplog):
    x = torch.randn(1, 16, 16, 16)
    expected = sliding_window_inference(x, window_function, (8, 8, 8), 2, batch_size=4)
    pred, notes = PretendGpuPredictor(), []
    with caplog.at_level("WARNING"):
        out = sliding_window_inference(x, pred, (8, 8, 8), 2, batch_size=4, device=PRETEND_GPU, notes=notes)
    assert torch.equal(out, expected)  # the same numbers as a run that never ran out of memory
    # stitching on the device (default for a small output) failed first and was retried at the same batch on the
    # CPU's buffers, then the batch halved to one window, then the windows ran on the CPU
    assert pred.calls[:5] == [(PRETEND_GPU, 4), (PRETEND_GPU, 4), (PRETEND_GPU, 2), (PRETEND_GPU, 1), (torch.device("cpu"), 1)]
    assert notes == ["out of memory on meta (window batch 4): stitched on the CPU, then 2 windows at a time, "
                     "then 1 window at a time, then ran on the CPU (slower); the next call tries meta again"]
    assert "ran on the CPU" in caplog.text
    assert pred.moves == [torch.device("cpu"), PRETEND_GPU] and pred.device == PRETEND_GPU  # moved back at the end

    pred.calls.clear()
    again = sliding_window_inference(x, pred, (8, 8, 8), 2, batch_size=4, device=PRETEND_GPU, notes=[])
    assert pred.calls[0] == (PRETEND_GPU, 4)  # the next call starts from scratch: the device, the whole batch
    assert torch.equal(again, expected)


def test_an_error_mid_call_retries_that_batch_only():
    """Two batches are stitched before the third runs out of memory: it is retried at half the batch, and no
    window is counted twice (the answer is bit for bit that of a run without the error)."""
    x = torch.randn(1, 20, 16, 16)  # 3 x 3 x 3 windows of 8 at overlap 0.5
    expected = sliding_window_inference(x, window_function, (8, 8, 8), 2, batch_size=4)
    sizes = []

    def flaky(b):
        sizes.append(b.shape[0])
        if len(sizes) == 3:
            raise torch.OutOfMemoryError("fake: out of memory")
        return window_function(b)

    notes = []
    out = sliding_window_inference(x, flaky, (8, 8, 8), 2, batch_size=4, notes=notes)
    assert torch.equal(out, expected)
    assert sizes[:4] == [4, 4, 4, 2] and set(sizes[4:]) == {2}
    assert notes == ["out of memory on cpu (window batch 4): 2 windows at a time; the next call tries cpu again"]


def test_out_of_memory_with_nothing_left_to_try_is_raised():
    def always(b):
        raise torch.cuda.OutOfMemoryError("fake")

    with pytest.raises(OutOfMemory):
        sliding_window_inference(torch.zeros(1, 8, 8, 8), always, (8, 8, 8), 1, batch_size=2)
    class NoCpuEither(PretendGpuPredictor):
        def __call__(self, b):
            raise torch.cuda.OutOfMemoryError("fake")

    stubborn = NoCpuEither()
    with pytest.raises(OutOfMemory):
        sliding_window_inference(torch.zeros(1, 8, 8, 8), stubborn, (8, 8, 8), 1, batch_size=2, device=PRETEND_GPU)
    assert stubborn.device == PRETEND_GPU  # moved back even when the call fails


def test_segmenter_falls_back_per_call_and_says_so(tmp_path, monkeypatch):
    """The Segmenter caches its predictors and the CLI reuses one Segmenter: after a fallback, the next region and
    the next image must try the device again. Here the pretend GPU is always full, so every call takes every step."""
    manifest = copy.deepcopy(classifier_manifest())
    for stage in manifest["stages"]:
        stage["batch_size"] = 2
    package = load_package(str(save_test_package(tmp_path / "pkg", manifest).root))
    labels = procedural_labels(rng=np.random.default_rng(11), tumors=1, size=(96, 80, 64), spacing=(2.0, 2.0, 2.5))
    ct = ct_from_labels(labels)
    reference = Segmenter(package, device="cpu").segment(ct)

    calls = []
    original_call = StagePredictor.__call__

    def pretend_to(self, device):  # the pretend GPU is the CPU: the networks stay where they are
        self.device = torch.device(device)
        return self

    def pretend_call(self, x):
        calls.append(self.device)
        if self.device == PRETEND_GPU:
            raise torch.cuda.OutOfMemoryError("fake: CUDA out of memory")
        return original_call(self, x)

    monkeypatch.setattr(StagePredictor, "to", pretend_to)
    monkeypatch.setattr(StagePredictor, "__call__", pretend_call)
    segmenter = Segmenter(package, device="cpu")
    for stage in package.manifest.stages:  # networks built on the CPU; then the Segmenter moves them to its "GPU"
        segmenter._predictor(stage)
    segmenter.device = PRETEND_GPU
    for _ in range(2):  # the second image tries the GPU again
        calls.clear()
        result = segmenter.segment(ct)
        assert np.array_equal(sitk.GetArrayFromImage(result.labels), sitk.GetArrayFromImage(reference.labels))
        assert result.stats == reference.stats
        steps = ("stitched on the CPU, then 1 window at a time, then ran on the CPU (slower); "
                 "the next call tries meta again")
        for name in ("coarse", "fine"):
            assert f"stage {name!r}: out of memory on meta (window batch 2): {steps}" in result.notes
        assert [n for n in result.notes if "out of memory" not in n] == reference.notes
        # every sliding-window call (coarse, then one per kidney region: 3) starts on the GPU and tries it 3 times
        starts = [i for i, d in enumerate(calls) if d == PRETEND_GPU and (i == 0 or calls[i - 1] != PRETEND_GPU)]
        assert len(starts) == 3 and all(calls[i:i + 4] == [PRETEND_GPU] * 3 + [torch.device("cpu")] for i in starts)
        assert all(p.device == PRETEND_GPU for p in segmenter._predictors.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (moves stitching buffers that hold windows)")
def test_buffers_holding_windows_move_to_the_cpu_intact():
    """Only a real GPU can hold buffers with data off the CPU: the error comes after two batches were stitched there."""
    x = torch.randn(1, 20, 16, 16)
    expected = sliding_window_inference(x, window_function, (8, 8, 8), 2, batch_size=4, device="cuda")
    calls = []

    def flaky(b):
        calls.append(b.device.type)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("fake: CUDA out of memory")
        return window_function(b)

    notes = []
    out = sliding_window_inference(x, flaky, (8, 8, 8), 2, batch_size=4, device="cuda", notes=notes)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)  # the same sums, the last part added on the CPU
    assert notes == ["out of memory on cuda (window batch 4): stitched on the CPU; the next call tries cuda again"]
