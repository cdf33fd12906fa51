"""Training loss of the built-in model: batch Dice + binary cross-entropy, with optional lesion-size
weights in the cross-entropy so that small lesions count, and an optional lesion-wise Dice term.

With ``small_lesion_weight`` W > 1, the voxels of each 26-connected ground-truth component of ``n``
voxels get the cross-entropy weight ``clip(ref_voxels / n, 1, W)``: a 2-voxel embolus weighs W times a
territorial infarct voxel; background keeps weight 1. W = 1 is MONAI's ``DiceCELoss`` (batch Dice,
mean BCE) exactly.

With ``lesion_dice_weight`` > 0, the mean over ground-truth components of ``1 - soft Dice`` of each
component against its own neighbourhood (the component and the background within ``radius`` voxels of
it; other components left out) is added, after the idea of blob loss (Kofler et al., 2023): every
lesion weighs the same whatever its size, so a missed 2-voxel embolus costs as much as a missed
infarct, and false positives next to a lesion lower its Dice. With ``lesion_fp_threshold``, every
predicted component touching no lesion (an ISLES'22 false positive) adds its mean probability to the
same mean, so a false lesion costs as much as a missed one, as in lesion-wise F1; otherwise far false
positives are left to the batch terms.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from models.postprocess import STRUCTURE_26


def component_labels(y: torch.Tensor) -> tuple[np.ndarray, list[int]]:
    """26-connected components of each sample of ``y`` (B, 1, D, H, W): labels (B, D, H, W) int32 and
    the number of components per sample."""
    lab_all = y.detach().cpu().numpy()[:, 0] > 0.5
    labels = np.zeros(lab_all.shape, dtype=np.int32)
    counts = []
    for b in range(lab_all.shape[0]):
        labels[b], n = ndimage.label(lab_all[b], structure=STRUCTURE_26)
        counts.append(int(n))
    return labels, counts


def lesion_size_weights(y: torch.Tensor, max_weight: float, ref_voxels: float = 64.0,
                        components=None) -> torch.Tensor:
    """Per-voxel weights (same shape as ``y``, (B, 1, D, H, W)): 1 on background, clip(ref / size, 1, max)
    on each ground-truth component."""
    labels, counts = components if components is not None else component_labels(y)
    w = np.ones(y.shape, dtype=np.float32)
    for b, n in enumerate(counts):
        if n == 0:
            continue
        sizes = np.bincount(labels[b].ravel()).astype(np.float32)
        per = np.clip(ref_voxels / np.maximum(sizes, 1.0), 1.0, max_weight)
        per[0] = 1.0
        w[b, 0] = per[labels[b]]
    return torch.from_numpy(w).to(y.device)


def lesion_dice_terms(prob: torch.Tensor, components, radius: int = 4, eps: float = 1e-4) -> torch.Tensor:
    """``1 - Dice_k`` for every ground-truth component k of the batch (1-D tensor, possibly empty), where
    Dice_k compares the probabilities ``prob`` (B, D, H, W) with component k on k plus the background
    voxels within ``radius`` voxels (chessboard distance) of k; a background voxel near two components
    belongs to the one with the higher label."""
    labels, counts = components
    terms = [prob.new_zeros(0)]
    for b, n in enumerate(counts):
        if n == 0:
            continue
        lab = torch.from_numpy(labels[b]).to(prob.device)
        owner = lab.float()[None, None]
        for _ in range(int(radius)):  # grow each component's territory by one voxel into unowned voxels
            owner = torch.where(owner > 0, owner, F.max_pool3d(owner, 3, 1, 1))
        owner = owner[0, 0].long().ravel()
        p = prob[b].ravel()
        fg = lab.ravel() > 0
        inter = torch.zeros(n + 1, device=p.device, dtype=p.dtype).index_add_(0, owner, p * fg)
        near_bg = torch.zeros(n + 1, device=p.device, dtype=p.dtype).index_add_(0, owner, p * ~fg)
        size = torch.bincount(lab.ravel(), minlength=n + 1).to(p.dtype)
        terms.append(1 - 2 * inter[1:] / (inter[1:] + near_bg[1:] + size[1:] + eps))
    return torch.cat(terms)


def false_positive_terms(prob: torch.Tensor, components, threshold: float = 0.5) -> torch.Tensor:
    """Mean probability of every predicted component (``prob > threshold``, 26-connected) that touches no
    ground-truth voxel (``components`` of ``component_labels``), the ISLES'22 false positive (1-D tensor,
    possibly empty)."""
    pred = (prob.detach() > threshold).cpu().numpy()
    gt = components[0] > 0
    terms = [prob.new_zeros(0)]
    for b in range(pred.shape[0]):
        lab, n = ndimage.label(pred[b], structure=STRUCTURE_26)
        if n == 0:
            continue
        fp = np.setdiff1d(np.arange(1, n + 1), np.unique(lab[gt[b]]))
        if fp.size == 0:
            continue
        lab_t = torch.from_numpy(lab.astype(np.int64)).to(prob.device).ravel()
        sums = torch.zeros(n + 1, device=prob.device, dtype=prob.dtype).index_add_(0, lab_t, prob[b].ravel())
        sizes = torch.bincount(lab_t, minlength=n + 1).to(prob.dtype)
        idx = torch.from_numpy(fp).to(prob.device)
        terms.append(sums[idx] / sizes[idx])
    return torch.cat(terms)


def lesion_wise_loss(logits: torch.Tensor, y: torch.Tensor, radius: int = 4, components=None,
                     fp_threshold: float | None = None) -> torch.Tensor:
    """Mean over the batch's ground-truth components of ``1 - Dice_k`` (``lesion_dice_terms``) and, with
    ``fp_threshold``, over its false-positive components of their mean probability
    (``false_positive_terms``): a missed lesion and a false one weigh the same, as in lesion-wise F1.
    Zero (with a graph) when there is neither."""
    components = components if components is not None else component_labels(y)
    prob = torch.sigmoid(logits.float())[:, 0]
    terms = [lesion_dice_terms(prob, components, radius)]
    if fp_threshold is not None:
        terms.append(false_positive_terms(prob, components, fp_threshold))
    terms = torch.cat(terms)
    return terms.mean() if terms.numel() else logits.sum() * 0.0


def shift_consistency(logits: torch.Tensor, overlaps) -> torch.Tensor:
    """Disagreement of paired crops on the voxels they share (``transforms.shifted_pair_crop``): for each
    pair, ``sum((p_a - p_b) ** 2) / (sum(max(p_a, p_b)) + 1)`` over the overlap, averaged over pairs. The
    denominator counts the voxels either window calls lesion, so a small lesion that one window finds and
    the other misses weighs about as much as a large one; background agreeing at ~0 adds nothing."""
    prob = torch.sigmoid(logits.float())[:, 0]
    terms = []
    for j, (sa, sb) in enumerate(overlaps):
        pa, pb = prob[2 * j][sa], prob[2 * j + 1][sb]
        terms.append(((pa - pb) ** 2).sum() / (torch.maximum(pa, pb).sum() + 1.0))
    return torch.stack(terms).mean() if terms else logits.sum() * 0.0


class LesionWeightedDiceCE:
    def __init__(self, small_lesion_weight: float = 1.0, ref_voxels: float = 64.0,
                 lesion_dice_weight: float = 0.0, lesion_dice_radius: int = 4, lesion_fp_threshold=None):
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-4, smooth_dr=1e-4)
        self.max_weight = float(small_lesion_weight)
        self.ref_voxels = float(ref_voxels)
        self.lesion_dice_weight = float(lesion_dice_weight)
        self.radius = int(lesion_dice_radius)
        self.fp_threshold = lesion_fp_threshold

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        comps = component_labels(y) if (self.max_weight > 1 or self.lesion_dice_weight > 0) else None
        weight = lesion_size_weights(y, self.max_weight, self.ref_voxels, comps) if self.max_weight > 1 else None
        loss = self.dice(logits, y) + F.binary_cross_entropy_with_logits(logits, y, weight=weight)
        if self.lesion_dice_weight > 0:
            loss = loss + self.lesion_dice_weight * lesion_wise_loss(logits, y, self.radius, comps,
                                                                          self.fp_threshold)
        return loss
