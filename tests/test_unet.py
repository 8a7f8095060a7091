"""The paper's U-Net: layer count, weight count, shapes, options and errors."""

import pytest
import torch
from torch import nn

from ichseg.models import UNet


def count_weights(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_defaults_have_24_convolutions_and_31m_weights():
    net = UNet()
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 24
    # the Keras model of the paper's code reports 31,031,685 parameters
    assert count_weights(net) == 31_031_685
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) for m in net.modules())


def test_narrow_network_weight_count():
    assert count_weights(UNet(base_filters=16)) == 1_941_093


@pytest.mark.parametrize("size", [(32, 32), (64, 48), (160, 160)])
def test_output_shape_equals_input_shape(size):
    net = UNet(in_channels=3, base_filters=4).eval()
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        assert net(x).shape == (2, 1, *size)


def test_input_not_divisible_by_16_gives_clear_error():
    with pytest.raises(ValueError, match=r"divisible by 16 \(depth 4\), got 100x96"):
        UNet(base_filters=4)(torch.rand(1, 1, 100, 96))


def test_depth_changes_the_required_multiple():
    net = UNet(base_filters=4, depth=2).eval()
    assert net(torch.rand(1, 1, 20, 20)).shape == (1, 1, 20, 20)
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 2 * 2 + 2 + 3 * 2 + 2


@pytest.mark.parametrize("norm,layer", [("batch", nn.BatchNorm2d), ("instance", nn.InstanceNorm2d)])
def test_normalisation_option(norm, layer):
    net = UNet(base_filters=4, norm=norm)
    assert sum(isinstance(m, layer) for m in net.modules()) == 22
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 1, 32, 32)


def test_unknown_normalisation():
    with pytest.raises(ValueError, match="unknown normalisation 'group'"):
        UNet(norm="group")


def test_he_normal_initialisation_scale():
    torch.manual_seed(0)
    conv = UNet().encoders[1][0]  # 3x3 conv, 64 -> 128, fan_in 576
    expected = (2 / 576) ** 0.5
    std = conv.weight.std().item()
    # a normal truncated at 2 std has std about 0.88 of the untruncated one
    assert 0.8 * expected < std < 0.95 * expected
    assert torch.all(conv.bias == 0)
    assert conv.weight.abs().max().item() <= 2 * expected + 1e-6


def test_dropout_active_only_in_training():
    net = UNet(base_filters=4)
    x = torch.rand(1, 1, 32, 32)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
    net.train()
    torch.manual_seed(1)
    a = net(x)
    torch.manual_seed(2)
    assert not torch.equal(a, net(x))


def test_channels_last_and_backward():
    net = UNet(base_filters=4).to(memory_format=torch.channels_last)
    x = torch.rand(2, 1, 32, 32).to(memory_format=torch.channels_last)
    loss = nn.functional.binary_cross_entropy_with_logits(net(x), torch.zeros(2, 1, 32, 32))
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_conv1x1_head_replaces_the_two_filter_bottleneck():
    paper, plain = UNet(base_filters=4, depth=2), UNet(base_filters=4, depth=2, head="conv1x1")
    assert sum(isinstance(m, nn.Conv2d) for m in plain.modules()) == (
        sum(isinstance(m, nn.Conv2d) for m in paper.modules()) - 1
    )
    assert plain.head[0].kernel_size == (1, 1) and plain.head[0].in_channels == 4
    assert plain(torch.rand(2, 1, 16, 16)).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="head"):
        UNet(head="mlp")


def test_a_dead_paper_head_stops_every_gradient_but_the_last_bias():
    """The paper's 2-filter ReLU: once both are negative everywhere the output is a constant."""
    net = UNet(base_filters=4, depth=2)
    with torch.no_grad():
        net.head[0].bias.fill_(-1e3)  # both ReLU inputs negative: the units are dead
    net(torch.rand(2, 1, 16, 16)).sum().backward()
    assert net.encoders[0][0].weight.grad.abs().sum() == 0
    assert net.head[2].bias.grad.abs().sum() > 0
    plain = UNet(base_filters=4, depth=2, head="conv1x1")
    plain(torch.rand(2, 1, 16, 16)).sum().backward()
    assert plain.encoders[0][0].weight.grad.abs().sum() > 0
