"""Step 'normalize': model-ready DWI and ADC with ``models.builtin.transforms.normalize_channels``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nipype.interfaces.base import File, traits

from bids_app.errors import InputError
from models.builtin.transforms import ADC_CLIP, DWI_CLIP, normalize_channels
from nodes.base import (
    DecisionInputSpec,
    DecisionInterface,
    DecisionOutputSpec,
    load_nifti,
    new_image,
    save_nifti_atomic,
)


def normalize(trace: np.ndarray, adc: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Return (dwi_n, adc_n, info); ``info['dwi_scale']`` is the brain median of the trace used."""
    brain = np.asarray(mask) > 0
    if not brain.any():
        raise ValueError("empty brain mask")
    inside = np.asarray(trace, dtype=np.float32)[brain & (trace > 0)]
    dwi_n, adc_n = normalize_channels(trace, adc, brain)
    scale = float(np.median(inside)) if inside.size else 1.0
    info = {
        "dwi_scale": scale,
        "dwi_clipped_fraction": float((dwi_n[brain] >= DWI_CLIP).mean()),
        "adc_clipped_fraction": float((adc_n[brain] >= ADC_CLIP).mean()),
        "adc_brain_median": float(np.median(adc_n[brain])),
    }
    return dwi_n, adc_n, info


class NormalizeIntensityInputSpec(DecisionInputSpec):
    trace_file = File(exists=True, mandatory=True, desc="trace DWI (skull-stripped or masked)")
    adc_file = File(exists=True, mandatory=True, desc="ADC in 1e-3 mm2/s on the DWI grid")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")


class NormalizeIntensityOutputSpec(DecisionOutputSpec):
    dwi_norm_file = File(desc="trace / brain median, clipped to [0, DWI_CLIP], zero outside the brain")
    adc_norm_file = File(desc="ADC clipped to [0, ADC_CLIP] (1e-3 mm2/s), zero outside the brain")
    dwi_scale = traits.Float(desc="brain median of the trace used as DWI scale")


class NormalizeIntensity(DecisionInterface):
    """Normalise DWI and ADC as the built-in model expects."""

    input_spec = NormalizeIntensityInputSpec
    output_spec = NormalizeIntensityOutputSpec
    step = "normalize"
    title = "Intensity normalisation"

    def _run_step(self, runtime):
        timg, trace = load_nifti(self.inputs.trace_file)
        _, adc = load_nifti(self.inputs.adc_file)
        _, mask = load_nifti(self.inputs.mask_file)
        for path, arr in ((self.inputs.adc_file, adc), (self.inputs.mask_file, mask)):
            if arr.shape != trace.shape:
                raise InputError(path, f"shape {arr.shape} differs from the trace {trace.shape}")
        if not (mask > 0).any():
            raise InputError(self.inputs.mask_file, "brain mask is empty")
        dwi_n, adc_n, info = normalize(trace, adc, mask)
        for key, value in info.items():
            self.record(key, round(value, 6))
        self.decide(f"DWI divided by its brain median {info['dwi_scale']:.4g} and clipped to [0, {DWI_CLIP:g}]; "
                    f"ADC kept in 1e-3 mm2/s, clipped to [0, {ADC_CLIP:g}]")
        if not 0.3 <= info["adc_brain_median"] <= 2.5:
            self.decide(f"ADC brain median {info['adc_brain_median']:.3g} is unusual for 1e-3 mm2/s", "warning")
        cwd = Path(runtime.cwd)
        dst_d, dst_a = cwd / "dwi_norm.nii.gz", cwd / "adc_norm.nii.gz"
        save_nifti_atomic(new_image(dwi_n, timg, np.float32), dst_d)
        save_nifti_atomic(new_image(adc_n, timg, np.float32), dst_a)
        self._results.update(dwi_norm_file=str(dst_d), adc_norm_file=str(dst_a), dwi_scale=info["dwi_scale"])
        return runtime
