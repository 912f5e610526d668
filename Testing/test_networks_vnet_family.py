"""V-Net family (vbnet, vnet, vnet_two_stage) at tiny sizes: shapes, outputs per mode, gradients,
state_dict round trip, argument and input-size errors, autocast, and the paper-configuration sizes."""

import pytest
import torch

from KidneyTumorSegLib.networks import available, build_network, count_parameters

NAMES = ["vbnet", "vnet", "vnet_two_stage"]
SMALL = dict(features=(2, 4, 8, 16, 32))


def small(name, **kwargs):
    torch.manual_seed(0)
    return build_network(name, **{**SMALL, **kwargs})


def outputs(model, x):
    out = model(x)
    return out if isinstance(out, list) else [out]


def test_registered():
    assert set(NAMES) <= set(available())


@pytest.mark.parametrize("name", NAMES)
def test_attributes(name):
    model = small(name)
    assert model.min_input_multiple == (16, 16, 16)
    assert model.spatial_dims == 3


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes_train_and_eval(name):
    model = small(name, in_channels=2, num_classes=4)
    x = torch.randn(2, 2, 16, 16, 32)
    model.train()
    train_out = outputs(model, x)
    assert len(train_out) == (2 if name == "vnet_two_stage" else 1)
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
    assert isinstance(eval_out, torch.Tensor)
    for out in train_out + [eval_out]:
        assert out.shape == (2, 4, 16, 16, 32)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,norm", [("vbnet", "batch"), ("vbnet", "instance"), ("vbnet", "none"),
                                       ("vnet", "batch"), ("vnet", "instance"), ("vnet_two_stage", "batch")])
def test_gradients_reach_every_parameter(name, norm):
    torch.manual_seed(0)
    model = small(name, norm=norm, dropout=0.1).train()
    x = torch.randn(2, 1, 32, 32, 32)
    weights = torch.randn(2, 3, 32, 32, 32)
    loss = sum((out * weights).sum() for out in outputs(model, x))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_vbnet_all_bottleneck_gradients():
    # 32^3 rather than 16^3: at 16^3 the deepest level is 1 voxel, where batch norm over two
    # samples gives +-1 and a ReLU can zero a whole channel's gradient depending on rounding.
    torch.manual_seed(0)
    model = small("vbnet", bottleneck_from_level=0).train()
    model(torch.randn(2, 1, 32, 32, 32)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_two_stage_trains_stage1_through_stage2_loss():
    # joint training: the stage-2 loss alone must reach V-Net 1 (softmax input + feature ensemble)
    torch.manual_seed(0)
    model = small("vnet_two_stage").train()
    stage2_logits, _ = model(torch.randn(2, 1, 32, 32, 32))
    (stage2_logits * torch.randn_like(stage2_logits)).sum().backward()
    for pname, p in model.stage1.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_two_stage_wiring():
    """V-Net 2 sees [image, softmax(stage-1 logits)] and each of its up-stage outputs has the
    matching V-Net 1 up-stage output added before the next stage."""
    model = small("vnet_two_stage", num_classes=3).eval()
    seen = {}

    def keep_output(key):
        return lambda module, args, out: seen.__setitem__(key, out.clone())

    def keep_input(key):
        return lambda module, args: seen.__setitem__(key, args[0].clone())

    for i in range(4):
        model.stage1.up[i].register_forward_hook(keep_output(("s1", i)))
        model.stage2.up[i].register_forward_hook(keep_output(("s2", i)))
        if i < 3:
            model.stage2.up[i + 1].register_forward_pre_hook(keep_input(("next", i)))
    model.stage2.output.register_forward_pre_hook(keep_input(("next", 3)))
    model.stage2.input_stage.register_forward_pre_hook(keep_input("stage2_input"))

    x = torch.randn(1, 1, 16, 16, 32)
    with torch.no_grad():
        logits2 = model(x)
        logits1 = model.stage1(x)
    assert model.stage2.input_stage.conv[0].in_channels == 1 + 3
    torch.testing.assert_close(seen["stage2_input"], torch.cat((x, torch.softmax(logits1, 1)), 1))
    for i in range(4):
        torch.testing.assert_close(seen[("next", i)], seen[("s2", i)] + seen[("s1", i)])
    torch.testing.assert_close(logits2, model.stage2.output(seen[("next", 3)]))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    source = small(name)
    with torch.no_grad():
        source.train()(torch.randn(2, 1, 16, 16, 16))  # move batch-norm running stats off their defaults
    source.eval()
    torch.manual_seed(1)
    target = build_network(name, **SMALL).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert not torch.equal(source(x), target(x))
        target.load_state_dict(source.state_dict(), strict=True)
        assert torch.equal(source(x), target(x))


@pytest.mark.parametrize("name", NAMES)
def test_unknown_kwarg_rejected(name):
    with pytest.raises(ValueError, match="blocks_per_levle"):
        build_network(name, blocks_per_levle=(1, 2, 3, 3))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 1, 32, 32, 24), (1, 1, 8, 32, 32), (1, 1, 32, 32)])
def test_bad_input_size_raises(name, shape):
    model = small(name).eval()
    with pytest.raises(ValueError, match="min_input_multiple|5D"):
        model(torch.randn(*shape))


@pytest.mark.parametrize("kwargs", [dict(features=(4, 8, 16, 32)), dict(norm="group"), dict(dropout=1.0)])
def test_bad_config_raises(kwargs):
    for name in NAMES:
        with pytest.raises(ValueError):
            build_network(name, **kwargs)


def test_vnet_input_residual_projection():
    # in_channels=3 does not divide features[0]=2: the input residual uses a 1x1x1 projection
    model = small("vnet", in_channels=3).eval()
    assert model.input_stage.project is not None
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    assert small("vnet", in_channels=1).input_stage.project is None


@pytest.mark.parametrize("name", NAMES)
def test_autocast_bfloat16(name):
    model = small(name).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 1, 16, 16, 16))
    assert out.shape == (1, 3, 16, 16, 16)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()


def test_paper_configuration_sizes():
    # VB-Net paper: 8.8 MB vs 250 MB for V-Net (see the VBNet docstring)
    assert count_parameters(build_network("vbnet")) == 2_161_619
    assert count_parameters(build_network("vbnet", bottleneck_from_level=0)) == 1_907_731
    assert count_parameters(build_network("vnet")) == 65_178_803
