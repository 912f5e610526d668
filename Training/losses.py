"""Segmentation losses of the seed papers, in one module.

Every loss takes ``logits [B, K, *S]`` (2 or 3 spatial dims) and ``target [B, *S]`` (class
indices, int64) and returns a scalar tensor. Overlap losses (Dice family, Tversky) sum over
the batch and the voxels of each class ("batch Dice"), then average over classes; by default
only the foreground classes 1..K-1 count (``include_background``), which is what the
generalized Dice of Mu et al. says ("focuses only on foreground voxels") and what nnU-Net's
Dice term does. ``eps`` is added to numerator and denominator so a class absent from both
prediction and truth scores 1, not 0/0.

* :func:`soft_dice_loss` - 1 - mean_c 2 sum p g / (sum p + sum g) (Liu's Dice term, with CE).
* :func:`generalized_dice_loss` - Mu et al. (seed 002), eq. in section 2.5:
  D = 1/C sum_c 2 sum_i p_c(i) g_c(i) / (sum_i p_c(i)^2 + sum_i g_c(i)^2), loss = 1 - D.
* :func:`cross_entropy` - mean voxel CE (Wei et al., seed 003, eq. 1, averaged instead of summed).
* :func:`focal_loss` - Lin et al.: mean of -alpha_t (1 - p_t)^gamma log p_t (Daza: gamma = 2).
* :func:`weighted_dice_loss` - 1 - sum_c w_c D_c / sum_c w_c with per-class weights.
* :func:`tversky_loss` - Salehi et al.: 1 - mean_c TP / (TP + alpha FP + beta FN).
* :class:`CompositeLoss` - a weighted sum of the above, applied to one output, to a list of
  deep-supervision outputs (weight of the auxiliary outputs decaying with the epoch), or to the
  two outputs of the two-stage V-Net.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F


def _full(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) in float32; float32 / float64 as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _probs_onehot(logits: torch.Tensor, target: torch.Tensor):
    if logits.dim() < 3 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"logits [B, K, *S] and target [B, *S] do not match: {tuple(logits.shape)} vs {tuple(target.shape)}")
    probs = torch.softmax(_full(logits), dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0,) + tuple(range(2, logits.dim()))
    return probs, onehot, dims


def _classes(k: int, include_background: bool) -> slice:
    return slice(0 if include_background else 1, k)


def soft_dice_loss(logits, target, include_background: bool = False, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean over classes of 2 sum(p g) / (sum p + sum g), sums over batch and voxels."""
    probs, onehot, dims = _probs_onehot(logits, target)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1.0 - dice[_classes(logits.shape[1], include_background)].mean()


def generalized_dice_loss(logits, target, include_background: bool = False, eps: float = 1e-5) -> torch.Tensor:
    """Mu et al.'s generalized Dice: 1 - 1/C sum_c 2 sum p_c g_c / (sum p_c^2 + sum g_c^2)."""
    probs, onehot, dims = _probs_onehot(logits, target)
    inter = (probs * onehot).sum(dims)
    denom = (probs ** 2).sum(dims) + (onehot ** 2).sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1.0 - dice[_classes(logits.shape[1], include_background)].mean()


def cross_entropy(logits, target, class_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Mean voxel cross-entropy (optionally class-weighted, torch's weighted mean)."""
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
    return F.cross_entropy(_full(logits), target.long(), weight=None if weight is None else weight.to(_full(logits).dtype))


def focal_loss(logits, target, gamma: float = 2.0, alpha: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Mean over voxels of -alpha_t (1 - p_t)^gamma log p_t; ``alpha`` per class (default 1)."""
    logp = torch.log_softmax(_full(logits), dim=1)
    logp_t = logp.gather(1, target.long().unsqueeze(1)).squeeze(1)
    p_t = logp_t.exp()
    loss = -((1.0 - p_t) ** gamma) * logp_t
    if alpha is not None:
        a = torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)
        loss = loss * a[target.long()]
    return loss.mean()


def weighted_dice_loss(logits, target, class_weights: Sequence[float], eps: float = 1e-5) -> torch.Tensor:
    """1 - sum_c w_c D_c / sum_c w_c with D_c the soft Dice of class c (all K classes, weight 0 drops one)."""
    probs, onehot, dims = _probs_onehot(logits, target)
    w = torch.as_tensor(class_weights, dtype=probs.dtype, device=probs.device)
    if w.numel() != logits.shape[1] or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"class_weights needs {logits.shape[1]} non-negative values with a positive sum, got {list(class_weights)}")
    inter = (probs * onehot).sum(dims)
    dice = (2 * inter + eps) / (probs.sum(dims) + onehot.sum(dims) + eps)
    return 1.0 - (w * dice).sum() / w.sum()


def tversky_loss(logits, target, alpha: float = 0.3, beta: float = 0.7, include_background: bool = False,
                 eps: float = 1e-5) -> torch.Tensor:
    """1 - mean_c TP / (TP + alpha FP + beta FN) (soft counts; alpha weighs false positives, beta false negatives)."""
    probs, onehot, dims = _probs_onehot(logits, target)
    tp = (probs * onehot).sum(dims)
    fp = (probs * (1 - onehot)).sum(dims)
    fn = ((1 - probs) * onehot).sum(dims)
    ti = (tp + eps) / (tp + alpha * fp + beta * fn + eps)
    return 1.0 - ti[_classes(logits.shape[1], include_background)].mean()


_TERMS = {
    "dice": soft_dice_loss,
    "generalized_dice": generalized_dice_loss,
    "ce": cross_entropy,
    "focal": focal_loss,
    "weighted_dice": weighted_dice_loss,
    "tversky": tversky_loss,
}


def deep_supervision_weight(epoch: int, initial: float, factor: float, every_epochs: int) -> float:
    """Weight of the auxiliary outputs at ``epoch`` (0-based): ``initial * factor ** (epoch // every_epochs)``."""
    return float(initial) * float(factor) ** (int(epoch) // int(every_epochs))


class CompositeLoss:
    """Weighted sum of loss terms, applied to one output or to several.

    ``terms``: ``[{"name": "ce", "weight": 1.0, ...kwargs}]`` (names: dice, generalized_dice,
    ce, focal, weighted_dice, tversky). Class-indexed kwargs (``class_weights``, ``alpha``) may
    be given as ``{class name: value}`` and are resolved against ``classes``.
    ``outputs``: ``{"kind": "single"}``; ``{"kind": "deep_supervision", "initial", "factor",
    "every_epochs"}`` for a list ``[main, aux1, aux2, ...]``: loss = L(main) + w(epoch) * sum L(aux);
    ``{"kind": "sum", "weights": [...]}`` for a list of outputs weighted by fixed weights.
    """

    def __init__(self, terms: Sequence[Mapping], classes: Sequence[str], outputs: Optional[Mapping] = None):
        if not terms:
            raise ValueError("a loss needs at least one term")
        self.terms = []
        for spec in terms:
            spec = dict(spec)
            name = spec.pop("name", None)
            if name not in _TERMS:
                raise ValueError(f"unknown loss term {name!r}; valid: {', '.join(sorted(_TERMS))}")
            weight = float(spec.pop("weight", 1.0))
            for key in ("class_weights", "alpha"):
                if isinstance(spec.get(key), Mapping):
                    spec[key] = [float(spec[key].get(c, 0.0)) for c in classes]
            self.terms.append((name, weight, spec))
        self.outputs = dict(outputs or {"kind": "single"})
        kind = self.outputs.get("kind")
        if kind not in ("single", "deep_supervision", "sum"):
            raise ValueError(f"loss outputs kind must be single, deep_supervision or sum, got {kind!r}")

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = None
        for name, weight, kwargs in self.terms:
            value = weight * _TERMS[name](logits, target, **kwargs)
            total = value if total is None else total + value
        return total

    def output_weights(self, n: int, epoch: int) -> list[float]:
        """Weights of ``n`` network outputs at ``epoch``."""
        kind = self.outputs["kind"]
        if kind == "single":
            return [1.0] + [0.0] * (n - 1)
        if kind == "sum":
            weights = [float(w) for w in self.outputs.get("weights", [1.0] * n)]
            if len(weights) != n:
                raise ValueError(f"loss has {len(weights)} output weights but the network returned {n} outputs")
            return weights
        w = deep_supervision_weight(epoch, self.outputs.get("initial", 0.33), self.outputs.get("factor", 0.8),
                                    self.outputs.get("every_epochs", 15))
        return [1.0] + [w] * (n - 1)

    def __call__(self, outputs, target: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """Loss of ``outputs`` (a logits tensor or a list of them, main first) against ``target``."""
        if isinstance(outputs, torch.Tensor):
            return self.single(outputs, target)
        weights = self.output_weights(len(outputs), epoch)
        total = None
        for out, w in zip(outputs, weights):
            if w == 0:
                continue
            value = w * self.single(out, target)
            total = value if total is None else total + value
        return total
