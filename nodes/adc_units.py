"""Step 'adc_units': bring the ADC to 1e-3 mm2/s, decided from the brain median.

Candidates are the three units met in practice: mm2/s (brain median ~0.0008, x1000), 1e-3 mm2/s
(~0.8, x1) and 1e-6 mm2/s (~800, x0.001). The scale that brings the median closest to 0.8 in log
space wins; a result outside [0.3, 2.5] is refused. Scaling is done in float64 (multiply or divide
by exactly 1000) and rounded to float32 once, so the same ADC stored in any of the three units gives
the same float32 array (bitwise when the stored values are exact decimal rescalings).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nipype.interfaces.base import File, traits

from bids_app.errors import InputError
from nodes.base import (
    DecisionInputSpec,
    DecisionInterface,
    DecisionOutputSpec,
    load_nifti,
    new_image,
    save_nifti_atomic,
)

TARGET_MEDIAN = 0.8  # typical brain ADC in 1e-3 mm2/s
VALID_RANGE = (0.3, 2.5)
# (name, factor as a power of ten): value_in_1e-3 = value * 10**power
UNITS = (("mm2/s", 3), ("1e-3 mm2/s", 0), ("1e-6 mm2/s", -3))


def central_region(positive: np.ndarray) -> np.ndarray:
    """The middle half (per axis) of the bounding box of ``positive``: a robust brain proxy."""
    out = np.zeros_like(positive, dtype=bool)
    idx = np.nonzero(positive)
    if not idx[0].size:
        return out
    sl = []
    for ax in range(positive.ndim):
        lo, hi = int(idx[ax].min()), int(idx[ax].max()) + 1
        q = (hi - lo) / 4.0
        sl.append(slice(int(np.floor(lo + q)), max(int(np.ceil(hi - q)), int(np.floor(lo + q)) + 1)))
    out[tuple(sl)] = True
    return out & positive


def brain_median(adc: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Median of the positive ADC inside ``mask`` (or a central region of the positive voxels)."""
    positive = adc > 0
    region = positive & (mask > 0) if mask is not None else central_region(positive)
    if not region.any():
        region = positive
    if not region.any():
        return float("nan")
    return float(np.median(adc[region].astype(np.float64)))


def apply_power(adc: np.ndarray, power: int) -> np.ndarray:
    """``adc * 10**power`` in float64 with an exact multiplier or divisor."""
    a = np.asarray(adc, dtype=np.float64)
    if power > 0:
        return a * float(10**power)
    if power < 0:
        return a / float(10 ** (-power))
    return a.copy()


def harmonise_adc(adc: np.ndarray, mask: np.ndarray | None = None, path="ADC") -> tuple[np.ndarray, dict]:
    """Return (ADC in 1e-3 mm2/s as float32, info). Raises InputError when units are undecidable."""
    adc = np.asarray(adc)
    bad = int(np.count_nonzero(~np.isfinite(adc)))
    if bad:
        raise InputError(path, f"{bad} voxels are NaN or infinite")
    med = brain_median(adc, mask)
    if not np.isfinite(med) or med <= 0:
        raise InputError(path, "cannot determine ADC units: no positive ADC values in the brain")
    name, power = min(UNITS, key=lambda u: abs(np.log10(med) + u[1] - np.log10(TARGET_MEDIAN)))
    med_after = med * 10.0**power
    if not VALID_RANGE[0] <= med_after <= VALID_RANGE[1]:
        raise InputError(
            path,
            f"cannot determine ADC units: brain median {med:.4g} (would be {med_after:.3g} x 1e-3 mm2/s "
            f"as {name}; expected {VALID_RANGE[0]}-{VALID_RANGE[1]})",
        )
    out = apply_power(adc, power)
    n_neg = int(np.count_nonzero(out < 0))
    out = np.maximum(out, 0.0).astype(np.float32)
    info = {
        "detected_unit": name,
        "scale": float(10.0**power),
        "median_before": med,
        "median_after": float(med_after),
        "negative_voxels": n_neg,
    }
    return out, info


class HarmoniseADCUnitsInputSpec(DecisionInputSpec):
    adc_file = File(exists=True, mandatory=True, desc="ADC map in mm2/s, 1e-3 mm2/s or 1e-6 mm2/s")
    mask_file = File(exists=True, desc="brain mask on the ADC grid (optional)")


class HarmoniseADCUnitsOutputSpec(DecisionOutputSpec):
    adc_file = File(desc="ADC in 1e-3 mm2/s, float32, negatives clipped to 0")
    detected_unit = traits.Str(desc="unit of the input ADC")
    scale = traits.Float(desc="factor applied")


class HarmoniseADCUnits(DecisionInterface):
    """Detect the ADC unit from the brain median and rescale to 1e-3 mm2/s."""

    input_spec = HarmoniseADCUnitsInputSpec
    output_spec = HarmoniseADCUnitsOutputSpec
    step = "adc_units"
    title = "ADC units"

    def _run_step(self, runtime):
        path = self.inputs.adc_file
        img, adc = load_nifti(path, dtype=np.float64)
        mask = None
        if self.inputs.mask_file and self.inputs.mask_file is not traits.Undefined:
            mimg, mask = load_nifti(self.inputs.mask_file)
            if mask.shape != adc.shape:
                raise InputError(self.inputs.mask_file, f"mask shape {mask.shape} differs from ADC {adc.shape}")
        out, info = harmonise_adc(adc, mask, path)
        for key in ("detected_unit", "scale", "median_before", "negative_voxels"):
            self.record(key, info[key])
        region = "the brain mask" if mask is not None else "a central region of the positive voxels"
        action = "kept as is" if info["scale"] == 1 else f"multiplied by {info['scale']:g}"
        self.decide(
            f"ADC brain median {info['median_before']:.4g} in {region}: unit {info['detected_unit']}, {action} "
            f"(median {info['median_after']:.3f} x 1e-3 mm2/s)"
        )
        if info["negative_voxels"]:
            self.decide(f"{info['negative_voxels']} negative ADC voxels clipped to 0", "warning")
        dst = Path(runtime.cwd) / "adc_1e-3.nii.gz"
        save_nifti_atomic(new_image(out, img, np.float32), dst)
        self._results.update(adc_file=str(dst), detected_unit=info["detected_unit"], scale=info["scale"])
        return runtime
