"""BlindSpotInferer: plain pass, seeded refinement (AP-BSN R3), shapes, gradients and arguments."""

import pytest
import torch
import torch.nn.functional as F

from diffdenoise.inferers import BlindSpotInferer
from diffdenoise.networks import BlindSpotNet


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net() -> BlindSpotNet:
    torch.manual_seed(0)
    return BlindSpotNet(features=8, num_blocks=2, pd_stride=3).eval()


@pytest.mark.parametrize("pd_stride", [None, 1, 2])
def test_no_refinement_is_the_plain_network_call(net, pd_stride):
    x = torch.rand(2, 1, 31, 33)
    with torch.no_grad():
        expected = net(x, pd_stride=pd_stride)
    assert torch.equal(BlindSpotInferer(pd_stride=pd_stride)(x, net), expected)


def test_refinement_is_seeded(net):
    x = torch.rand(3, 1, 31, 33)
    inferer = BlindSpotInferer(pd_stride=2, refine_passes=3, seed=7)
    first = inferer(x, net)
    assert first.shape == x.shape
    assert torch.equal(inferer(x, net), first)
    assert not torch.equal(BlindSpotInferer(pd_stride=2, refine_passes=3, seed=8)(x, net), first)
    assert not torch.equal(BlindSpotInferer(pd_stride=2)(x, net), first)


def test_gradients_only_in_training_mode():
    torch.manual_seed(0)
    network = BlindSpotNet(features=8, num_blocks=1)
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    inferer = BlindSpotInferer(refine_passes=2)
    assert inferer(x, network.train()).requires_grad
    assert not inferer(x, network.eval()).requires_grad


@pytest.mark.parametrize(
    "kwargs, knob",
    [
        ({"pd_stride": 0}, "pd_stride"),
        ({"refine_passes": -1}, "refine_passes"),
        ({"refine_prob": 0.0}, "refine_prob"),
        ({"refine_prob": 1.0}, "refine_prob"),
        ({"refine_pd_stride": 0}, "refine_pd_stride"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_invalid_arguments_name_the_knob(kwargs, knob):
    with pytest.raises(ValueError, match=f"Set `{knob}`"):
        BlindSpotInferer(**kwargs)


def _psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (10 * torch.log10(1 / F.mse_loss(x, ref))).item()


def test_refinement_on_a_trained_net_still_denoises():
    """R3 re-injects noisy pixels, so with i.i.d. noise at s=1 it costs some PSNR; it must still denoise."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    clean = 0.3 * xx
    for cy, cx, r, a in torch.rand(8, 4, generator=g):
        clean = clean + (a - 0.3) * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.03 + 0.12 * r) ** 2))
    clean = ((clean - clean.min()) / (clean.max() - clean.min()))[None, None]
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
    torch.manual_seed(0)
    network = BlindSpotNet(features=16, num_blocks=2)
    opt = torch.optim.Adam(network.parameters(), lr=2e-3)
    for _ in range(120):
        ys, xs = torch.randint(0, 49, (4,), generator=g), torch.randint(0, 49, (4,), generator=g)
        batch = torch.cat([noisy[..., y : y + 48, x : x + 48] for y, x in zip(ys.tolist(), xs.tolist())])
        loss = F.mse_loss(network(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    network.eval()
    psnr_noisy = _psnr(noisy, clean)
    psnr_plain = _psnr(BlindSpotInferer()(noisy, network), clean)
    psnr_refined = _psnr(BlindSpotInferer(refine_passes=4)(noisy, network), clean)
    print(f"PSNR noisy {psnr_noisy:.2f}, BSN {psnr_plain:.2f}, BSN + R3 {psnr_refined:.2f} dB")
    assert psnr_plain >= psnr_noisy + 2.0
    assert psnr_refined >= psnr_noisy + 2.0
