"""Torch helpers for the synthetic generator: separable Gaussian blur and smooth random fields."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _gauss_kernel(sigma: float, device):
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / max(sigma, 1e-3)) ** 2)
    return k / k.sum()


def blur(x: torch.Tensor, sigmas) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` (N, C, D, H, W) with per-axis sigma in voxels (0 = none)."""
    n, c = x.shape[:2]
    for ax, s in enumerate(sigmas):
        if s <= 0.05:
            continue
        k = _gauss_kernel(float(s), x.device)
        shape = [1, 1, 1, 1, 1]
        shape[2 + ax] = k.numel()
        w = k.view(shape).repeat(c, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - ax)] = pad[2 * (2 - ax) + 1] = k.numel() // 2
        x = F.conv3d(F.pad(x, pad, mode="replicate"), w, groups=c)
    return x


def smooth_noise(gen, shape, ctrl, channels=1, device="cpu"):
    """Smooth random field (1, C, *shape): Gaussian noise on a coarse ``ctrl`` grid, upsampled."""
    z = torch.randn((1, channels) + tuple(ctrl), generator=gen, device=device)
    return F.interpolate(z, size=tuple(shape), mode="trilinear", align_corners=True)
