"""Exactly blind blind-spot network (BSN) with pixel-shuffle downsampling, after DBSN and AP-BSN.

Papers: Wu et al., "Unpaired learning of deep image denoising" (DBSN, ECCV 2020); Lee et al.,
"AP-BSN: Self-supervised denoising for real-world images via asymmetric PD and blind-spot network"
(CVPR 2022). The layout is AP-BSN's ``DBSNl``.

Why it is exactly blind: each branch starts with a centre-masked k x k conv, so every path leaves the
input pixel at an offset ``d != 0`` with ``|d_i| <= (k - 1) / 2``; everything after it moves by multiples
of ``m`` (3x3 convs of dilation m, 1x1 convs, residual adds). Branch A has k = 3, m = 2: some component
of d is odd and stays odd. Branch B has k = 5, m = 3: some component of d is not a multiple of 3 and
never becomes one. So no path returns to offset 0 and d(out_p)/d(in_p) is exactly 0.

Pixel-shuffle downsampling (PD) with stride s runs the net on the s^2 sub-images ``x[a::s, b::s]``, so
an output pixel sees only input pixels at offsets ``s * k`` with ``k != 0``: the blind spot grows to
the (2s - 1)^2 square around it (s = 1, 3, 5 -> 1, 5, 9; AP-BSN trains with s = 5 to break spatially
correlated noise and tests with s = 2 plus refinement, see ``BlindSpotInferer``).

With ``prior_variance`` the same blind features also give the variance v of a per-pixel Gaussian prior
N(mu, v), as in Laine et al., "High-quality self-supervised deep image denoising" (NeurIPS 2019): the
last 1x1 conv gets a second group of channels, so v is exactly as blind as mu.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BlindSpotNet"]

# The prior variance starts around 1e-3 (std 0.03, about 8/255), near a typical local spread of a [0, 1] image.
_VAR_INIT = 1e-3
# The learned noise variance starts above any usual level (c = log 1e-2: sigma 25.5/255, lambda = alpha = 100):
# from above, flat pixels pull it down to the noise; from below, the variance head takes up the missing noise
# and the level stalls (measured on a real slice: sigma 15/255 learned as 9.5/255 from a start at 8/255).
_NOISE_INIT = 1e-2


class _CentreMaskedConv2d(nn.Conv2d):
    """k x k conv whose centre tap is multiplied by a fixed zero, so it never sees its own pixel."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2)
        mask = torch.ones(1, 1, kernel_size, kernel_size)
        mask[..., kernel_size // 2, kernel_size // 2] = 0.0
        # Not persistent: the mask follows from kernel_size, so checkpoints stay plain Conv2d weights.
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class _DilatedBlock(nn.Module):
    """Residual 3x3 conv of dilation m + 1x1 conv; moves information only by multiples of m."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _branch(channels: int, mask_size: int, dilation: int, num_blocks: int) -> nn.Sequential:
    """Centre-masked conv, then only 1x1 convs and dilated blocks (AP-BSN ``DC_branchl``)."""
    return nn.Sequential(
        _CentreMaskedConv2d(channels, mask_size),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 1),
        nn.ReLU(inplace=True),
        *[_DilatedBlock(channels, dilation) for _ in range(num_blocks)],
        nn.Conv2d(channels, channels, 1),
        nn.ReLU(inplace=True),
    )


def _check_int(name: str, value: int, low: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}. {fix}")


class BlindSpotNet(nn.Module):
    """Exactly blind 2D denoiser: output pixel p never depends on input pixels within ``s - 1`` of p.

    Trained self-supervised with ``MSE(net(noisy), noisy)``: with the own pixel hidden, the best
    prediction is the clean signal, as long as the noise is independent across the blind square. With
    ``prior_variance``, by the likelihood of the noisy pixel instead (``diffdenoise.prior_likelihood``).

    Args:
        in_channels: channels of the noisy input.
        out_channels: channels of the prediction.
        features: width of the two branches (the tail narrows to ``features // 2``).
        num_blocks: residual dilated blocks per branch; receptive field grows by 2 (branch A) and 3
            (branch B) sub-image pixels per block and side.
        pd_stride: pixel-shuffle stride s used by default (training); blind square (2s - 1)^2.
        prior_variance: also predict the prior variance v (``prior``) and hold ``noise_log_scale``, the
            learned noise level c: the noise variance is exp(c) * g(mu), g = 1 (Gaussian, Rician), mu
            (Poisson), mu^2 (Gamma); ``forward`` still returns mu alone.

    Raises:
        ValueError: a size or stride that is not a positive integer (``features`` must be >= 2), or a
            ``prior_variance`` that is not a bool.

    Example::

        import torch
        from diffdenoise.networks import BlindSpotNet

        net = BlindSpotNet(features=48, num_blocks=5, pd_stride=3)   # trained with a 5x5 blind square
        noisy = torch.rand(2, 1, 128, 127)
        loss = torch.nn.functional.mse_loss(net(noisy), noisy)       # self-supervised
        net.eval()
        with torch.no_grad():
            x_c = net(noisy, pd_stride=2)                            # AP-BSN asymmetric PD at test time
        assert x_c.shape == noisy.shape and net.blind_spot == 5
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: int = 48,
        num_blocks: int = 5,
        pd_stride: int = 1,
        prior_variance: bool = False,
    ):
        super().__init__()
        _check_int("in_channels", in_channels, 1, "Set `in_channels` to the image channels, e.g. 1.")
        _check_int("out_channels", out_channels, 1, "Set `out_channels` to the image channels, e.g. 1.")
        _check_int("features", features, 2, "Set `features` to e.g. 48 (AP-BSN uses 128).")
        _check_int("num_blocks", num_blocks, 0, "Set `num_blocks` to e.g. 5 (AP-BSN uses 9).")
        _check_int("pd_stride", pd_stride, 1, "Set `pd_stride` to 1 (no PD), 2, 3 or 5 (blind squares 1, 3, 5, 9).")
        if not isinstance(prior_variance, bool):
            raise ValueError(f"prior_variance must be True or False, got {prior_variance!r}. Set `prior_variance`.")
        self.pd_stride = pd_stride
        self.out_channels = out_channels
        self.prior_variance = prior_variance
        self.head = nn.Sequential(nn.Conv2d(in_channels, features, 1), nn.ReLU(inplace=True))
        self.branch_a = _branch(features, mask_size=3, dilation=2, num_blocks=num_blocks)
        self.branch_b = _branch(features, mask_size=5, dilation=3, num_blocks=num_blocks)
        half = features // 2
        self.tail = nn.Sequential(
            nn.Conv2d(2 * features, features, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, half, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, 2 * out_channels if prior_variance else out_channels, 1),
        )
        if prior_variance:
            with torch.no_grad():
                self.tail[-1].bias[out_channels:] = math.sqrt(_VAR_INIT)
            # in the network, so that a checkpoint holds the level it was trained with
            self.noise_log_scale = nn.Parameter(torch.tensor(math.log(_NOISE_INIT)))

    @property
    def blind_spot(self) -> int:
        """Side of the blind square at the training stride, ``2 * pd_stride - 1``."""
        return 2 * self.pd_stride - 1

    def _blind(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.tail(torch.cat([self.branch_a(h), self.branch_b(h)], dim=1))

    def _shuffled(self, x: torch.Tensor, pd_stride: int | None) -> torch.Tensor:
        """The tail's output (mu, then a with v = a^2 with ``prior_variance``) at pixel-shuffle stride ``pd_stride``."""
        s = self.pd_stride if pd_stride is None else pd_stride
        if s < 1:
            raise ValueError(f"pd_stride must be >= 1, got {s}. Pass pd_stride=1 for no pixel-shuffle downsampling.")
        if s == 1:
            return self._blind(x)
        b, c, h, w = x.shape
        # Zero padding, not reflect: a padded copy of real pixel r sits on the lattice of outputs whose
        # blind square contains r (or r itself), so any data-dependent padding breaks exact blindness.
        x = F.pad(x, (0, (-w) % s, 0, (-h) % s))
        hs, ws = x.shape[-2] // s, x.shape[-1] // s
        sub = x.reshape(b, c, hs, s, ws, s).permute(3, 5, 0, 1, 2, 4).reshape(s * s * b, c, hs, ws)
        y = self._blind(sub)
        y = y.reshape(s, s, b, -1, hs, ws).permute(2, 3, 4, 0, 5, 1).reshape(b, -1, hs * s, ws * s)
        return y[..., :h, :w]

    def forward(self, x: torch.Tensor, pd_stride: int | None = None, variance: bool = False) -> torch.Tensor:
        """Denoise ``x`` of shape (B, C, H, W), any H and W; returns (B, out_channels, H, W), the prior mean.

        Args:
            x: noisy images.
            pd_stride: overrides the training stride, e.g. a smaller one at test time (AP-BSN).
            variance: return cat([mu, v], dim=1) instead (``prior``); through ``forward`` so that a
                ``DistributedDataParallel`` wrapper can train it.

        Raises:
            ValueError: ``pd_stride`` below 1, or ``variance`` without ``prior_variance``.
        """
        y = self._shuffled(x, pd_stride)
        if not self.prior_variance:
            if variance:
                raise ValueError("this BlindSpotNet predicts no prior variance; build it with `prior_variance=True`.")
            return y
        mu, a = y[:, : self.out_channels], y[:, self.out_channels :]
        if not variance:
            return mu
        # v = a^2 (Laine et al.'s 1-channel Cholesky factor), not exp(a): a linear a crosses 0 where the image
        # is flat, so v reaches ~0 there while it grows at edges. With exp(a) measured on a real slice, v
        # stalled at a floor on flat regions and the learned sigma drifted 10-30% low; with a^2 it held within 2%.
        # The 1e-12 keeps v > 0, so the posterior weight v / (v + s^2) is defined where s^2 = 0.
        return torch.cat([mu, a.square() + 1e-12], dim=1)

    def prior(self, x: torch.Tensor, pd_stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The blind prior N(mu, v) of each pixel: ``(mu, v)``, both (B, out_channels, H, W), v > 0.

        Raises:
            ValueError: the network was built without ``prior_variance``, or ``pd_stride`` below 1.
        """
        mu, v = self(x, pd_stride, variance=True).chunk(2, dim=1)
        return mu, v
