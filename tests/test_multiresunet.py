"""MultiResUNet: shapes at odd sizes, the paper's widths as a parameter count, gradients, the bundle."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser

from pipeline.networks import MultiResBlock, MultiResUNet
from pipeline.workflows import config_files

PAPER_FEATURES = (32, 64, 128, 256, 512)
TINY = (4, 8, 16, 32, 64)


def expected_parameters(dims: int, in_channels: int, out_channels: int, features: tuple[int, ...]) -> int:
    """Counted from the paper's widths: W = 1.67 U split int(W*0.167), int(W*0.333), int(W*0.5).

    Every convolution followed by a norm has no bias (the norm's shift replaces it); every norm
    (batch, affine) has a scale and a shift per channel. Transposed and output convolutions have
    biases. A MultiRes block: three chained 3^d convolutions + a 1^d shortcut, each with a norm,
    then a norm over the concatenation and one after the residual sum.
    """

    def conv_norm(cin: int, cout: int, kernel: int) -> int:
        return kernel**dims * cin * cout + 2 * cout

    def multires(cin: int, units: int) -> tuple[int, int]:
        total = 1.67 * units
        w1, w2, w3 = int(total * 0.167), int(total * 0.333), int(total * 0.5)
        width = w1 + w2 + w3
        chain = conv_norm(cin, w1, 3) + conv_norm(w1, w2, 3) + conv_norm(w2, w3, 3)
        return chain + conv_norm(cin, width, 1) + 2 * width + 2 * width, width

    count, widths, cin = 0, [], in_channels
    for units in features:  # encoder
        params, cin = multires(cin, units)
        count, widths = count + params, [*widths, cin]
    depth = len(features) - 1
    for level in range(depth):  # res paths: 4, 3, 2, 1 steps of 3^d conv + 1^d shortcut + norm
        width = widths[level]
        count += (depth - level) * (conv_norm(width, width, 3) + conv_norm(width, width, 1) + 2 * width)
    for level in range(depth):  # decoder: 2^d transposed conv to U, then a block over [up, res path]
        count += 2**dims * widths[level + 1] * features[level] + features[level]
        count += multires(features[level] + widths[level], features[level])[0]
    return count + widths[0] * out_channels + out_channels


def parameters(network: torch.nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


@pytest.mark.parametrize("dims", [2, 3])
def test_parameter_count_follows_the_papers_widths(dims: int) -> None:
    network = MultiResUNet(dims, in_channels=1, out_channels=3, features=PAPER_FEATURES)
    assert parameters(network) == expected_parameters(dims, 1, 3, PAPER_FEATURES)
    assert network.encoder[0].out_channels == 8 + 17 + 26  # W = 53.44 at U = 32
    assert [len(path.convs) for path in network.res_paths] == [4, 3, 2, 1]


@pytest.mark.parametrize(
    ("dims", "shape", "norm"),
    [(2, (37, 29), "batch"), (3, (35, 37, 33), "batch"), (3, (33, 19, 41), ("instance", {"affine": True}))],
)
def test_odd_input_sizes_give_logits_of_the_input_size(
    dims: int, shape: tuple[int, ...], norm: object
) -> None:
    network = MultiResUNet(dims, in_channels=2, out_channels=3, features=TINY, norm=norm)
    output = network(torch.randn(2, 2, *shape))
    assert output.shape == (2, 3, *shape)
    assert not torch.allclose(output.softmax(1).sum(1), output.sum(1)), "logits, not probabilities"


def test_gradients_reach_every_parameter_down_to_the_first_layer() -> None:
    torch.manual_seed(0)
    network = MultiResUNet(3, in_channels=1, out_channels=3, features=TINY)
    image = torch.randn(2, 1, 19, 17, 21, requires_grad=True)
    network(image).square().mean().backward()
    first = network.encoder[0].chain[0].conv.weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_the_chained_convolutions_see_3_5_and_7_voxels() -> None:
    """The three concatenated outputs have receptive fields 3, 5, 7 (linear chain: gradient support)."""
    block = MultiResBlock(2, in_channels=1, units=32, act=None, norm=None)
    image = torch.randn(1, 1, 15, 15, requires_grad=True)
    supports, y = [], image
    for conv in block.chain:
        y = conv(y)
        (gradient,) = torch.autograd.grad(y[0, :, 7, 7].sum(), image, retain_graph=True)
        supports.append(int((gradient[0, 0].abs().sum(0) > 0).sum()))
    assert supports == [3, 5, 7]


def test_bad_arguments_and_inputs_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="zero width"):
        MultiResUNet(3, 1, 2, features=(2, 4, 8))
    with pytest.raises(ValueError, match="spatial_dims 2 or 3"):
        MultiResUNet(1, 1, 2)
    with pytest.raises(ValueError, match="at least 16 voxels"):
        MultiResUNet(3, 1, 2, features=TINY)(torch.zeros(1, 1, 15, 32, 32))


def test_the_bundle_config_builds_it_for_any_channels_and_odd_windows() -> None:
    """The composed train config at an odd window (MONAI's verify_net_in_out on the full-size network
    at the metadata's 96^3 runs for every bundle in test_bundles_e2e)."""
    parser = ConfigParser()
    parser.read_config(config_files("multiresunet", "train"))
    parser.update({"in_channels": 2, "num_classes": 4, "features": list(TINY)})
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, MultiResUNet) and network.res_paths[0].convs[0].conv.in_channels == 1 + 2 + 3
    assert network(torch.randn(1, 2, 33, 35, 37)).shape == (1, 4, 33, 35, 37)
