"""Detection of faint lesions below the mask threshold, confirmed by their diffusion contrast.

The built-in model gives small real emboli probabilities under 0.5, so the 0.5 mask misses most of
them. ``detect_lesions`` adds to the mask every 26-connected component of

- brain voxels of lesion probability >= ``low`` (default 0.1)
- that holds no voxel of the mask already (those are for ``grow_lesions`` to extend), and
- that passes the contrast check (``models/contrast_filter.py``, same thresholds and tissue shell:
  brighter on the trace and darker on the ADC than the tissue around it; the shell excludes the mask
  and every candidate), and
- when ``mirror`` (``mirror_check.mirror_maps``' pair, or a function returning it, called only when
  there are candidates) is given, the mirror check
  (``models/mirror_check.py``: brighter than its partner across the midline by ``min_mirror_ratio``).

Components of the mask are never removed or changed. Ratios are unit-free (any ADC unit, any trace
scale) and every step is invariant to the storage order of the voxels. Returns ``(mask, rows)``, one
row per candidate component: ``size``, ``dwi_ratio``, ``adc_ratio``, ``mirror_ratio`` (with ``mirror``), ``kept``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.contrast_filter import MAX_ADC_RATIO, MIN_DWI_RATIO, contrast_filter
from models.mirror_check import DETECT_MIRROR_RATIO, mirror_filter
from models.postprocess import STRUCTURE_26

DETECT_LOW = 0.1


def detect_lesions(mask, prob, dwi, adc, brain, low: float = DETECT_LOW, min_dwi_ratio: float = MIN_DWI_RATIO,
                   max_adc_ratio: float = MAX_ADC_RATIO, shell: int = 2, mirror=None,
                   min_mirror_ratio: float = DETECT_MIRROR_RATIO):
    mask = np.asarray(mask) > 0
    brain = np.asarray(brain) > 0
    cand, _ = ndimage.label((np.asarray(prob) >= low) & brain & ~mask, structure=STRUCTURE_26)
    # candidates touching the mask (26-connected) belong to one of its components, not a new lesion
    touching = np.unique(cand[ndimage.binary_dilation(mask, STRUCTURE_26) & (cand > 0)])
    new = (cand > 0) & ~np.isin(cand, touching)
    if not new.any():
        return mask.astype(np.uint8), []
    kept, rows = contrast_filter(new, dwi, adc, brain, min_dwi_ratio, max_adc_ratio, shell, exclude=mask)
    if mirror is not None:  # both filters label ``new`` alike: rows in the same component order
        mirrored, mrows = mirror_filter(new, dwi, *(mirror() if callable(mirror) else mirror), min_mirror_ratio,
                                        lesions=mask | new)
        kept = (kept > 0) & (mirrored > 0)  # each keeps or drops whole components
        for row, mrow in zip(rows, mrows):
            row["mirror_ratio"] = mrow["mirror_ratio"]
            row["kept"] = bool(row["kept"] and mrow["kept"])
    return (mask | (kept > 0)).astype(np.uint8), rows
