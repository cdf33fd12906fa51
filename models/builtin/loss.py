"""Training loss of the built-in model: batch Dice + binary cross-entropy, with optional lesion-size
weights in the cross-entropy so that small lesions count.

With ``small_lesion_weight`` W > 1, the voxels of each 26-connected ground-truth component of ``n``
voxels get the cross-entropy weight ``clip(ref_voxels / n, 1, W)``: a 2-voxel embolus weighs W times a
territorial infarct voxel; background keeps weight 1. W = 1 is MONAI's ``DiceCELoss`` (batch Dice,
mean BCE) exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from models.postprocess import STRUCTURE_26


def lesion_size_weights(y: torch.Tensor, max_weight: float, ref_voxels: float = 64.0) -> torch.Tensor:
    """Per-voxel weights (same shape as ``y``, (B, 1, D, H, W)): 1 on background, clip(ref / size, 1, max)
    on each ground-truth component."""
    w = np.ones(y.shape, dtype=np.float32)
    lab_all = y.detach().cpu().numpy() > 0.5
    for b in range(y.shape[0]):
        lab, n = ndimage.label(lab_all[b, 0], structure=STRUCTURE_26)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel()).astype(np.float32)
        per = np.clip(ref_voxels / np.maximum(sizes, 1.0), 1.0, max_weight)
        per[0] = 1.0
        w[b, 0] = per[lab]
    return torch.from_numpy(w).to(y.device)


class LesionWeightedDiceCE:
    def __init__(self, small_lesion_weight: float = 1.0, ref_voxels: float = 64.0):
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-4, smooth_dr=1e-4)
        self.max_weight = float(small_lesion_weight)
        self.ref_voxels = float(ref_voxels)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weight = lesion_size_weights(y, self.max_weight, self.ref_voxels) if self.max_weight > 1 else None
        return self.dice(logits, y) + F.binary_cross_entropy_with_logits(logits, y, weight=weight)
