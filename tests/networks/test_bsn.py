"""BlindSpotNet: exact blindness on the (2s-1)^2 square, any image size, and that it denoises."""

import time

import pytest
import torch

from diffdenoise.networks import BlindSpotNet

# Centre, next to the bottom-right border (H=31, W=33 are not multiples of 2; H is not one of 3) and corner.
PIXELS = [(15, 16), (29, 31), (30, 32)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(train_stride: int, prior_variance: bool = False) -> BlindSpotNet:
    torch.manual_seed(0)  # a seed whose random ReLU net is not constant (about 1 in 20 tiny nets are)
    return BlindSpotNet(features=8, num_blocks=2, pd_stride=train_stride, prior_variance=prior_variance)


def _input_grad(net: BlindSpotNet, x: torch.Tensor, pixel: tuple, head: str = "mean", **kwargs) -> torch.Tensor:
    """d out[pixel] / d x, where out is the prior mean (``forward``) or the prior variance (``prior``)."""
    x = x.clone().requires_grad_(True)
    out = net(x, **kwargs) if head == "mean" else net.prior(x, **kwargs)[1]
    (grad,) = torch.autograd.grad(out[0, 0][pixel], x)
    return grad


@pytest.mark.parametrize("head", ["mean", "variance"])
@pytest.mark.parametrize("override", [False, True], ids=["init_stride", "call_stride"])
@pytest.mark.parametrize("s", [1, 2, 3])
def test_blind_square_exact(s, override, head):
    net = _net(5 if override else s, prior_variance=head == "variance")
    kwargs = {"pd_stride": s} if override else {}
    x = torch.rand(1, 1, 31, 33, generator=torch.Generator().manual_seed(s))
    for i, j in PIXELS:
        grad = _input_grad(net, x, (i, j), head, **kwargs)[0, 0]
        square = grad[max(i - s + 1, 0) : i + s, max(j - s + 1, 0) : j + s]
        assert torch.count_nonzero(square) == 0, f"pixel {(i, j)} sees its own (2s-1)^2 square, s={s}"
        off_lattice = torch.ones_like(grad, dtype=torch.bool)
        off_lattice[i % s :: s, j % s :: s] = False
        assert torch.count_nonzero(grad[off_lattice]) == 0, "PD must only mix pixels of one sub-image"
        if (i, j) == PIXELS[0]:
            just_outside = [grad[i - s, j], grad[i + s, j], grad[i, j - s], grad[i, j + s]]
            assert all(g != 0 for g in just_outside), f"neighbours at distance {s} should be seen: {just_outside}"


@pytest.mark.parametrize("s", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(1, 3, 31, 33), (2, 3, 17, 10), (1, 3, 4, 4)])
def test_shape_any_size(shape, s):
    net = BlindSpotNet(in_channels=3, out_channels=2, features=8, num_blocks=1, pd_stride=s)
    assert net(torch.rand(shape)).shape == (shape[0], 2, *shape[2:])
    assert net.blind_spot == 2 * s - 1


def test_batch_items_independent():
    net = _net(2)
    x = torch.rand(3, 1, 31, 33, requires_grad=True)
    (grad,) = torch.autograd.grad(net(x)[0].sum(), x)
    assert torch.count_nonzero(grad[1:]) == 0
    assert torch.count_nonzero(grad[0]) > 0


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("prior_variance", [False, True])
def test_torchscript_matches_eager(prior_variance):
    """The bundle exports model.ts with ckpt_export, which scripts the network."""
    net = _net(3, prior_variance).eval()
    x = torch.rand(2, 1, 20, 19)
    scripted = torch.jit.script(net)
    torch.testing.assert_close(scripted(x), net(x))
    torch.testing.assert_close(scripted(x, pd_stride=1), net(x, pd_stride=1))
    if prior_variance:
        torch.testing.assert_close(scripted(x, variance=True), torch.cat(net.prior(x), dim=1))


def test_prior_variance_adds_a_head_and_keeps_forward_the_mean():
    x = torch.rand(2, 3, 17, 10)
    net = BlindSpotNet(in_channels=3, out_channels=2, features=8, num_blocks=1, pd_stride=2, prior_variance=True)
    mu, v = net.prior(x)
    assert mu.shape == v.shape == (2, 2, 17, 10) and bool((v > 0).all())
    torch.testing.assert_close(net(x), mu)
    assert net(x, variance=True).shape == (2, 4, 17, 10)
    assert net.noise_log_scale.shape == () and any(p is net.noise_log_scale for p in net.parameters())


def test_without_prior_variance_the_network_is_unchanged():
    net = _net(2)
    assert not hasattr(net, "noise_log_scale")
    assert net.tail[-1].out_channels == 1
    with pytest.raises(ValueError, match="prior_variance=True"):
        net.prior(torch.rand(1, 1, 8, 8))


@pytest.mark.parametrize(
    "kwargs, knob",
    [
        ({"in_channels": 0}, "in_channels"),
        ({"out_channels": 1.5}, "out_channels"),
        ({"features": 1}, "features"),
        ({"num_blocks": -1}, "num_blocks"),
        ({"pd_stride": 0}, "pd_stride"),
        ({"pd_stride": True}, "pd_stride"),
        ({"prior_variance": "yes"}, "prior_variance"),
    ],
)
def test_invalid_arguments_name_the_knob(kwargs, knob):
    with pytest.raises(ValueError, match=f"Set `{knob}`"):
        BlindSpotNet(**kwargs)


def test_invalid_call_stride():
    with pytest.raises(ValueError, match="pd_stride"):
        _net(1)(torch.rand(1, 1, 8, 8), pd_stride=0)


def _smooth_image(size: int = 128) -> torch.Tensor:
    """Smooth gradient plus Gaussian blobs, in [0, 1]: a stand-in for anatomy."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = 0.3 * xx
    for cy, cx, r, a in torch.rand(12, 4, generator=g):
        img = img + (a - 0.3) * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.03 + 0.12 * r) ** 2))
    return ((img - img.min()) / (img.max() - img.min()))[None, None]


@pytest.mark.parametrize("source", ["synthetic", "mri"])
def test_self_supervised_training_denoises(source, request, psnr_gain_after_training):
    clean = _smooth_image() if source == "synthetic" else request.getfixturevalue("mri_slice")
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    net = BlindSpotNet(features=16, num_blocks=2)
    start = time.perf_counter()
    # the target is the noisy input itself
    gain = psnr_gain_after_training(net, torch.optim.Adam(net.parameters(), lr=2e-3), noisy, noisy, clean, 150)
    print(f"{source}: PSNR gain {gain:.2f} dB after {time.perf_counter() - start:.1f} s of training")
    assert gain >= 2.0
