"""Lesion biomarkers: volume, number of lesions (26-connectivity), largest lesion, mean ADC.

``lesion_stats`` is the pure computation; ``LesionStats`` the nipype step that writes the one-row
TSV (``stats_file``) and records its decisions for the report; ``read_lesion_stats`` reads the TSV
back (report and group level).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from nipype.interfaces.base import File, traits
from scipy import ndimage

from bids_app.errors import InputError
from nodes.base import DecisionInputSpec, DecisionInterface, DecisionOutputSpec, atomic_write_text, load_nifti

#: Columns of the stats TSV, in order.
STATS_COLUMNS = ("total_volume_ml", "lesion_count", "largest_lesion_ml", "mean_adc_lesion", "voxel_volume_ml")
_INT_COLUMNS = {"lesion_count"}
#: BIDS data dictionary of the stats table (its JSON sidecar; the group table reuses the entries)
STATS_DICTIONARY = {
    "total_volume_ml": {"Description": "Total volume of the predicted lesion mask (voxel count x voxel volume).",
                        "Units": "mL"},
    "lesion_count": {"Description": "Number of lesions: connected components of the mask, 26-connectivity.",
                     "Units": "count"},
    "largest_lesion_ml": {"Description": "Volume of the largest lesion (connected component).", "Units": "mL"},
    "mean_adc_lesion": {"Description": "Mean apparent diffusion coefficient inside the lesion mask; n/a when "
                        "the mask is empty.", "Units": "10^-3 mm^2/s"},
    "voxel_volume_ml": {"Description": "Volume of one voxel of the DWI grid.", "Units": "mL"},
}
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def lesion_stats(mask, zooms, adc=None) -> dict:
    """Biomarkers of a binary lesion mask (any non-zero voxel is lesion).

    ``zooms``: voxel sizes in mm (the first three are used); ``adc`` in 1e-3 mm2/s on the same grid.
    Returns the :data:`STATS_COLUMNS` (``mean_adc_lesion`` is ``None`` when empty or without ADC).
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"lesion mask must be 3-D, got shape {mask.shape}")
    lesion = np.nan_to_num(mask, nan=0) != 0
    voxel_ml = float(np.prod([float(z) for z in tuple(zooms)[:3]])) / 1000.0
    labels, count = ndimage.label(lesion, structure=_STRUCTURE_26)
    sizes = np.bincount(labels.ravel())[1:] if count else np.zeros(0, dtype=int)
    n_vox = int(lesion.sum())
    mean_adc = None
    if adc is not None and n_vox:
        adc = np.asarray(adc, dtype=np.float64)
        if adc.shape != lesion.shape:
            raise ValueError(f"ADC shape {adc.shape} differs from mask shape {lesion.shape}")
        values = adc[lesion]
        values = values[np.isfinite(values)]
        if values.size:
            mean_adc = round(float(values.mean()), 6)
    return {
        "total_volume_ml": round(n_vox * voxel_ml, 6),
        "lesion_count": int(count),
        "largest_lesion_ml": round(int(sizes.max()) * voxel_ml, 6) if count else 0.0,
        "mean_adc_lesion": mean_adc,
        "voxel_volume_ml": round(voxel_ml, 9),
    }


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def format_stats_tsv(stats: dict) -> str:
    """The one-row TSV text of ``stats`` (missing values as ``n/a``)."""
    header = "\t".join(STATS_COLUMNS)
    row = "\t".join(_fmt(stats.get(col)) for col in STATS_COLUMNS)
    return f"{header}\n{row}\n"


def read_lesion_stats(path) -> dict:
    """Read a stats TSV written by :class:`LesionStats` (first data row; ``n/a`` -> ``None``)."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ValueError(f"{path}: no data row")
    out = {}
    for key, raw in zip(lines[0].split("\t"), lines[1].split("\t")):
        raw = raw.strip()
        if raw in ("n/a", ""):
            out[key] = None
            continue
        try:
            out[key] = int(raw) if key in _INT_COLUMNS else float(raw)
        except ValueError:
            out[key] = raw
    return out


class _LesionStatsInputSpec(DecisionInputSpec):
    mask_file = File(exists=True, mandatory=True, desc="binary lesion mask (0/1) on the DWI grid")
    adc_file = File(exists=True, desc="ADC in 1e-3 mm2/s on the same grid")
    prob_file = File(exists=True, desc="lesion probability map on the same grid")


class _LesionStatsOutputSpec(DecisionOutputSpec):
    stats_file = File(exists=True, desc="one-row TSV of lesion biomarkers")
    stats = traits.Dict(desc="the same numbers as a dict")


class LesionStats(DecisionInterface):
    """Lesion volume (ml), count (26-connectivity), largest lesion (ml) and mean ADC in the lesion."""

    input_spec = _LesionStatsInputSpec
    output_spec = _LesionStatsOutputSpec
    step = "biomarkers"
    title = "Lesion biomarkers"

    def _load_same_grid(self, path, mask_img, what):
        img, data = load_nifti(path)
        data = np.squeeze(data) if data.ndim > 3 else data
        if data.shape != mask_img.shape[:3]:
            raise InputError(path, f"{what} shape {data.shape} differs from the mask {mask_img.shape[:3]}")
        if not np.allclose(img.affine, mask_img.affine, atol=1e-3):
            self.decide(f"The {what} affine differs from the mask affine; voxels compared as they are.",
                        "warning")
        return data

    def _run_step(self, runtime):
        mask_img, mask = load_nifti(self.inputs.mask_file)
        if mask.ndim > 3:
            mask = np.squeeze(mask)
        if mask.ndim != 3:
            raise InputError(self.inputs.mask_file, f"lesion mask must be 3-D, got shape {mask.shape}")
        uniq = np.unique(mask[np.isfinite(mask)])
        if not set(uniq.tolist()) <= {0.0, 1.0}:
            self.decide(f"Mask is not 0/1 ({uniq.size} distinct values); every non-zero voxel counted "
                        "as lesion.", "warning")
        adc = None
        if self.inputs.adc_file:
            adc = self._load_same_grid(self.inputs.adc_file, mask_img, "ADC")
        zooms = mask_img.header.get_zooms()[:3]
        stats = lesion_stats(mask, zooms, adc=adc)
        n_vox = int(np.count_nonzero(np.nan_to_num(mask)))
        self.decide(f"Voxel size {' x '.join(f'{z:g}' for z in zooms)} mm = {stats['voxel_volume_ml']:g} ml; "
                    f"{n_vox} lesion voxels.")
        if stats["lesion_count"] == 0:
            self.decide("No lesion found: the mask is empty.", "warning")
        else:
            self.decide(f"Total lesion volume {stats['total_volume_ml']:.3f} ml in {stats['lesion_count']} "
                        f"lesion(s) (26-connectivity); largest {stats['largest_lesion_ml']:.3f} ml.")
        if adc is None:
            self.decide("No ADC given: mean ADC in the lesion not computed.")
        elif stats["mean_adc_lesion"] is not None:
            self.decide(f"Mean ADC in the lesion {stats['mean_adc_lesion']:.3f} x 1e-3 mm2/s.")
        if self.inputs.prob_file and n_vox:
            prob = self._load_same_grid(self.inputs.prob_file, mask_img, "probability map")
            lesion = np.nan_to_num(mask) != 0
            mean_p = float(np.nanmean(prob[lesion]))
            self.record("mean_prob_lesion", round(mean_p, 4))
            self.decide(f"Mean lesion probability inside the mask {mean_p:.3f}.")
        for key, value in stats.items():
            self.record(key, value)
        out = Path(runtime.cwd) / "lesion_stats.tsv"
        atomic_write_text(format_stats_tsv(stats), out)
        self._results["stats_file"] = str(out)
        self._results["stats"] = stats
        return runtime
