"""Texture of real and synthetic [trace, ADC] pairs: how far the generator is from real images.

    python -m models.builtin.texture_stats --real DWI ADC [--brain MASK]   (~2 mm grid, any ADC units)
    python -m models.builtin.texture_stats --synthetic 16 [--sulci P] [--texture P] [--seed0 900003000]

Figures of the normalised channels (``transforms.normalize_channels``, what the model sees) inside the
brain eroded by one voxel: the median gradient magnitude of the ADC and of the trace (per voxel); the
share of brain voxels with ADC > 1.5e-3 mm2/s (CSF); the 90th percentile of the ADC (near 3 with pure
CSF, lower where CSF is only partial volume); the median ADC gradient next to CSF (a 3^3 neighbourhood
with ADC > 1.2: edge sharpness) and the robust s.d. of the high-pass ADC (minus its 3^3 mean) away from
CSF (noise and fine texture). Synthetic: the median and the 10th / 90th percentiles over the volumes.
No lesion mask is read. Without ``--brain`` the brain is the non-zero trace (a skull-stripped input).
Real ADC units (mm2/s, 1e-3 or 1e-6 mm2/s) are found as the app finds them
(``nodes.adc_units.harmonise_adc``).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy import ndimage
from scipy.stats import median_abs_deviation

KEYS = ("adc_gradient", "trace_gradient", "csf_share", "adc_p90", "adc_gradient_near_csf", "adc_highpass_sd")


def _gradient_magnitude(x: np.ndarray) -> np.ndarray:
    return np.sqrt(sum(d ** 2 for d in np.gradient(x.astype(np.float64))))


def _median(values: np.ndarray) -> float:
    return round(float(np.median(values)), 4) if values.size else float("nan")


def figures(trace_n: np.ndarray, adc_n: np.ndarray, brain: np.ndarray) -> dict:
    """The figures of ``KEYS`` of one normalised pair (arrays on one grid, ``brain`` boolean)."""
    inner = ndimage.binary_erosion(brain)
    adc = adc_n.astype(np.float64)
    near_csf = inner & (ndimage.maximum_filter(adc, 3) > 1.2)
    high = (adc - ndimage.uniform_filter(adc, 3))[inner & ~near_csf]
    adc_grad = _gradient_magnitude(adc)
    return {"adc_gradient": _median(adc_grad[inner]), "trace_gradient": _median(_gradient_magnitude(trace_n)[inner]),
            "csf_share": round(float((adc_n[brain] > 1.5).mean()), 4),
            "adc_p90": round(float(np.percentile(adc[inner], 90)), 4),
            "adc_gradient_near_csf": _median(adc_grad[near_csf]),
            "adc_highpass_sd": round(float(median_abs_deviation(high, scale="normal")), 4) if high.size
            else float("nan")}


def real(dwi_path, adc_path, brain_path=None) -> dict:
    import nibabel as nib

    from nodes.adc_units import harmonise_adc

    from .transforms import normalize_channels

    dwi, adc = nib.load(str(dwi_path)), nib.load(str(adc_path))
    zooms = np.sqrt((dwi.affine[:3, :3] ** 2).sum(0))
    if np.any(np.abs(zooms - 2.0) > 0.2):
        raise SystemExit(f"{dwi_path}: voxels of {np.round(zooms, 2).tolist()} mm; the figures are per 2 mm voxel")
    d, a = (np.squeeze(np.asarray(i.dataobj, dtype=np.float32)) for i in (dwi, adc))
    brain = (np.asarray(nib.load(str(brain_path)).dataobj) > 0) if brain_path else d > 0
    a, _ = harmonise_adc(a, brain, adc_path)
    dn, an = normalize_channels(d, a, brain)
    return figures(dn, an, brain)


def synthetic(n: int, seed0: int, sulci: float = 0.0, generator=None, texture: float = 0.0) -> dict:
    """Percentiles of the figures over ``n`` volumes of the generator with these ``sulci`` / ``texture``."""
    from .synth import SynthGenerator

    gen = generator or SynthGenerator("cpu", label_rule="visible", sulci=sulci, texture=texture)
    rows = []
    for i in range(n):
        x, _ = gen.sample_one(seed0 + i)
        x = x.cpu().numpy()
        rows.append(figures(x[0], x[1], (x[0] > 0) | (x[1] > 0)))
    return {k: {q: round(float(np.percentile([r[k] for r in rows], p)), 4)
                for q, p in (("p10", 10), ("median", 50), ("p90", 90))} for k in KEYS}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--real", nargs=2, metavar=("DWI", "ADC"))
    src.add_argument("--synthetic", type=int, metavar="N")
    ap.add_argument("--brain", default=None, help="brain mask of --real (default: non-zero trace)")
    ap.add_argument("--sulci", type=float, default=0.0)
    ap.add_argument("--texture", type=float, default=0.0)
    ap.add_argument("--seed0", type=int, default=900003000)
    args = ap.parse_args(argv)
    out = real(*args.real, args.brain) if args.real else synthetic(args.synthetic, args.seed0, args.sulci,
                                                                   texture=args.texture)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
