"""Hysteresis growth of kept lesion components into their weaker, contrast-confirmed surroundings.

The 0.5 mask of a model trained on synthetic data under-segments large real lesions (release 3 finds
about half of their voxels). ``grow_lesions`` lets each component of the final mask (after the
contrast check) take in the voxels that are

- 26-connected to it through voxels that qualify themselves (``ndimage.binary_propagation``),
- inside the brain, with lesion probability >= ``low`` (default 0.3, hysteresis), and
- brighter on the trace (>= ``min_dwi_ratio`` x) and darker on the ADC (<= ``max_adc_ratio`` x) than
  the median of the tissue shell around the component (``contrast_filter.shell_medians``), the
  radiological definition of diffusion restriction, voxel by voxel.

No component is created or removed, so the lesion count is unchanged; ratios are unit-free (any ADC
unit, any trace scale) and every step is invariant to the storage order of the voxels. Returns
``(mask, rows)``, one row per component: ``size`` before, ``added`` voxels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.contrast_filter import MAX_ADC_RATIO, MIN_DWI_RATIO, shell_medians
from models.postprocess import STRUCTURE_26

GROW_LOW = 0.3


def grow_lesions(mask, prob, dwi, adc, brain, low: float = GROW_LOW, min_dwi_ratio: float = MIN_DWI_RATIO,
                 max_adc_ratio: float = MAX_ADC_RATIO, shell: int = 2):
    mask = np.asarray(mask) > 0
    prob = np.asarray(prob)
    dwi = np.asarray(dwi, dtype=np.float64)
    adc = np.asarray(adc, dtype=np.float64)
    brain = np.asarray(brain) > 0
    # every voxel a component may reach lies in its 26-connected region of candidates: work in the
    # bounding box of that region (plus the shell)
    regions, _ = ndimage.label((prob >= low) & brain | mask, structure=STRUCTURE_26)
    region_boxes = ndimage.find_objects(regions)
    lab, _ = ndimage.label(mask, structure=STRUCTURE_26)
    out = mask.copy()
    rows = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        r = int(regions[sl][lab[sl] == i][0])
        box = tuple(slice(max(0, s.start - shell), s.stop + shell) for s in region_boxes[r - 1])
        comp = lab[box] == i
        d, a = dwi[box], adc[box]
        d_ref, a_ref = shell_medians(comp, mask[box], brain[box], d, a, shell)
        row = {"size": int(comp.sum()), "added": 0}
        if d_ref > 0 and a_ref > 0:
            ok = brain[box] & (prob[box] >= low) & (d >= min_dwi_ratio * d_ref) & (a <= max_adc_ratio * a_ref)
            grown = ndimage.binary_propagation(comp, STRUCTURE_26, mask=ok | comp)
            row["added"] = int((grown & ~out[box]).sum())
            out[box] |= grown
        rows.append(row)
    return out.astype(np.uint8), rows
