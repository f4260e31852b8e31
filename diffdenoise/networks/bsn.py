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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BlindSpotNet"]


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
    prediction is the clean signal, as long as the noise is independent across the blind square.

    Args:
        in_channels: channels of the noisy input.
        out_channels: channels of the prediction.
        features: width of the two branches (the tail narrows to ``features // 2``).
        num_blocks: residual dilated blocks per branch; receptive field grows by 2 (branch A) and 3
            (branch B) sub-image pixels per block and side.
        pd_stride: pixel-shuffle stride s used by default (training); blind square (2s - 1)^2.

    Raises:
        ValueError: a size or stride that is not a positive integer (``features`` must be >= 2).

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
        self, in_channels: int = 1, out_channels: int = 1, features: int = 48, num_blocks: int = 5, pd_stride: int = 1
    ):
        super().__init__()
        _check_int("in_channels", in_channels, 1, "Set `in_channels` to the image channels, e.g. 1.")
        _check_int("out_channels", out_channels, 1, "Set `out_channels` to the image channels, e.g. 1.")
        _check_int("features", features, 2, "Set `features` to e.g. 48 (AP-BSN uses 128).")
        _check_int("num_blocks", num_blocks, 0, "Set `num_blocks` to e.g. 5 (AP-BSN uses 9).")
        _check_int("pd_stride", pd_stride, 1, "Set `pd_stride` to 1 (no PD), 2, 3 or 5 (blind squares 1, 3, 5, 9).")
        self.pd_stride = pd_stride
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
            nn.Conv2d(half, out_channels, 1),
        )

    @property
    def blind_spot(self) -> int:
        """Side of the blind square at the training stride, ``2 * pd_stride - 1``."""
        return 2 * self.pd_stride - 1

    def _blind(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.tail(torch.cat([self.branch_a(h), self.branch_b(h)], dim=1))

    def forward(self, x: torch.Tensor, pd_stride: int | None = None) -> torch.Tensor:
        """Denoise ``x`` of shape (B, C, H, W), any H and W; returns (B, out_channels, H, W).

        Args:
            x: noisy images.
            pd_stride: overrides the training stride, e.g. a smaller one at test time (AP-BSN).

        Raises:
            ValueError: ``pd_stride`` below 1.
        """
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
