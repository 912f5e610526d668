"""Sliding-window inference with Gaussian importance weighting.

Generic over the predictor: anything mapping a batch of windows ``[B, C, *patch]`` to
``[B, K, *patch]`` (the pipeline passes networks followed by softmax, with mirroring
and ensembling folded in). Windows are computed on ``device``; their outputs are
accumulated on ``stitch_device`` into two preallocated buffers (weighted sum and sum of
weights), so memory stays at one output volume plus one batch whatever the number of
windows. Out of device memory, a call stitches on the CPU, then halves its batch, then
computes on the CPU, for that call only (:class:`_Fallback`).
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


#: what torch raises when a device allocation fails (``torch.cuda.OutOfMemoryError`` is this class; torch < 2.5 has only that)
OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
_CPU = torch.device("cpu")


class _Fallback:
    """Where one call computes and stitches and how many windows go at once, stepped down by out-of-memory errors.

    Each error takes the next step: the stitching buffers to the CPU (nnU-Net's first remedy: they hold a whole
    volume), then half the batch down to one window, then the windows to the CPU. Only this call is affected:
    :meth:`restore` moves the predictor back, so the next call tries the GPU again.
    """

    def __init__(self, predictor, device: torch.device, stitch_device: torch.device, batch_size: int):
        self.predictor, self.device, self.requested_batch = predictor, device, batch_size
        self.compute, self.stitch, self.batch_size = device, stitch_device, batch_size
        self.steps: list[str] = []

    def can_step(self) -> bool:
        """Whether a step is left to take after an out-of-memory error."""
        return (self.stitch.type != "cpu" or self.batch_size > 1
                or (self.compute.type != "cpu" and hasattr(self.predictor, "to")))

    def step(self) -> None:
        """Take the next step (after an out-of-memory error, once the failed attempt's tensors are freed)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.stitch.type != "cpu":
            self.stitch = _CPU
            self.steps.append("stitched on the CPU")
        elif self.batch_size > 1:
            self.batch_size = max(1, self.batch_size // 2)
            self.steps.append(f"{self.batch_size} window{'s' if self.batch_size > 1 else ''} at a time")
        else:
            self.predictor.to(_CPU)
            self.compute = _CPU
            self.steps.append("ran on the CPU (slower)")
        logger.warning("out of memory on %s: %s", self.device, self.steps[-1])

    def restore(self) -> None:
        """Move the predictor back to the requested device (the next call tries it again)."""
        if self.compute == self.device:
            return
        try:
            self.predictor.to(self.device)
        except OutOfMemory:  # the caller moves it back before its next call (Segmenter._predictor)
            logger.warning("could not move the predictor back to %s (out of memory); it stays on the CPU", self.device)
            return
        self.compute = self.device

    def note(self) -> Optional[str]:
        """One line on what this call did, or None when nothing ran out of memory."""
        if not self.steps:
            return None
        return (f"out of memory on {self.device} (window batch {self.requested_batch}): "
                f"{', then '.join(self.steps)}; the next call tries {self.device} again")


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
    notes: Optional[list] = None,
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
        notes: a list that gets one line when this call ran out of device memory, saying what it
            did about it (see :class:`_Fallback`; the next call tries ``device`` again).

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
    starts = [window_starts(L, p, overlap) for L, p in zip(padded, patch)]
    windows = [tuple(slice(s, s + p) for s, p in zip(corner, patch)) for corner in itertools.product(*starts)]
    fallback = _Fallback(predictor, device, stitch_device, max(1, int(batch_size)))
    try:
        accumulated, weight_sum = _blend(inputs, predictor, windows, weights, margin, num_outputs, fallback, progress, cancel)
    finally:
        fallback.restore()
    if notes is not None and fallback.note():
        notes.append(fallback.note())
    accumulated /= weight_sum
    crop = tuple(slice(b, b + s) for b, s in zip(pad_before, spatial))
    return accumulated[(slice(None),) + crop].cpu()


def _blend(inputs, predictor, windows, weights, margin, num_outputs, fallback: _Fallback, progress, cancel):
    """The weighted sum of the window outputs and the sum of weights, on ``fallback.stitch``.

    A batch that runs out of memory is retried after the fallback's next step; nothing is added to the
    buffers before the batch's contributions exist, so a retry never counts a window twice.
    """
    padded = tuple(inputs.shape[1:])
    patch = tuple(s.stop - s.start for s in windows[0])
    accumulated = weight_sum = None
    on = None  # where the buffers and weights are (tracked: a tensor says cuda:0 where the caller said cuda)
    done = 0
    while done < len(windows):
        if is_cancelled(cancel):
            raise CancelledError("cancelled by the caller")
        chunk = windows[done:done + fallback.batch_size]  # the batch may shrink after an out-of-memory error
        ran_out = False
        try:
            if on != fallback.stitch:
                if done == 0:
                    accumulated = weight_sum = None  # nothing added yet: free them rather than copy zeros
                accumulated, weight_sum = _buffers_on(fallback.stitch, accumulated, weight_sum, num_outputs, padded)
                stitch_weights, on = weights.to(fallback.stitch), fallback.stitch  # from the CPU original
            batch = torch.stack([inputs[(slice(None),) + w] for w in chunk]).to(fallback.compute)
            with torch.no_grad():
                out = predictor(batch)
            out = out.to(fallback.stitch, dtype=torch.float32)
            if tuple(out.shape[1:]) != (num_outputs, *patch):
                raise ValueError(f"predictor returned shape {tuple(out.shape)}, expected [B, {num_outputs}, {', '.join(map(str, patch))}]")
            window_weights = [stitch_weights if not any(margin) else _core_weights(w, margin, padded, fallback.stitch) for w in chunk]
            contributions = [out[k] * wk for k, wk in enumerate(window_weights)]
        except OutOfMemory:
            if not fallback.can_step():
                raise
            ran_out = True  # the next step is taken below, once the failed attempt's tensors are freed
        if ran_out:
            batch = out = window_weights = contributions = None
            fallback.step()
            continue
        for w, contribution, wk in zip(chunk, contributions, window_weights):
            accumulated[(slice(None),) + w] += contribution
            weight_sum[w] += wk
        done += len(chunk)
        if progress is not None:
            progress(done / len(windows))
    return accumulated, weight_sum


def _buffers_on(device, accumulated, weight_sum, num_outputs: int, padded) -> tuple:
    """The two stitching buffers moved to ``device``, or new zeros there when there are none yet."""
    if accumulated is not None:
        return accumulated.to(device), weight_sum.to(device)
    return (torch.zeros((num_outputs, *padded), dtype=torch.float32, device=device),
            torch.zeros(padded, dtype=torch.float32, device=device))


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
