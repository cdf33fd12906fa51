"""Small lesion metrics used by the built-in model's training report and tests (not the official evaluation)."""

from __future__ import annotations

import numpy as np

_S26 = np.ones((3, 3, 3), dtype=bool)


def label26(mask: np.ndarray):
    """Connected components with 26-connectivity -> (labels int32, n). scipy if present, else a torch
    max-pool label propagation (for machines without scipy, e.g. the training GPU box)."""
    mask = np.asarray(mask) > 0
    try:
        from scipy import ndimage

        lab, n = ndimage.label(mask, structure=_S26)
        return lab.astype(np.int32), int(n)
    except ImportError:
        import torch
        import torch.nn.functional as F

        m = torch.from_numpy(mask)[None, None]
        ids = torch.arange(1, mask.size + 1, dtype=torch.float64).view(m.shape) * m
        while True:
            new = F.max_pool3d(ids, 3, 1, 1) * m
            if torch.equal(new, ids):
                break
            ids = new
        u, inv = torch.unique(ids[0, 0], return_inverse=True)
        lab = inv.numpy().astype(np.int32)
        if u[0] != 0:
            lab = lab + 1
        return lab, int((u > 0).sum())


def lesion_metrics(pred: np.ndarray, gt: np.ndarray, voxel_ml: float) -> dict:
    """Dice, lesion-wise F1 (26-connectivity; a GT component is TP if >= 1 predicted voxel overlaps it,
    a predicted component touching no GT is FP; F1 = TP / (TP + (FP + FN) / 2)), absolute volume
    difference (ml) and absolute lesion-count difference."""
    pred = np.asarray(pred) > 0
    gt = np.asarray(gt) > 0
    inter = np.logical_and(pred, gt).sum()
    denom = pred.sum() + gt.sum()
    dice = 2.0 * inter / denom if denom else 1.0
    gl, ng = label26(gt)
    pl, npred = label26(pred)
    tp = len(np.unique(gl[pred & (gl > 0)]))
    fn = ng - tp
    fp = npred - len(np.unique(pl[gt & (pl > 0)]))
    f1 = tp / (tp + 0.5 * (fp + fn)) if (tp + fp + fn) else 1.0
    return {
        "dice": float(dice),
        "lesion_f1": float(f1),
        "tp": int(tp), "fp": int(fp), "fn": int(fn),
        "avd_ml": float(abs(pred.sum() - gt.sum()) * voxel_ml),
        "ald": int(abs(npred - ng)),
        "pred_ml": float(pred.sum() * voxel_ml),
        "gt_ml": float(gt.sum() * voxel_ml),
        "n_pred": int(npred), "n_gt": int(ng),
    }


class Pooled:
    """Dice and lesion-wise F1 pooled over volumes: summed overlaps and summed TP / FP / FN."""

    def __init__(self):
        self.inter2 = self.total = 0.0
        self.tp = self.fp = self.fn = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
        m = lesion_metrics(pred, gt, 0.008)
        self.inter2 += 2.0 * float(np.logical_and(pred, gt).sum())
        self.total += float(pred.sum() + gt.sum())
        self.tp, self.fp, self.fn = self.tp + m["tp"], self.fp + m["fp"], self.fn + m["fn"]

    def result(self, digits=4) -> dict:
        """Pooled Dice (1 when both are empty), lesion F1, their mean ``score`` (``digits`` decimals; None:
        unrounded), TP / FP / FN."""
        dice = self.inter2 / self.total if self.total else 1.0
        errors = self.tp + 0.5 * (self.fp + self.fn)
        f1 = self.tp / errors if errors else 1.0
        r = (lambda v: v) if digits is None else (lambda v: round(v, digits))
        return {"dice": r(dice), "lesion_f1": r(f1), "score": r(0.5 * (dice + f1)),
                "tp": int(self.tp), "fp": int(self.fp), "fn": int(self.fn)}
