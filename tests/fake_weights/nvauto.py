"""Fake official NVAUTO folder: ``NVAUTO/ts/model0..14.ts``, 15 tiny scripted Conv3d 2->2 models.

Each model has its own random weights (seed ``seed + i``) so that averaging 15 of them is visible.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

N_MODELS = 15


class TinyNet(nn.Module):
    """Conv3d 2->2 (kernel 3, zero padding): logits depend on both channels and on neighbours."""

    def __init__(self, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv3d(2, 2, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Channel0Net(nn.Module):
    """Logits (0, scale * x[:, 0]): the lesion probability is a function of input channel 0 only."""

    def __init__(self, scale: float = 4.0):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c0 = x[:, 0:1] * self.scale
        return torch.cat([torch.zeros_like(c0), c0], dim=1)


def tiny_models(n: int = N_MODELS, seed: int = 0, kernel: int = 3) -> list[nn.Module]:
    out = []
    for i in range(n):
        torch.manual_seed(seed + i)
        net = TinyNet(kernel).eval()
        with torch.no_grad():
            net.conv.weight.mul_(3.0)  # stronger logits: probabilities spread over (0, 1)
        out.append(net)
    return out


def make_fake_nvauto(weights_dir, models=None, seed: int = 0) -> dict[str, Path]:
    """Write the 15 scripted models under ``weights_dir/NVAUTO/ts``; return {relpath: path}."""
    models = tiny_models(seed=seed) if models is None else list(models)
    if len(models) != N_MODELS:
        raise ValueError(f"NVAUTO needs {N_MODELS} models, got {len(models)}")
    ts = Path(weights_dir) / "NVAUTO" / "ts"
    ts.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, net in enumerate(models):
        rel = f"NVAUTO/ts/model{i}.ts"
        path = Path(weights_dir) / rel
        torch.jit.save(torch.jit.script(net.eval()), str(path))
        out[rel] = path
    return out
