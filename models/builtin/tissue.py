"""Tissue maps of the synthetic anatomy: sharpened tissue shares, the posterior fossa, the cortical ribbon."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cortical_ribbon(gm, wm, csf) -> torch.Tensor:
    """Voxel indices (N, 3) of the cortical ribbon: grey matter dominant, at least 40 % tissue, next to CSF
    (within one voxel). Embolic infarcts are often cortical; there the tissue share is partial."""
    near_csf = F.max_pool3d(csf[None, None], 3, 1, 1)[0, 0] > 0.3
    return torch.nonzero((gm > wm) & (gm + wm > 0.4) & near_csf)


def cortical_support(paren: torch.Tensor) -> torch.Tensor:
    """Where a cortical lesion may lie: full from 60 % tissue, none under 30 %. The signal model already
    weights the lesion by the tissue share, so the ribbon's partial-volume voxels keep their lesion."""
    return torch.clamp((paren - 0.3) / 0.3, 0, 1)


def sharpen_tissues(gm, wm, csf, gamma: float):
    """Individual-like tissue edges from the population template's soft probabilities: each voxel's
    tissue shares are raised to the power ``gamma`` and renormalised; the brain support is kept."""
    stack = torch.stack([gm, wm, csf])
    support = stack.sum(0)
    powered = torch.clamp(stack / torch.clamp(support, min=1e-6), 0, 1) ** gamma
    shares = powered / torch.clamp(powered.sum(0), min=1e-6)
    return tuple(shares * support)


def infratentorial(mni: torch.Tensor) -> torch.Tensor:
    """Soft posterior-fossa map (cerebellum + pons/medulla) from MNI mm coordinates (..., 3)."""
    x, y, z = mni[..., 0], mni[..., 1], mni[..., 2]
    cerebellum = torch.sigmoid((-18 - z) / 2.5) * torch.sigmoid((-42 - y) / 3)
    stem = torch.sigmoid((-12 - z) / 2.5) * torch.sigmoid((14 - x.abs()) / 2) * torch.sigmoid((-12 - y) / 3)
    return torch.maximum(cerebellum, stem)
