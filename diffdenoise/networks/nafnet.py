"""NAFNet: a nonlinear-activation-free U-Net, the fast student of stage 4.

Paper: Chen et al., "Simple Baselines for Image Restoration" (ECCV 2022). Why this network for the
student: it has no ReLU/GELU at all (the only nonlinearity is SimpleGate, a product of two channel
halves), runs in one forward pass at any image size, is deterministic, and scripts to TorchScript, so
the bundle's ``models/model.ts`` is what MONAI Deploy loads.

Layout: a 3x3 intro conv to ``width`` channels; per encoder level NAF blocks, then a 2x2 stride-2 conv
that halves H and W and doubles the channels; middle blocks; per decoder level a 1x1 conv + pixel
shuffle that undoes one downsampling, the encoder's skip added, NAF blocks; a 3x3 conv back to the
image channels, added to the input (the net predicts the residual, the noise with a minus sign).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NAFNet", "NAFBlock", "LayerNorm2d"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) tensor, with a per-channel affine.

    ``nn.LayerNorm`` normalises the last dims; here the statistics are per pixel across C, so the norm
    works on any H, W without a permute.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        return self.weight * (x - mean) / torch.sqrt(var + self.eps) + self.bias


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them: the block's only nonlinearity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """Two residual branches, each scaled by a learned per-channel factor that starts at 0.

    Spatial branch: LayerNorm2d, 1x1 conv to 2c, 3x3 depthwise conv, SimpleGate, simplified channel
    attention (x * conv1x1(mean over H, W)), 1x1 conv; added with factor ``beta``. Channel branch:
    LayerNorm2d, 1x1 conv to 2c, SimpleGate, 1x1 conv; added with factor ``gamma``. Zero factors make
    a fresh block the identity, so deep stacks start as a plain U-Net and train stably.
    """

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.norm1 = LayerNorm2d(c)
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.depthwise = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.gate = SimpleGate()
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1))
        self.project = nn.Conv2d(c, c, 1)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.norm2 = LayerNorm2d(c)
        self.ffn_expand = nn.Conv2d(c, 2 * c, 1)
        self.ffn_project = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gate(self.depthwise(self.expand(self.norm1(x))))
        y = self.project(y * self.attention(y))
        x = x + self.beta * y
        y = self.ffn_project(self.gate(self.ffn_expand(self.norm2(x))))
        return x + self.gamma * y


def _blocks(channels: int, count: int) -> nn.Sequential:
    return nn.Sequential(*[NAFBlock(channels) for _ in range(count)])


def _check_count(name: str, value, low: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}. {fix}")


class NAFNet(nn.Module):
    """U-shaped NAFNet denoiser for 2D images of any size; output = input + predicted residual.

    H and W are padded (replicating the border) up to a multiple of ``2 ** len(enc_blocks)`` and the
    output is cropped back, so odd sizes and sizes smaller than the padding multiple work.

    Args:
        channels: image channels of the input and of the output (equal, because of the global residual).
        width: channels after the intro conv; level i of the encoder has ``width * 2**i``, the middle
            ``width * 2**levels``.
        enc_blocks: NAF blocks per encoder level; its length is the number of levels (downsamplings).
        middle_blocks: NAF blocks at the lowest resolution.
        dec_blocks: NAF blocks per decoder level, from the lowest resolution up; same length as
            ``enc_blocks``.

    Raises:
        ValueError: a non-integer or out-of-range size, or encoder and decoder of different depths.

    Example::

        import torch
        from diffdenoise.networks import NAFNet

        net = NAFNet(width=32, enc_blocks=(1, 1, 1, 1), middle_blocks=1, dec_blocks=(1, 1, 1, 1))
        noisy = torch.rand(2, 1, 181, 217)                 # any H, W
        denoised = net(noisy)
        assert denoised.shape == noisy.shape
        scripted = torch.jit.script(net.eval())            # what ckpt_export writes to models/model.ts
    """

    def __init__(
        self,
        channels: int = 1,
        width: int = 32,
        enc_blocks: Sequence[int] = (1, 1, 1, 1),
        middle_blocks: int = 1,
        dec_blocks: Sequence[int] = (1, 1, 1, 1),
    ):
        super().__init__()
        _check_count("channels", channels, 1, "Set `channels` to the image channels, e.g. 1.")
        _check_count("width", width, 1, "Set `width` to e.g. 16 or 32 (NAFNet's width-32 model).")
        _check_count("middle_blocks", middle_blocks, 0, "Set `middle_blocks` to e.g. 1.")
        enc_blocks, dec_blocks = self._as_counts("enc_blocks", enc_blocks), self._as_counts("dec_blocks", dec_blocks)
        if len(enc_blocks) != len(dec_blocks):
            raise ValueError(
                f"enc_blocks {list(enc_blocks)} and dec_blocks {list(dec_blocks)} must have the same length "
                "(one entry per resolution level). Give both e.g. [1, 1, 1, 1]."
            )
        self.levels = len(enc_blocks)
        self.multiple = 2**self.levels  # an int here; TorchScript computes int ** int as float
        self.intro = nn.Conv2d(channels, width, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        c = width
        for count in enc_blocks:
            self.encoders.append(_blocks(c, count))
            self.downs.append(nn.Conv2d(c, 2 * c, 2, stride=2))
            c *= 2
        self.middle = _blocks(c, middle_blocks)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for count in dec_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.PixelShuffle(2)))
            c //= 2
            self.decoders.append(_blocks(c, count))
        self.ending = nn.Conv2d(width, channels, 3, padding=1)

    @staticmethod
    def _as_counts(name: str, counts) -> tuple:
        fix = f"Set `{name}` to a list of block counts per level, e.g. [1, 1, 1, 1]."
        if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence):
            raise ValueError(f"{name} must be a list of integers >= 0, got {counts!r}. {fix}")
        for count in counts:
            _check_count(f"every entry of {name}", count, 0, fix)
        return tuple(counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        padded = F.pad(x, [0, (-w) % self.multiple, 0, (-h) % self.multiple], mode="replicate")
        y = self.intro(padded)
        skips: List[torch.Tensor] = []
        for encoder, down in zip(self.encoders, self.downs):
            y = encoder(y)
            skips.append(y)
            y = down(y)
        y = self.middle(y)
        for i, (up, decoder) in enumerate(zip(self.ups, self.decoders)):
            y = decoder(up(y) + skips[self.levels - 1 - i])
        y = self.ending(y) + padded
        return y[..., :h, :w]
