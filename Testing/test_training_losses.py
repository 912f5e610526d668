"""Losses of Training.losses against values computed by hand from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from Training.losses import (CompositeLoss, cross_entropy, deep_supervision_weight, focal_loss, generalized_dice_loss,
                             soft_dice_loss, tversky_loss, weighted_dice_loss)

torch.set_num_threads(1)

# Four voxels, two classes. Class-1 probabilities p1 and truth g1; logits = log p make softmax return p exactly.
P1 = [0.9, 0.2, 0.6, 0.1]
G1 = [1, 0, 1, 0]


def example():
    p1 = torch.tensor(P1, dtype=torch.float64)
    logits = torch.log(torch.stack([1 - p1, p1])).unsqueeze(0)  # [B=1, K=2, S=4]
    return logits, torch.tensor([G1])


def test_generalized_dice_matches_mu_et_al_formula():
    logits, target = example()
    # class 1: 2 * sum(p g) / (sum p^2 + sum g^2) = 2 * 1.5 / (1.22 + 2)
    d1 = 2 * 1.5 / (0.81 + 0.04 + 0.36 + 0.01 + 2)
    # class 0: p0 = 1 - p1 = [0.1, 0.8, 0.4, 0.9], g0 = [0, 1, 0, 1]: 2 * 1.7 / (1.62 + 2)
    d0 = 2 * 1.7 / (0.01 + 0.64 + 0.16 + 0.81 + 2)
    assert generalized_dice_loss(logits, target, eps=0.0).item() == pytest.approx(1 - d1, abs=1e-12)
    assert generalized_dice_loss(logits, target, include_background=True, eps=0.0).item() == pytest.approx(1 - (d0 + d1) / 2, abs=1e-12)


def test_soft_dice_tversky_weighted_dice_by_hand():
    logits, target = example()
    assert soft_dice_loss(logits, target, eps=0.0).item() == pytest.approx(1 - 2 * 1.5 / (1.8 + 2), abs=1e-12)
    # TP = 1.5, FP = 0.2 + 0.1, FN = 0.1 + 0.4
    assert tversky_loss(logits, target, alpha=0.3, beta=0.7, eps=0.0).item() == pytest.approx(1 - 1.5 / (1.5 + 0.3 * 0.3 + 0.7 * 0.5), abs=1e-12)
    d0 = 2 * 1.7 / (2.2 + 2)
    d1 = 2 * 1.5 / (1.8 + 2)
    assert weighted_dice_loss(logits, target, [0.2, 1.0], eps=0.0).item() == pytest.approx(1 - (0.2 * d0 + d1) / 1.2, abs=1e-12)
    with pytest.raises(ValueError):
        weighted_dice_loss(logits, target, [1.0])


def test_ce_and_focal_by_hand():
    logits, target = example()
    p_true = [0.9, 0.8, 0.6, 0.9]
    ce = sum(-math.log(p) for p in p_true) / 4
    focal = sum(-((1 - p) ** 2) * math.log(p) for p in p_true) / 4
    assert cross_entropy(logits, target).item() == pytest.approx(ce, abs=1e-12)
    assert focal_loss(logits, target, gamma=2.0).item() == pytest.approx(focal, abs=1e-12)
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(ce, abs=1e-12)
    alpha = [0.25, 0.75]
    weighted = sum(-alpha[g] * ((1 - p) ** 2) * math.log(p) for p, g in zip(p_true, G1)) / 4
    assert focal_loss(logits, target, gamma=2.0, alpha=alpha).item() == pytest.approx(weighted, abs=1e-12)


def test_perfect_prediction_has_zero_overlap_loss_and_works_in_3d():
    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    target[:, 1:3, 1:3, 1:3] = 1
    target[0, 0, 0, 0] = 2
    logits = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 50.0
    for fn in (soft_dice_loss, generalized_dice_loss, tversky_loss):
        assert fn(logits, target).item() == pytest.approx(0.0, abs=1e-5)
    assert weighted_dice_loss(logits, target, [0.1, 1, 1]).item() == pytest.approx(0.0, abs=1e-5)
    assert soft_dice_loss(-logits, target).item() > 0.99


def test_composite_ce_plus_dice_and_class_weights_by_name():
    logits, target = example()
    loss = CompositeLoss([{"name": "ce"}, {"name": "dice", "eps": 0.0}], ["background", "tumor"])
    assert loss(logits, target).item() == pytest.approx(cross_entropy(logits, target).item() + 1 - 3 / 3.8, abs=1e-12)
    wd = CompositeLoss([{"name": "weighted_dice", "class_weights": {"background": 0.2, "tumor": 1.0}, "eps": 0.0}],
                       ["background", "tumor"])
    assert wd(logits, target).item() == pytest.approx(weighted_dice_loss(logits, target, [0.2, 1.0], eps=0.0).item(), abs=1e-12)
    tf = CompositeLoss([{"name": "tversky", "alpha": 0.3, "beta": 0.7}, {"name": "focal", "gamma": 2.0, "weight": 0.5}],
                       ["background", "tumor"])
    assert tf(logits, target).item() == pytest.approx(tversky_loss(logits, target).item() + 0.5 * focal_loss(logits, target).item(), abs=1e-12)
    with pytest.raises(ValueError):
        CompositeLoss([{"name": "nope"}], ["background"])


def test_deep_supervision_weight_decays_and_weights_auxiliary_outputs():
    assert deep_supervision_weight(0, 0.33, 0.8, 15) == pytest.approx(0.33)
    assert deep_supervision_weight(14, 0.33, 0.8, 15) == pytest.approx(0.33)
    assert deep_supervision_weight(15, 0.33, 0.8, 15) == pytest.approx(0.33 * 0.8)
    assert deep_supervision_weight(31, 0.33, 0.8, 15) == pytest.approx(0.33 * 0.64)
    torch.manual_seed(0)
    target = torch.randint(0, 2, (1, 4, 4, 4))
    outs = [torch.randn(1, 2, 4, 4, 4) for _ in range(4)]
    ds = CompositeLoss([{"name": "dice"}], ["background", "kidney"],
                       {"kind": "deep_supervision", "initial": 0.33, "factor": 0.8, "every_epochs": 15})
    single = [soft_dice_loss(o, target).item() for o in outs]
    w = 0.33 * 0.8 ** 2
    assert ds(outs, target, epoch=30).item() == pytest.approx(single[0] + w * sum(single[1:]), abs=1e-6)
    two = CompositeLoss([{"name": "ce"}], ["background", "kidney"], {"kind": "sum", "weights": [1.0, 1.0]})
    assert two(outs[:2], target).item() == pytest.approx(sum(cross_entropy(o, target).item() for o in outs[:2]), abs=1e-6)
    with pytest.raises(ValueError):
        two(outs, target)
