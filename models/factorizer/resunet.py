"""Res-U-Net of the FACTORIZER member (``factorizer.UNet`` with ``BasicBlock``), rewritten for loading.

The module tree reproduces the parameter names of the official checkpoints exactly (without the
Lightning ``net.`` prefix), see ``/work/shared/docs/official-weights-formats.md`` (FACTORIZER):

- ``stem``: 3^3 conv, padding 1, no bias (in -> W0);
- ``encoder.blocks.{i}.blocks``: level 0 = ``[block]``; level i > 0 = ``[2^3 conv stride 2 no bias, block]``;
- ``decoder.blocks.{j}``: ``upsample`` (ConvTranspose 2^3 stride 2, bias) then ``blocks = [block]``
  on ``cat([skip, upsampled])`` (skip first), 2W -> W;
- ``heads.{k}``: 1^3 conv with bias on the decoder output of level k (k = 0 is full resolution).

``forward`` returns the list of head outputs ``[level 0, level 1, level 2]`` (deep supervision order);
inference uses head 0 only.

:class:`UNetSkeleton` is shared with the Swin-Factorizer, which only changes the block type.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

#: the official configuration (``configs/config_isles22_fold*_resunet.yaml``)
OFFICIAL_WIDTHS = (32, 64, 128, 256, 512)
IN_CHANNELS = 3
OUT_CHANNELS = 1
NUM_HEADS = 3

#: ``block_factory(level_index, in_channels, out_channels) -> nn.Module``; level_index counts the
#: encoder levels 0..L-1 then the decoder levels L..2L-2 (the order of the official ``_get_blocks``)
BlockFactory = Callable[[int, int, int], nn.Module]


class BasicBlock(nn.Module):
    """ResNet basic block: conv-GN-LReLU-conv-GN (+ shortcut) - LReLU.

    conv 3^3 with bias, GroupNorm(8), LeakyReLU(0.01); the shortcut is the identity unless the
    channel count changes (decoder), then a 1^3 conv without bias. (The official block also holds
    two ``Dropout(p=0)`` layers, which are identities and hold no state; they are left out.)
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 8):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.act = nn.LeakyReLU(0.01)
        if in_channels != out_channels:
            self.shortcut = nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + shortcut)


class EncoderLevel(nn.Module):
    """One encoder level: ``blocks = [block]`` (stride 1) or ``[downsample conv, block]``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, block: Callable[[int, int], nn.Module]):
        super().__init__()
        if stride == 1:
            layers = [block(in_channels, out_channels)]
        else:
            layers = [nn.Conv3d(in_channels, out_channels, kernel_size=stride, stride=stride, bias=False),
                      block(out_channels, out_channels)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, x):
        return self.blocks(x)


class DecoderLevel(nn.Module):
    """One decoder level: transposed-conv upsampling, concatenation ``[skip, up]``, block 2W -> W."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, block: Callable[[int, int], nn.Module]):
        super().__init__()
        self.upsample = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=stride, stride=stride)
        self.blocks = nn.Sequential(block(2 * out_channels, out_channels))

    def forward(self, x, skip):
        return self.blocks(torch.cat([skip, self.upsample(x)], dim=1))


class Encoder(nn.Module):
    def __init__(self, in_channels, widths, strides, block_factory: BlockFactory):
        super().__init__()
        levels, prev = [], in_channels
        for i, (w, s) in enumerate(zip(widths, strides)):
            levels.append(EncoderLevel(prev, w, s, lambda a, b, i=i: block_factory(i, a, b)))
            prev = w
        self.blocks = nn.ModuleList(levels)

    def forward(self, x):
        out = []
        for level in self.blocks:
            x = level(x)
            out.append(x)
        return out


class Decoder(nn.Module):
    def __init__(self, widths, strides, block_factory: BlockFactory):
        super().__init__()
        n = len(widths)
        levels = []
        for j in range(n - 1):
            w_in, w_out = widths[n - 1 - j], widths[n - 2 - j]
            levels.append(DecoderLevel(w_in, w_out, strides[n - 1 - j],
                                       lambda a, b, j=j: block_factory(n + j, a, b)))
        self.blocks = nn.ModuleList(levels)

    def forward(self, feats):
        feats = list(feats)
        for j, level in enumerate(self.blocks):
            feats[-2 - j] = level(feats[-1 - j], feats[-2 - j])
        return feats


class UNetSkeleton(nn.Module):
    """stem -> encoder -> decoder -> heads, with the block type given by ``block_factory``."""

    def __init__(self, block_factory: BlockFactory, widths: Sequence[int] = OFFICIAL_WIDTHS,
                 strides: Sequence[int] = (1, 2, 2, 2, 2), in_channels: int = IN_CHANNELS,
                 out_channels: int = OUT_CHANNELS, num_heads: int = NUM_HEADS):
        super().__init__()
        widths, strides = tuple(int(w) for w in widths), tuple(int(s) for s in strides)
        if len(widths) != len(strides) or strides[0] != 1:
            raise ValueError(f"widths {widths} / strides {strides}: same length, first stride 1")
        self.widths = widths
        self.stem = nn.Conv3d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.encoder = Encoder(widths[0], widths, strides, block_factory)
        self.decoder = Decoder(widths, strides, block_factory)
        self.heads = nn.ModuleList(nn.Conv3d(widths[k], out_channels, kernel_size=1, bias=True)
                                   for k in range(num_heads))

    def forward(self, x):
        feats = self.decoder(self.encoder(self.stem(x)))
        return [head(feats[k]) for k, head in enumerate(self.heads)]


class ResUNet(UNetSkeleton):
    """The FACTORIZER Res-U-Net (official: 95 tensors, 28,877,667 parameters)."""

    def __init__(self, widths: Sequence[int] = OFFICIAL_WIDTHS, in_channels: int = IN_CHANNELS,
                 out_channels: int = OUT_CHANNELS):
        super().__init__(lambda level, a, b: BasicBlock(a, b), widths, (1,) + (2,) * (len(widths) - 1),
                         in_channels, out_channels)
