"""Contrast check of predicted lesion components (diffusion restriction, radiological definition).

An acute ischaemic lesion is brighter than the tissue around it on the b~1000 trace and darker on the
ADC. ``contrast_filter`` keeps a 26-connected component of the mask only when, against a shell of
brain tissue ``shell`` voxels around it (other predicted voxels excluded, medians):

- trace (``q``-th percentile of the component, default 75) / shell trace >= ``min_dwi_ratio``
  (default 1.25, the faintest lesion the built-in model's generator makes: DWI x1.25), and
- ADC (``100 - q``-th percentile) / shell ADC <= ``max_adc_ratio`` (default 0.95; generated lesions
  have rADC <= 0.9 before partial volume).

Ratios are unit-free (ADC in any unit, trace at any scale); the app's normalised channels (clipped,
zero outside the brain) give nearly the same ratios and are used when the raw pair is absent. Components without a
usable shell (e.g. the whole brain) are kept. Voxels of ``exclude`` (e.g. an existing lesion mask) are
left out of the shells too. Returns ``(mask, rows)`` with one row per component: ``size``, ``dwi_ratio``,
``adc_ratio``, ``kept``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.postprocess import STRUCTURE_26

MIN_DWI_RATIO = 1.25
MAX_ADC_RATIO = 0.95


def shell_medians(comp, mask, brain, dwi, adc, shell: int = 2) -> tuple[float, float]:
    """Median trace and ADC of the brain voxels within ``shell`` voxels (26-connected) of ``comp`` and
    outside ``mask`` (all arrays on one box that holds the shell); ``(0, 0)`` when there are none."""
    ring = ndimage.binary_dilation(comp, STRUCTURE_26, iterations=shell) & ~mask & brain
    if not ring.any():
        return 0.0, 0.0
    return float(np.median(dwi[ring])), float(np.median(adc[ring]))


def contrast_filter(mask, dwi, adc, brain, min_dwi_ratio: float = MIN_DWI_RATIO,
                    max_adc_ratio: float = MAX_ADC_RATIO, shell: int = 2, q: float = 75.0, exclude=None):
    mask = np.asarray(mask) > 0
    not_tissue = mask if exclude is None else mask | (np.asarray(exclude) > 0)
    dwi = np.asarray(dwi, dtype=np.float64)
    adc = np.asarray(adc, dtype=np.float64)
    brain = np.asarray(brain) > 0
    lab, _ = ndimage.label(mask, structure=STRUCTURE_26)
    out = mask.copy()
    rows = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        box = tuple(slice(max(0, s.start - shell), s.stop + shell) for s in sl)
        comp = lab[box] == i
        row = {"size": int(comp.sum()), "dwi_ratio": None, "adc_ratio": None, "kept": True}
        d, a = dwi[box], adc[box]
        d_ref, a_ref = shell_medians(comp, not_tissue[box], brain[box], d, a, shell)
        if d_ref > 0 and a_ref > 0:
            row["dwi_ratio"] = float(np.percentile(d[comp], q) / d_ref)
            row["adc_ratio"] = float(np.percentile(a[comp], 100.0 - q) / a_ref)
            row["kept"] = row["dwi_ratio"] >= min_dwi_ratio and row["adc_ratio"] <= max_adc_ratio
            if not row["kept"]:
                out[box][comp] = False
        rows.append(row)
    return out.astype(np.uint8), rows
