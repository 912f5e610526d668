"""Networks of the Liu, ResUNet/2.5D V-Net and Daza seeds: shapes, deep supervision, gradients,
state_dict round trips, parameter bounds and the attention blocks against their defining formulas."""

import io

import pytest
import torch
import torch.nn.functional as F

from KidneyTumorSegLib.networks import available, build_network, count_parameters
from KidneyTumorSegLib.networks.blocks import AttentionGate, ChannelAttention, PositionAttention

# name -> (kwargs, input shape [B, C, *spatial])
CASES = {
    # instance-norm networks run with one sample; batch-norm ones need two
    "unet3d_se_hdc_da": ({"in_channels": 1, "num_classes": 3}, (1, 1, 8, 32, 32)),
    "resunet3d_ds": ({"in_channels": 1, "num_classes": 4}, (1, 1, 8, 16, 24)),
    "vnet25d_ms_se_ag": ({"in_channels": 5, "num_classes": 3}, (2, 5, 32, 48)),
    "deeplabv3plus3d": ({"in_channels": 1, "num_classes": 4}, (2, 1, 16, 16, 16)),
}
DEEP_SUPERVISION = {"resunet3d_ds": 4}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors gain nothing from threads, and on a shared 2-core machine OpenMP threads that
    # spin while waiting for each other made this file 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name, seed=0):
    torch.manual_seed(seed)
    kwargs, _ = CASES[name]
    return build_network(name, **kwargs)


def _input(name, seed=1):
    torch.manual_seed(seed)
    return torch.randn(CASES[name][1])


def _as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def test_registered():
    assert set(CASES) <= set(available())


def test_resunet_eval_output_is_first_training_output():
    # instance norm and no dropout: train and eval compute the same function, so the eval output
    # must be the full-resolution training output, listed first
    net = _build("resunet3d_ds")
    x = _input("resunet3d_ds")
    with torch.no_grad():
        train_out = net.train()(x)
        eval_out = net.eval()(x)
    torch.testing.assert_close(eval_out, train_out[0], rtol=0, atol=0)
    assert not torch.allclose(train_out[0], train_out[3])


def _expected_shape(name):
    kwargs, shape = CASES[name]
    return (shape[0], kwargs["num_classes"], *shape[2:])


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_outputs_and_gradient_to_every_parameter(name):
    net = _build(name).train()
    _, shape = CASES[name]
    assert net.spatial_dims == len(shape) - 2
    assert len(net.min_input_multiple) == net.spatial_dims
    assert all(s % m == 0 for s, m in zip(shape[2:], net.min_input_multiple))
    # DANet's attention scales start at 0, which blocks the gradient to the query/key/value convs
    # on the first step only; give them a trained-like value so that every path is exercised
    for pname, p in net.named_parameters():
        if pname.endswith("gamma"):
            p.data.fill_(0.5)
    x = _input(name)
    out = net(x)
    n_out = DEEP_SUPERVISION.get(name, 1)
    if n_out > 1:
        assert isinstance(out, list) and len(out) == n_out
    else:
        assert isinstance(out, torch.Tensor)
    outs = _as_list(out)
    assert all(tuple(o.shape) == _expected_shape(name) for o in outs)
    torch.manual_seed(2)
    target = torch.randint(0, CASES[name][0]["num_classes"], (x.shape[0], *x.shape[2:]))
    sum(F.cross_entropy(o, target) for o in outs).backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_round_trip_and_eval_determinism(name):
    net = _build(name, seed=0)
    x = _input(name)
    with torch.no_grad():
        net.train()(x)  # moves batch-norm running statistics away from their initial values
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    other = _build(name, seed=123)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    net.eval()
    other.eval()
    with torch.no_grad():
        a = net(x)
        b = other(x)
        again = net(x)
    assert isinstance(a, torch.Tensor) and tuple(a.shape) == _expected_shape(name)
    assert torch.equal(a, b)
    assert torch.equal(a, again)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_autocast(name):
    net = _build(name).eval()
    x = _input(name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert tuple(out.shape) == _expected_shape(name)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("num_classes", [3, 4])
def test_deeplab_under_560k_parameters(num_classes):
    n = count_parameters(build_network("deeplabv3plus3d", in_channels=1, num_classes=num_classes))
    assert n < 560_000
    assert n > 500_000  # the seed's bound is tight: a much smaller count means a missing part


def test_liu_anisotropic_first_downsampling_and_last_upsampling():
    net = _build("unet3d_se_hdc_da").train()
    assert net.min_input_multiple == (4, 8, 8)
    shapes = {}
    for key in ("enc1", "enc2", "enc3", "bottom", "up1"):
        getattr(net, key).register_forward_hook(lambda m, i, o, key=key: shapes.__setitem__(key, tuple(o.shape)))
    with torch.no_grad():
        out = net(torch.randn(1, 1, 8, 32, 32))
    assert out.shape == (1, 3, 8, 32, 32)
    assert shapes["enc1"] == (1, 24, 8, 32, 32)
    assert shapes["enc2"] == (1, 48, 8, 16, 16)  # slice axis D kept, H and W halved
    assert shapes["enc3"] == (1, 96, 4, 8, 8)
    assert shapes["bottom"] == (1, 192, 2, 4, 4)
    assert shapes["up1"] == (1, 24, 8, 32, 32)  # last up-sampling doubles only H and W


def test_vnet25d_slice_count_is_configurable():
    torch.manual_seed(0)
    net = build_network("vnet25d_ms_se_ag", in_channels=3, num_classes=4).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 32, 48))
    assert out.shape == (1, 4, 32, 48)


def _danet_position(m, x):
    q = m.query(x).flatten(2).transpose(1, 2)
    k = m.key(x).flatten(2)
    v = m.value(x).flatten(2)
    attention = torch.softmax(torch.bmm(q, k), dim=-1)
    return m.gamma * torch.bmm(v, attention.transpose(1, 2)).reshape(x.shape) + x


def test_position_attention_matches_danet_formula():
    torch.manual_seed(0)
    m = PositionAttention(3, 16)
    m.gamma.data.fill_(0.7)
    x = torch.randn(2, 16, 4, 5, 6)
    torch.testing.assert_close(m(x), _danet_position(m, x), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x)
    torch.testing.assert_close(low.float(), _danet_position(m, x), rtol=0.05, atol=0.05)


def test_channel_attention_matches_danet_formula():
    torch.manual_seed(0)
    m = ChannelAttention()
    m.gamma.data.fill_(0.3)
    x = torch.randn(2, 6, 3, 4, 5)
    flat = x.flatten(2)
    energy = torch.bmm(flat, flat.transpose(1, 2))
    attention = torch.softmax(energy.max(-1, keepdim=True)[0] - energy, dim=-1)
    expected = 0.3 * torch.bmm(attention, flat).reshape(x.shape) + x
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_gate_shapes_and_range():
    torch.manual_seed(0)
    gate = AttentionGate(2, x_channels=8, g_channels=16, inter_channels=4)
    x, g = torch.randn(2, 8, 16, 12), torch.randn(2, 16, 8, 6)
    alpha = gate.attention(x, g)
    assert alpha.shape == (2, 1, 16, 12)
    assert (alpha > 0).all() and (alpha < 1).all()
    assert gate(x, g).shape == x.shape


def _phantom(shape, num_classes):
    """A ball (class 1) holding a smaller ball (class 2) in noise; image channels all equal."""
    spatial = shape[2:]
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in spatial], indexing="ij")
    r = torch.sqrt(sum(g ** 2 for g in grids))
    label = (r < 0.8).long() + (r < 0.4).long()
    label = label.clamp(max=num_classes - 1).expand(shape[0], *spatial)
    torch.manual_seed(3)
    image = label[:, None].float().expand(shape).clone() + 0.3 * torch.randn(shape)
    return image, label


@pytest.mark.parametrize("name", sorted(CASES))
def test_few_steps_on_a_phantom_reduce_the_loss(name):
    net = _build(name).train()
    kwargs, shape = CASES[name]
    image, label = _phantom(shape, kwargs["num_classes"])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    torch.manual_seed(4)  # dropout masks
    for _ in range(6):
        optimizer.zero_grad()
        outs = _as_list(net(image))
        loss = sum(F.cross_entropy(o, label) for o in outs) / len(outs)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
