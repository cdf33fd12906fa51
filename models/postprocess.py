"""Post-processing shared by every member and by the training-time evaluation.

``postprocess(prob, threshold, min_voxels)``: ``prob >= threshold``, then 26-connected components
smaller than ``min_voxels`` are removed. Returns ``(uint8 mask, number of components removed)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def postprocess(prob: np.ndarray, threshold: float = 0.5, min_voxels: int = 0) -> tuple[np.ndarray, int]:
    """``prob >= threshold`` without 26-connected components under ``min_voxels``."""
    mask = np.asarray(prob) >= threshold
    removed = 0
    if min_voxels > 1 and mask.any():
        labels, _ = ndimage.label(mask, structure=STRUCTURE_26)
        sizes = np.bincount(labels.ravel())
        small = np.flatnonzero(sizes < min_voxels)
        small = small[small > 0]
        removed = int(small.size)
        if removed:
            mask[np.isin(labels, small)] = False
    return mask.astype(np.uint8), removed
