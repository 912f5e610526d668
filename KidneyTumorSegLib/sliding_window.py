"""Sliding-window inference with Gaussian importance weighting.

Generic over the predictor: anything mapping a batch of windows ``[B, C, *patch]`` to
``[B, K, *patch]`` (the pipeline passes networks followed by softmax, with mirroring
and ensembling folded in). Windows are computed on ``device``; their outputs are
accumulated on ``stitch_device`` into two preallocated buffers (weighted sum and sum of
weights), so memory stays at one output volume plus one batch whatever the number of
windows.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .errors import CancelledError
from .runcontrol import is_cancelled

logger = logging.getLogger(__name__)

ProgressFn = Callable[[float], None]


@functools.lru_cache(maxsize=8)
def _gaussian_cached(patch_size: tuple[int, ...], sigma_scale: float) -> torch.Tensor:
    grids = []
    for p in patch_size:
        centre = (p - 1) / 2.0
        sigma = max(p * sigma_scale, 1e-6)
        grids.append(np.exp(-0.5 * ((np.arange(p) - centre) / sigma) ** 2))
    weights = functools.reduce(np.multiply.outer, grids)
    weights = weights / weights.max()
    # Zeros would make the division at the end undefined where only window borders reach.
    weights = np.maximum(weights, weights[weights > 0].min())
    return torch.from_numpy(weights.astype(np.float32))


def gaussian_weights(patch_size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Importance map of shape ``patch_size``: a Gaussian (sigma = ``sigma_scale`` x patch) peaking at 1 in the centre."""
    return _gaussian_cached(tuple(int(p) for p in patch_size), float(sigma_scale)).clone()


def window_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of size ``patch`` covering ``length`` (>= patch) with at least ``overlap``.

    The first window starts at 0, the last ends at ``length``; windows are evenly spaced.
    """
    if length <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    n = int(math.ceil((length - patch) / step)) + 1
    return sorted({int(round(v)) for v in np.linspace(0, length - patch, n)})


def _call_with_oom_fallback(predictor, batch: torch.Tensor, state: dict) -> torch.Tensor:
    """Run the predictor; on CUDA out-of-memory halve the batch, then fall back to the CPU."""
    while True:
        try:
            if batch.shape[0] <= state["batch_size"]:
                return predictor(batch.to(state["device"]))
            return torch.cat([
                predictor(batch[i:i + state["batch_size"]].to(state["device"]))
                for i in range(0, batch.shape[0], state["batch_size"])
            ])
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if state["batch_size"] > 1:
                state["batch_size"] = max(1, state["batch_size"] // 2)
                logger.warning("CUDA out of memory: retrying with window batch size %d", state["batch_size"])
            elif state["device"].type != "cpu" and hasattr(predictor, "to"):
                logger.warning("CUDA out of memory with one window: continuing on the CPU (slower)")
                state["device"] = torch.device("cpu")
                predictor.to(state["device"])
            else:
                raise


def sliding_window_inference(
    inputs: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    patch_size: Sequence[int],
    num_outputs: int,
    overlap: float = 0.5,
    batch_size: int = 1,
    weighting: str = "gaussian",
    margin: Optional[Sequence[int]] = None,
    pad_value: float = 0.0,
    device: torch.device | str = "cpu",
    stitch_device: Optional[torch.device | str] = None,
    progress: Optional[ProgressFn] = None,
    cancel=None,
) -> torch.Tensor:
    """Predict ``inputs`` window by window and blend the windows.

    Args:
        inputs: ``[C, *spatial]`` float tensor (2 or 3 spatial dims, tensor order).
        predictor: maps ``[B, C, *patch]`` on ``device`` to ``[B, num_outputs, *patch]``.
        patch_size: window size in the spatial dims of ``inputs``.
        overlap: fraction of a window shared with its neighbour (0 <= overlap < 1); 0.5 = half a patch.
        weighting: ``"gaussian"`` (importance map) or ``"constant"`` (plain average).
        margin: voxels per spatial dim to discard at each side of a window (its outputs
            are not used, except where the window touches the volume's border), e.g. the
            ResUNet paper's "keep the central 32 of 64 slices"; the kept cores are averaged
            with constant weights. Needs overlap >= 2 * margin / patch so the cores tile.
        pad_value: value used to pad a volume smaller than a window (e.g. normalised air).
        device: where windows are computed; ``stitch_device``: where outputs accumulate
            (default: ``device`` when the output is below 1 GiB, else the CPU).
        progress: called with the fraction of windows done; cancel: object with ``is_set()``
            or a callable returning True to stop (raises ``CancelledError``).

    Returns:
        ``[num_outputs, *spatial]`` float32 tensor on the CPU: the weighted average of the
        window outputs at every voxel.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if weighting not in ("gaussian", "constant"):
        raise ValueError(f"weighting must be 'gaussian' or 'constant', got {weighting!r}")
    spatial = tuple(inputs.shape[1:])
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != len(spatial):
        raise ValueError(f"patch_size {patch} does not match the {len(spatial)} spatial dims of inputs {tuple(inputs.shape)}")
    device = torch.device(device)

    # Pad symmetrically where the volume is smaller than a window.
    pad_before = [max(0, (p - s) // 2) for p, s in zip(patch, spatial)]
    pad_after = [max(0, p - s - b) for p, s, b in zip(patch, spatial, pad_before)]
    if any(pad_before) or any(pad_after):
        torch_pad = []
        for b, a in zip(reversed(pad_before), reversed(pad_after)):
            torch_pad += [b, a]
        inputs = torch.nn.functional.pad(inputs, torch_pad, mode="constant", value=pad_value)
    padded = tuple(inputs.shape[1:])

    out_bytes = num_outputs * int(np.prod(padded)) * 4
    if stitch_device is None:
        stitch_device = device if (device.type == "cpu" or out_bytes < 2**30) else torch.device("cpu")
    stitch_device = torch.device(stitch_device)

    margin = tuple(int(m) for m in margin) if margin is not None else (0,) * len(patch)
    if len(margin) != len(patch) or any(m < 0 or 2 * m >= p for m, p in zip(margin, patch)):
        raise ValueError(f"margin {margin} must give each of the {len(patch)} dims a core: 0 <= 2 * margin < patch {patch}")
    if any(margin) and any(p - max(1, int(p * (1.0 - overlap))) < 2 * m for m, p in zip(margin, patch)):
        raise ValueError(f"overlap {overlap} is too small for margin {margin} on patch {patch}: "
                         f"the windows' cores would leave gaps (need overlap >= 2 * margin / patch)")
    weights = gaussian_weights(patch) if weighting == "gaussian" and not any(margin) else torch.ones(patch)
    weights = weights.to(stitch_device)
    accumulated = torch.zeros((num_outputs, *padded), dtype=torch.float32, device=stitch_device)
    weight_sum = torch.zeros(padded, dtype=torch.float32, device=stitch_device)

    starts = [window_starts(L, p, overlap) for L, p in zip(padded, patch)]
    windows = [tuple(slice(s, s + p) for s, p in zip(corner, patch)) for corner in itertools.product(*starts)]
    state = {"batch_size": max(1, int(batch_size)), "device": device}
    done = 0
    while done < len(windows):
        if is_cancelled(cancel):
            raise CancelledError("cancelled by the caller")
        # the batch size may shrink after a CUDA out-of-memory error, so slice as we go
        chunk = windows[done:done + state["batch_size"]]
        batch = torch.stack([inputs[(slice(None),) + w] for w in chunk])
        with torch.no_grad():
            out = _call_with_oom_fallback(predictor, batch, state)
        out = out.to(stitch_device, dtype=torch.float32)
        if tuple(out.shape[1:]) != (num_outputs, *patch):
            raise ValueError(f"predictor returned shape {tuple(out.shape)}, expected [B, {num_outputs}, {', '.join(map(str, patch))}]")
        for k, w in enumerate(chunk):
            wk = weights if not any(margin) else _core_weights(w, margin, padded, stitch_device)
            accumulated[(slice(None),) + w] += out[k] * wk
            weight_sum[w] += wk
        done += len(chunk)
        if progress is not None:
            progress(done / len(windows))
    accumulated /= weight_sum
    crop = tuple(slice(b, b + s) for b, s in zip(pad_before, spatial))
    return accumulated[(slice(None),) + crop].cpu()


def _core_weights(window, margin, volume_shape, device) -> torch.Tensor:
    """1 on the window's core (``margin`` voxels off each side), extended to the volume's border
    where the window touches it; 0 elsewhere."""
    masks = []
    for sl, m, size in zip(window, margin, volume_shape):
        length = sl.stop - sl.start
        mask = torch.zeros(length, device=device)
        lo = 0 if sl.start == 0 else m
        hi = length if sl.stop == size else length - m
        mask[lo:hi] = 1.0
        masks.append(mask)
    weights = masks[0]
    for mask in masks[1:]:
        weights = weights[..., None] * mask
    return weights
