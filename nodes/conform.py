"""Step 'conform': put the ADC on the DWI grid.

Equal grids (same shape, affines equal within 1e-3 mm) pass through, written with the DWI header.
Otherwise the ADC is resampled in world space (trilinear, zero outside its field of view) with a
warning. Fields of view that do not overlap, or that cover < 10 % of the DWI foreground, are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import File, isdefined, traits
from scipy import ndimage as ndi

from bids_app.errors import InputError
from nodes.base import (
    DecisionInputSpec,
    DecisionInterface,
    DecisionOutputSpec,
    load_nifti,
    new_image,
    save_nifti_atomic,
)

AFFINE_ATOL_MM = 1e-3
MIN_COVERAGE = 0.10


def grids_match(shape_a, aff_a, shape_b, aff_b, atol: float = AFFINE_ATOL_MM) -> bool:
    """Same 3-D shape and affines equal within ``atol`` (mm)."""
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(aff_a, aff_b, rtol=0, atol=atol)


def world_bbox(shape, affine) -> tuple[np.ndarray, np.ndarray]:
    """Min and max world corners of a grid (voxel centres +- half a voxel)."""
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape[:3]], indexing="ij")).reshape(3, -1)
    world = nib.affines.apply_affine(affine, corners.T)
    return world.min(0), world.max(0)


def foreground(data: np.ndarray) -> np.ndarray:
    """Rough head/brain foreground of the DWI: above 10 % of its 98th percentile of positive values."""
    pos = data[data > 0]
    if not pos.size:
        return np.zeros(data.shape, bool)
    return data > 0.1 * float(np.percentile(pos, 98))


def grid_info(shape, affine) -> dict:
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    return {
        "shape": [int(s) for s in shape[:3]],
        "voxel_size_mm": [round(float(z), 4) for z in zooms],
        "orientation": "".join(nib.aff2axcodes(affine)),
        "origin_mm": [round(float(v), 3) for v in np.asarray(affine)[:3, 3]],
    }


def resample_to(data, src_affine, ref_shape, ref_affine, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``data`` onto the reference grid in world space; return (values, inside-FOV mask)."""
    vox2vox = np.linalg.inv(src_affine) @ ref_affine
    near = np.abs(vox2vox - np.round(vox2vox)) < 1e-9  # drop round-off: exact shifts stay exact
    vox2vox[near] = np.round(vox2vox[near])
    out = ndi.affine_transform(
        np.asarray(data, dtype=np.float64), vox2vox[:3, :3], offset=vox2vox[:3, 3],
        output_shape=tuple(ref_shape[:3]), order=order, mode="nearest",
    )
    ijk = np.indices(ref_shape[:3], dtype=np.float32).reshape(3, -1)
    src = vox2vox[:3, :3].astype(np.float32) @ ijk + vox2vox[:3, 3:4].astype(np.float32)
    lim = np.asarray(data.shape[:3], dtype=np.float32)[:, None] - 0.5
    inside = np.all((src >= -0.5) & (src <= lim), axis=0).reshape(ref_shape[:3])
    out[~inside] = 0.0  # outside the source field of view (beyond half a voxel): 0
    return out.astype(np.float32), inside


def conform_adc(dwi, dwi_affine, adc, adc_affine, adc_path="ADC") -> tuple[np.ndarray, dict]:
    """Return (ADC on the DWI grid, info with 'resampled', 'coverage'). Raises InputError if disjoint."""
    if dwi.ndim != 3 or adc.ndim != 3:
        raise InputError(adc_path, f"conform needs 3-D images (DWI {dwi.shape}, ADC {adc.shape})")
    if grids_match(dwi.shape, dwi_affine, adc.shape, adc_affine):
        return np.asarray(adc, dtype=np.float32), {"resampled": False, "coverage": 1.0}
    lo_d, hi_d = world_bbox(dwi.shape, dwi_affine)
    lo_a, hi_a = world_bbox(adc.shape, adc_affine)
    if np.any(hi_a < lo_d) or np.any(hi_d < lo_a):
        raise InputError(adc_path, "the ADC field of view does not overlap the DWI at all (check the affines)")
    out, inside = resample_to(adc, adc_affine, dwi.shape, dwi_affine)
    fg = foreground(dwi)
    coverage = float(inside[fg].mean()) if fg.any() else float(inside.mean())
    if coverage < MIN_COVERAGE:
        raise InputError(
            adc_path, f"the ADC field of view covers only {100 * coverage:.1f} % of the DWI brain (< 10 %)"
        )
    return out, {"resampled": True, "coverage": coverage}


class ConformADCInputSpec(DecisionInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="3-D DWI (trace): the reference grid")
    adc_file = File(exists=True, mandatory=True, desc="ADC map")


class ConformADCOutputSpec(DecisionOutputSpec):
    adc_file = File(desc="ADC on the DWI grid, float32")
    resampled = traits.Bool(desc="True when the ADC had to be resampled")


class ConformADC(DecisionInterface):
    """Resample the ADC onto the DWI grid when the grids differ."""

    input_spec = ConformADCInputSpec
    output_spec = ConformADCOutputSpec
    step = "conform"
    title = "ADC on the DWI grid"

    def _input_adc(self) -> str:
        """The file an error should name: the session's input ADC (from ``discovery.json`` in the
        reportlets folder; the raw DWI when the ADC was computed), not this node's work copy."""
        rdir = self.inputs.reportlets_dir if isdefined(self.inputs.reportlets_dir) else ""
        if rdir:
            try:
                found = json.loads((Path(rdir) / "discovery.json").read_text(encoding="utf-8"))
                source = found.get("adc") or found.get("dwi")
                if source:
                    return str(source)
            except (OSError, ValueError, AttributeError):
                pass
        return str(self.inputs.adc_file)

    def _run_step(self, runtime):
        dimg, dwi = load_nifti(self.inputs.dwi_file)
        aimg, adc = load_nifti(self.inputs.adc_file)
        out, info = conform_adc(dwi, dimg.affine, adc, aimg.affine, self._input_adc())
        self.record("dwi_grid", grid_info(dwi.shape, dimg.affine))
        self.record("adc_grid", grid_info(adc.shape, aimg.affine))
        self.record("resampled", info["resampled"])
        if info["resampled"]:
            self.record("coverage", round(info["coverage"], 4))
            d, a = grid_info(dwi.shape, dimg.affine), grid_info(adc.shape, aimg.affine)
            self.decide(
                "ADC and DWI grids differ (ADC {} at {} mm {}, DWI {} at {} mm {}): ADC resampled linearly onto "
                "the DWI grid in world space; {:.0f} % of the DWI foreground is inside the ADC field of view".format(
                    "x".join(map(str, a["shape"])), "x".join(f"{z:g}" for z in a["voxel_size_mm"]), a["orientation"],
                    "x".join(map(str, d["shape"])), "x".join(f"{z:g}" for z in d["voxel_size_mm"]), d["orientation"],
                    100 * info["coverage"],
                ),
                "warning",
            )
        else:
            self.decide("grids match: ADC used as is, with the DWI header")
        dst = Path(runtime.cwd) / "adc_on_dwi.nii.gz"
        save_nifti_atomic(new_image(out, dimg, np.float32), dst)
        self._results.update(adc_file=str(dst), resampled=info["resampled"])
        return runtime
