"""Network of the built-in lesion segmentation model (a compact MONAI residual U-Net)."""

from __future__ import annotations

import copy

import torch

# All hyper-parameters of the architecture, saved in the weights' JSON sidecar and in checkpoints.
DEFAULT_HPARAMS = {
    "arch": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 2,  # [dwi_n, adc_n] from transforms.normalize_channels
    "out_channels": 1,  # one logit, sigmoid -> lesion probability
    "channels": [16, 32, 64, 128],
    "strides": [2, 2, 2],
    "num_res_units": 2,
    "norm": "instance",
    "act": "prelu",
    "dropout": 0.0,
    "voxel_mm": 2.0,  # model grid: RAS, 2 mm isotropic
    "divisible_by": 8,  # input sizes must be multiples of this (3 stride-2 levels)
}
# "ensemble": n > 1 in the hyper-parameters (sidecar of ``ensemble.py``'s output) builds n such networks
# whose logits are averaged (``LogitMean``); their weights sit under ``members.<i>.`` in one file.


class LogitMean(torch.nn.Module):
    """Mean of the logits of several networks that take the same input (a deep ensemble in one module)."""

    def __init__(self, members):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x):
        out = self.members[0](x)
        for member in self.members[1:]:
            out = out + member(x)
        return out / len(self.members)


def build_network(hparams: dict | None = None):
    """Build the network from a hyper-parameter dict (defaults: ``DEFAULT_HPARAMS``, ~1.19 M parameters);
    with ``"ensemble": n`` (n > 1), a ``LogitMean`` of n such networks."""
    hp = copy.deepcopy(DEFAULT_HPARAMS)
    if hparams:
        hp.update(hparams)
    n = int(hp.pop("ensemble", 1))
    if n < 1:
        raise ValueError(f"ensemble size must be >= 1, not {n}")
    if n > 1:
        return LogitMean([build_network(hp) for _ in range(n)])
    if hp["arch"] != "monai.networks.nets.UNet":
        raise ValueError(f"unsupported architecture {hp['arch']!r}")
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=hp["spatial_dims"],
        in_channels=hp["in_channels"],
        out_channels=hp["out_channels"],
        channels=tuple(hp["channels"]),
        strides=tuple(hp["strides"]),
        num_res_units=hp["num_res_units"],
        norm=hp["norm"],
        act=hp["act"],
        dropout=hp["dropout"],
    )


def count_parameters(net) -> int:
    return int(sum(p.numel() for p in net.parameters()))
