"""nnU-Net v1 ``Generic_UNet`` (as configured by ``nnUNetTrainerV2``), rebuilt from a plan.

Written from the description in ``shared/docs/official-weights-formats.md`` so that the module tree
gives *exactly* the v1 ``state_dict`` keys and shapes:

- ``conv_blocks_context.{d}.blocks.{i}.{conv,instnorm}.*`` for the ``num_pool`` encoder stages
  (first conv of stage d > 0 strided by pooling kernel d-1),
- ``conv_blocks_context.{num_pool}.{0,1}.blocks.{i}.*`` for the bottleneck (strided by the last
  pooling kernel),
- ``tu.{u}.weight`` (ConvTranspose3d, no bias), ``conv_blocks_localization.{u}.{0,1}.blocks.{i}.*``
  (stage u uses conv kernel ``conv_kernel_sizes[-(u+1)]``, as in v1),
- ``seg_outputs.{u}.weight`` (1x1x1, no bias) for every deep-supervision level; only the last
  (full resolution) is used at inference.

Unit: Conv3d (bias) -> InstanceNorm3d (affine, eps 1e-5, no running stats) -> LeakyReLU(0.01).
Padding follows v1: 1 where the kernel is 3, else 0. Features double per stage, capped at 320.
"""

from __future__ import annotations

import torch
from torch import nn

from models.seals.plans import SealsPlan


class ConvNormNonlin(nn.Module):
    """conv -> instnorm -> lrelu, attribute names as in v1 ``ConvDropoutNormNonlin`` (dropout p=0)."""

    def __init__(self, cin: int, cout: int, kernel, stride=1):
        super().__init__()
        kernel = tuple(int(k) for k in kernel)
        stride = tuple(int(s) for s in stride) if isinstance(stride, (tuple, list)) else int(stride)
        padding = tuple(1 if k == 3 else 0 for k in kernel)
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, dilation=1, bias=True)
        self.instnorm = nn.InstanceNorm3d(cout, eps=1e-5, affine=True, track_running_stats=False)
        self.lrelu = nn.LeakyReLU(negative_slope=1e-2, inplace=True)

    def forward(self, x):
        return self.lrelu(self.instnorm(self.conv(x)))


class StackedConv(nn.Module):
    """``n`` units in ``self.blocks``; the first may be strided (v1 ``StackedConvLayers``)."""

    def __init__(self, cin: int, cout: int, n: int, kernel, first_stride=None):
        super().__init__()
        units = [ConvNormNonlin(cin, cout, kernel, first_stride if first_stride is not None else 1)]
        units += [ConvNormNonlin(cout, cout, kernel) for _ in range(n - 1)]
        self.blocks = nn.Sequential(*units)
        self.output_channels = cout

    def forward(self, x):
        return self.blocks(x)


def feature_sizes(plan: SealsPlan) -> list[int]:
    """Features of encoder stages 0..num_pool (the last is the bottleneck)."""
    feats, f = [], plan.base_num_features
    for _ in range(plan.num_pool + 1):
        feats.append(f)
        f = min(int(round(f * 2)), plan.max_num_features)
    return feats


class GenericUNet(nn.Module):
    """Generic_UNet with convolutional pooling/upsampling, inference returns full-res logits.

    ``forward`` returns the logits of the full-resolution head (softmax is applied by the caller);
    ``forward_all`` returns every head, lowest resolution first.
    """

    def __init__(self, plan: SealsPlan):
        super().__init__()
        self.plan = plan
        npool, cps = plan.num_pool, plan.conv_per_stage
        pools, kernels = plan.pool_op_kernel_sizes, plan.conv_kernel_sizes
        feats = feature_sizes(plan)

        context = []
        cin = plan.num_input_channels
        for d in range(npool):
            stride = pools[d - 1] if d > 0 else None
            context.append(StackedConv(cin, feats[d], cps, kernels[d], stride))
            cin = feats[d]
        fb = feats[npool]
        context.append(nn.Sequential(
            StackedConv(cin, fb, cps - 1, kernels[npool], pools[-1]),
            StackedConv(fb, fb, 1, kernels[npool]),
        ))
        self.conv_blocks_context = nn.ModuleList(context)

        tu, loc, heads = [], [], []
        down = fb
        for u in range(npool):
            skip = feats[npool - 1 - u]
            pool = pools[-(u + 1)]
            kernel = kernels[-(u + 1)]
            tu.append(nn.ConvTranspose3d(down, skip, pool, stride=pool, bias=False))
            loc.append(nn.Sequential(
                StackedConv(2 * skip, skip, cps - 1, kernel),
                StackedConv(skip, skip, 1, kernel),
            ))
            heads.append(nn.Conv3d(skip, plan.num_classes, 1, 1, 0, 1, 1, bias=False))
            down = skip
        self.tu = nn.ModuleList(tu)
        self.conv_blocks_localization = nn.ModuleList(loc)
        self.seg_outputs = nn.ModuleList(heads)

    def forward_all(self, x):
        skips = []
        for block in self.conv_blocks_context[:-1]:
            x = block(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        outs = []
        for u in range(len(self.tu)):
            x = self.tu[u](x)
            x = torch.cat((x, skips[-(u + 1)]), dim=1)
            x = self.conv_blocks_localization[u](x)
            outs.append(self.seg_outputs[u](x))
        return outs

    def forward(self, x):
        skips = []
        for block in self.conv_blocks_context[:-1]:
            x = block(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        for u in range(len(self.tu)):
            x = self.tu[u](x)
            x = torch.cat((x, skips.pop()), dim=1)  # = skips[-(u+1)]; freed once used
            x = self.conv_blocks_localization[u](x)
        return self.seg_outputs[-1](x)


def build_network(plan: SealsPlan) -> GenericUNet:
    return GenericUNet(plan)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def expected_tensor_count(plan: SealsPlan) -> int:
    """State-dict tensors of the plan's network (18 * num_pool + 8 with 2 convs per stage)."""
    cps = plan.conv_per_stage
    per_unit = 4  # conv w/b + instnorm w/b
    enc = plan.num_pool * cps * per_unit + cps * per_unit  # stages + bottleneck
    dec = plan.num_pool * (cps * per_unit + 2)  # localization units + tu + head
    return enc + dec
