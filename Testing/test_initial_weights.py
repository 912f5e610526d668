"""Fine-tuning across a normalisation change: a batch-norm network's weights start an instance-norm one."""

from __future__ import annotations

import pytest
import torch

from KidneyTumorSegLib.networks import build_network
from Training.trainer import without_batch_statistics

KWARGS = {"features": [4, 8, 8, 8, 8], "down_blocks": [1, 1, 1, 1], "up_blocks": [1, 1, 1, 1]}


def test_batch_norm_weights_start_an_instance_norm_network_with_every_learnt_parameter():
    torch.manual_seed(0)
    bn = build_network("vbnet", in_channels=1, num_classes=3, norm="batch", **KWARGS)
    inorm = build_network("vbnet", in_channels=1, num_classes=3, norm="instance", **KWARGS)
    state = bn.state_dict()
    with pytest.raises(RuntimeError, match="running_mean"):
        inorm.load_state_dict(state)  # the statistics have no place in an instance-norm network
    kept = without_batch_statistics(state, inorm.state_dict())
    inorm.load_state_dict(kept)  # strict: nothing learnt is missing
    assert set(kept) == set(inorm.state_dict())
    for key, value in inorm.state_dict().items():
        assert torch.equal(value, state[key]), key
    # a batch-norm target keeps them: nothing is dropped that the network uses
    assert without_batch_statistics(state, bn.state_dict()).keys() == state.keys()


def test_a_different_architecture_is_still_refused():
    bn = build_network("vbnet", in_channels=1, num_classes=3, norm="batch", **KWARGS)
    wider = build_network("vbnet", in_channels=1, num_classes=3, norm="instance",
                          **dict(KWARGS, features=[4, 8, 16, 16, 16]))
    with pytest.raises(RuntimeError, match="size mismatch"):
        wider.load_state_dict(without_batch_statistics(bn.state_dict(), wider.state_dict()))
