"""A stage's predictor: its networks (an ensemble), softmax, mirroring TTA and 2.5D slicing.

Takes windows ``[B, C, D, H, W]`` and returns class probabilities ``[B, K, D, H, W]``,
the mean over ensemble members and mirrorings, which is what the sliding window blends.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch

from .device import autocast_context


class StagePredictor:
    """Average softmax of ``networks`` over the mirrorings of ``mirror_dims``.

    ``networks``: modules in eval mode mapping ``[B, C, *spatial]`` to logits ``[B, K, *spatial]``.
    ``mirror_dims``: tensor spatial dims (2, 3, 4 = D, H, W) that test-time augmentation
    flips; every subset is used (8 passes for three dims), empty = no TTA.
    A network with ``spatial_dims == 2`` is a 2.5D network: the window's channels are its
    k adjacent slices (plus priors) and every slice of the window is predicted as a 2D image.
    """

    def __init__(self, networks: Sequence[torch.nn.Module], mirror_dims: Sequence[int] = (), device="cpu"):
        if not networks:
            raise ValueError("a stage needs at least one network")
        self.networks = list(networks)
        self.device = torch.device(device)
        self.two_and_half_d = getattr(self.networks[0], "spatial_dims", 3) == 2
        dims = tuple(sorted(set(mirror_dims)))
        if any(d not in (2, 3, 4) for d in dims):
            raise ValueError(f"mirror dims must be among 2, 3, 4 (D, H, W), got {dims}")
        self.flips = [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]
        self.to(self.device)

    def to(self, device) -> "StagePredictor":
        self.device = torch.device(device)
        for net in self.networks:
            net.to(self.device)
        return self

    def _logits(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.two_and_half_d:
            return net(x)
        b, c, d, h, w = x.shape
        slices = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        out = net(slices)
        return out.reshape(b, d, out.shape[1], h, w).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, dtype=torch.float32)
        total = None
        with autocast_context(self.device):
            for net in self.networks:
                for flip in self.flips:
                    xi = torch.flip(x, flip) if flip else x
                    probs = torch.softmax(self._logits(net, xi).float(), dim=1)
                    if flip:
                        probs = torch.flip(probs, flip)
                    total = probs if total is None else total.add_(probs)
        return total / (len(self.networks) * len(self.flips))
