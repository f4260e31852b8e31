"""NAFNet student: any image size, the block as specified, TorchScript equal to eager, and that it denoises."""

import pytest
import torch

from diffdenoise.networks import NAFNet
from diffdenoise.networks.nafnet import NAFBlock

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(net: NAFNet, seed: int = 0) -> NAFNet:
    """A fresh NAFNet has beta = gamma = 0 (blocks are identities); random weights exercise every path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 1, 31, 33), (2, 1, 17, 10), (1, 1, 1, 1), (1, 1, 384, 274)])
def test_any_size_keeps_the_shape(shape, levels):
    net = _perturbed(NAFNet(width=4, enc_blocks=[1] * levels, middle_blocks=1, dec_blocks=[1] * levels))
    with torch.no_grad():
        y = net(torch.rand(shape))
    assert y.shape == shape and torch.isfinite(y).all()


def test_multichannel_and_batch_items_independent():
    net = _perturbed(NAFNet(channels=3, width=4, enc_blocks=[1, 1], dec_blocks=[1, 1]))
    x = torch.rand(3, 3, 20, 19, requires_grad=True)
    (grad,) = torch.autograd.grad(net(x)[0].sum(), x)
    assert torch.count_nonzero(grad[1:]) == 0 and torch.count_nonzero(grad[0]) > 0


def test_block_is_the_specified_one():
    """1x1 to 2c, depthwise 3x3, SimpleGate, channel attention, 1x1; norm, 1x1 to 2c, gate, 1x1: 7c^2 + 33c weights."""
    c = 12
    block = NAFBlock(c)
    assert sum(p.numel() for p in block.parameters()) == 7 * c * c + 33 * c
    assert block.depthwise.groups == 2 * c and block.depthwise.kernel_size == (3, 3)
    x = torch.rand(2, c, 9, 7)
    torch.testing.assert_close(block(x), x)  # beta = gamma = 0: a new block is the identity


@pytest.mark.parametrize("width, low, high", [(16, 1.0e6, 1.3e6), (32, 4.0e6, 5.0e6)])
def test_parameter_count_one_block_per_stage(width, low, high):
    """DESIGN.md: width 16-32 with one block per stage (4 levels) is about 1-5 M parameters."""
    net = NAFNet(width=width, enc_blocks=[1, 1, 1, 1], middle_blocks=1, dec_blocks=[1, 1, 1, 1])
    assert low <= sum(p.numel() for p in net.parameters()) <= high


@pytest.mark.filterwarnings("ignore:`torch.jit.(script|trace|trace_method)` is deprecated:DeprecationWarning")
def test_torchscript_script_and_trace_match_eager():
    """ckpt_export scripts the network by default (``--use_trace`` traces it); both must equal eager at any size."""
    net = _perturbed(NAFNet(width=8, enc_blocks=[1, 2], middle_blocks=1, dec_blocks=[2, 1]))
    scripted = torch.jit.script(net)
    traced = torch.jit.trace(net, torch.rand(1, 1, 32, 32))
    with torch.no_grad():
        for shape in [(2, 1, 31, 33), (1, 1, 1, 1), (1, 1, 64, 48)]:
            x = torch.rand(shape)
            torch.testing.assert_close(scripted(x), net(x))
            torch.testing.assert_close(traced(x), net(x))


@pytest.mark.parametrize(
    "kwargs, knob",
    [
        ({"channels": 0}, "channels"),
        ({"width": 2.5}, "width"),
        ({"width": True}, "width"),
        ({"middle_blocks": -1}, "middle_blocks"),
        ({"enc_blocks": 3}, "enc_blocks"),
        ({"enc_blocks": "11"}, "enc_blocks"),
        ({"dec_blocks": [1, -1, 1, 1]}, "dec_blocks"),
        ({"enc_blocks": [1, 1], "dec_blocks": [1, 1, 1]}, "same length"),
    ],
)
def test_invalid_arguments_name_the_knob(kwargs, knob):
    with pytest.raises(ValueError, match=knob):
        NAFNet(**kwargs)


def test_trained_on_a_real_slice_denoises_it(mri_slice, psnr_gain_after_training):
    """A small NAFNet fitted to (noisy, clean) crops of one MRI slice beats its noisy input on the whole slice."""
    clean = mri_slice
    noisy = clean + 15 / 255 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    net = NAFNet(width=8, enc_blocks=[1, 1], middle_blocks=1, dec_blocks=[1, 1])
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, betas=(0.9, 0.9))
    gain = psnr_gain_after_training(net, optimizer, noisy, clean, clean, 60)
    print(f"PSNR gain {gain:.2f} dB")
    assert gain >= 2.0
