"""Exact sliding-window tests with trivial predictors."""

import numpy as np
import pytest
import torch

from KidneyTumorSegLib.errors import CancelledError
from KidneyTumorSegLib.sliding_window import gaussian_weights, sliding_window_inference, window_starts


@pytest.mark.parametrize("shape,patch,overlap", [((20, 23, 17), (8, 8, 8), 0.5), ((9, 40, 33), (4, 16, 16), 0.25),
                                                 ((5, 6, 7), (8, 8, 8), 0.5), ((16, 16), (16, 16), 0.5)])
def test_pointwise_predictor_is_reproduced_exactly(shape, patch, overlap):
    # A pointwise predictor (x + 1, 2 * x) gives the same value in every window, so any correct
    # blending - Gaussian or not, with padding or not - returns it exactly.
    x = torch.randn(1, *shape)
    out = sliding_window_inference(x, lambda b: torch.cat([b + 1, 2 * b], dim=1), patch, num_outputs=2, overlap=overlap,
                                   batch_size=3)
    assert out.shape == (2, *shape)
    torch.testing.assert_close(out[0], x[0] + 1, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], 2 * x[0], rtol=0, atol=1e-5)


def test_windows_cover_volume_with_requested_overlap():
    assert window_starts(100, 32, 0.5) == [0, 14, 27, 41, 54, 68]
    assert window_starts(32, 32, 0.5) == [0]
    starts = window_starts(97, 32, 0.5)
    assert starts[0] == 0 and starts[-1] + 32 == 97
    assert all(b - a <= 16 for a, b in zip(starts, starts[1:]))


def test_constant_weighting_averages_window_outputs():
    # Each window returns how many windows were called before it; with constant weights the
    # voxel value is the mean of the indices of the windows covering it.
    calls = []

    def predictor(b):
        out = torch.stack([torch.full(b.shape[2:], float(len(calls) + i)) for i in range(b.shape[0])]).unsqueeze(1)
        calls.extend(range(b.shape[0]))
        return out

    out = sliding_window_inference(torch.zeros(1, 1, 1, 12), predictor, (1, 1, 8), 1, overlap=0.5, weighting="constant")
    # windows start at 0 and 4: voxels 0-3 see window 0, 4-7 both, 8-11 window 1
    np.testing.assert_allclose(out[0, 0, 0].numpy(), [0] * 4 + [0.5] * 4 + [1] * 4)


def test_gaussian_weights_peak_in_the_centre_and_are_positive():
    w = gaussian_weights((9, 9, 9))
    assert w.shape == (9, 9, 9)
    assert float(w[4, 4, 4]) == pytest.approx(1.0)
    assert float(w.min()) > 0
    assert float(w[0, 4, 4]) < float(w[2, 4, 4]) < float(w[4, 4, 4])


def test_padding_value_reaches_the_predictor_for_small_volumes():
    seen = []

    def predictor(b):
        seen.append(b.clone())
        return b

    x = torch.ones(1, 4, 4, 4)
    out = sliding_window_inference(x, predictor, (8, 8, 8), 1, pad_value=-7.0)
    assert seen[0].shape == (1, 1, 8, 8, 8)
    assert float(seen[0].min()) == -7.0 and float(seen[0].max()) == 1.0
    torch.testing.assert_close(out, x)


def test_cancel_stops_between_windows():
    class Flag:
        def __init__(self):
            self.n = 0

        def is_set(self):
            self.n += 1
            return self.n > 2

    with pytest.raises(CancelledError):
        sliding_window_inference(torch.zeros(1, 32, 32, 32), lambda b: b, (8, 8, 8), 1, cancel=Flag())


def test_progress_reaches_one_and_bad_arguments_are_refused():
    fractions = []
    sliding_window_inference(torch.zeros(1, 16, 16, 16), lambda b: b, (8, 8, 8), 1, progress=fractions.append)
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(torch.zeros(1, 8, 8, 8), lambda b: b, (8, 8, 8), 1, overlap=1.0)
    with pytest.raises(ValueError, match="predictor returned shape"):
        sliding_window_inference(torch.zeros(1, 8, 8, 8), lambda b: b, (8, 8, 8), 2)


def test_margin_keeps_only_window_cores():
    # Each window answers with the local index of each voxel inside it. With margin 4 on
    # 16-voxel windows at stride 8 the cores [4, 12) tile the volume exactly, so every voxel
    # must come from the one window whose core holds it (or the border window).
    length, patch, margin = 64, 16, 4
    starts = window_starts(length, patch, 0.5)
    assert starts == [0, 8, 16, 24, 32, 40, 48]
    out = sliding_window_inference(torch.zeros(1, length), lambda b: torch.arange(patch, dtype=torch.float32).expand(b.shape[0], 1, patch),
                                   (patch,), 1, overlap=0.5, margin=(margin,))
    expected = []
    for v in range(length):
        s = next(s for s in starts if (s == 0 or s + margin <= v) and (v < s + patch - margin or s + patch == length))
        expected.append(v - s)
    torch.testing.assert_close(out[0], torch.tensor(expected, dtype=torch.float32))

    # ResUNet-style: 64-slice windows at stride 32 keep their central 32 slices
    assert window_starts(128, 64, 0.5) == [0, 32, 64]
    out = sliding_window_inference(torch.zeros(1, 128, 4, 4), lambda b: torch.ones(b.shape[0], 1, *b.shape[2:]),
                                   (64, 4, 4), 1, overlap=0.5, margin=(16, 0, 0))
    torch.testing.assert_close(out, torch.ones(1, 128, 4, 4))
    with pytest.raises(ValueError, match="too small for margin"):
        sliding_window_inference(torch.zeros(1, 128), lambda b: b, (64,), 1, overlap=0.25, margin=(16,))
