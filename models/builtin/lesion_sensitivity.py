"""Which lesions the built-in model finds, by size and by local contrast (a development diagnostic).

    python -m models.builtin.lesion_sensitivity --weights W [--n 48] [--seed0 940000000] [--threads 2]
        [--real DWI ADC MASK] [--json rows.json]

For every 26-connected ground-truth lesion: its size (voxels), the highest probability the model gives
inside it, and its contrast against a shell of tissue around it (the voxels 2 voxels away from it, at
chessboard distance; its first ring, partial volume, is left out, as are the voxels within 1 voxel of
any lesion and those outside the brain): ``trace_ratio`` = trace p75 / shell median trace, ``adc_ratio`` =
ADC p25 / shell median ADC, and ``csf_share``, the share of the shell with ADC >= ``CSF_ADC`` (sulci,
ventricles). Lesions whose shell holds fewer than ``MIN_SHELL`` voxels are left out.

On synthetic volumes (``SynthGenerator(label_rule="visible")``, generator options as ``score_synthetic``'s,
model grid, the probability of ``BuiltinPredictor.logits_model_grid`` with the weights' temperature) and,
with ``--real``, on one real case (the app's steps up to normalisation, ``real_data.prepare_case``, and its
mask as ``deepisles evaluate`` reads it; ``BuiltinPredictor.predict``, native grid). The
summary gives the share of lesions found (max probability >= 0.5, >= 0.2) per size band and per contrast
band of the small lesions: whether a real case's missed lesions are also missed on synthetic data with the
same size and contrast (a sensitivity limit) or not (a synthetic-to-real gap).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy import ndimage
from scipy.special import expit

from models.postprocess import STRUCTURE_26

MIN_SHELL = 5
CSF_ADC = 1.5  # 1e-3 mm2/s
SIZE_BANDS = ((1, 1), (2, 4), (5, 14), (15, 50), (51, None))
SMALL = (2, 14)
TRACE_BANDS = ((0.0, 1.3), (1.3, 1.6), (1.6, 1.9), (1.9, 2.3), (2.3, None))
ADC_BANDS = ((0.0, 0.6), (0.6, 0.8), (0.8, None))


def lesion_rows(prob: np.ndarray, label: np.ndarray, trace: np.ndarray, adc: np.ndarray,
                brain: np.ndarray) -> list[dict]:
    """One row per ground-truth lesion of ``label``: size, max probability, trace and ADC ratios."""
    label = np.asarray(label) > 0
    brain = np.asarray(brain) > 0
    lab, _ = ndimage.label(label, structure=STRUCTURE_26)
    near_any = ndimage.binary_dilation(label, structure=STRUCTURE_26)
    rows = []
    for obj, sl in enumerate(ndimage.find_objects(lab), start=1):
        box = tuple(slice(max(s.start - 3, 0), s.stop + 3) for s in sl)
        m = lab[box] == obj
        shell = ndimage.binary_dilation(m, structure=STRUCTURE_26, iterations=2) & ~near_any[box] & brain[box]
        if shell.sum() < MIN_SHELL:
            continue
        t, a = trace[box], adc[box]
        rows.append({
            "size": int(m.sum()),
            "max_prob": float(prob[box][m].max()),
            "trace_ratio": float(np.percentile(t[m], 75) / max(float(np.median(t[shell])), 1e-6)),
            "adc_ratio": float(np.percentile(a[m], 25) / max(float(np.median(a[shell])), 1e-6)),
            "csf_share": float(np.mean(a[shell] >= CSF_ADC)),
        })
    return rows


def _in_size(size: int, band) -> bool:
    """Size bands are inclusive: (2, 4) holds 2, 3 and 4 voxels; None is no upper bound."""
    return size >= band[0] and (band[1] is None or size <= band[1])


def _in_ratio(ratio: float, band) -> bool:
    """Contrast bands are half-open: [lo, hi); None is no upper bound."""
    return ratio >= band[0] and (band[1] is None or ratio < band[1])


def _rate(rows):
    if not rows:
        return {"n": 0}
    p = np.array([r["max_prob"] for r in rows])
    return {"n": len(rows), "found_0.5": round(float(np.mean(p >= 0.5)), 3),
            "found_0.2": round(float(np.mean(p >= 0.2)), 3)}


def summarise(rows: list[dict]) -> dict:
    """Shares found per size band, and per (trace, ADC) contrast band of the 2-14 voxel lesions."""
    out = {"all": _rate(rows), "size": {}, "small_contrast": {}}
    for band in SIZE_BANDS:
        out["size"][f"{band[0]}-{band[1] or 'max'}"] = _rate([r for r in rows if _in_size(r["size"], band)])
    small = [r for r in rows if _in_size(r["size"], SMALL)]
    for tb in TRACE_BANDS:
        for ab in ADC_BANDS:
            sel = [r for r in small if _in_ratio(r["trace_ratio"], tb) and _in_ratio(r["adc_ratio"], ab)]
            out["small_contrast"][f"trace {tb[0]}-{tb[1] or 'max'} / adc {ab[0]}-{ab[1] or 'max'}"] = _rate(sel)
    return out


def synthetic_rows(predictor, n: int, seed0: int, **options) -> list[dict]:
    """``lesion_rows`` of ``n`` synthetic volumes (seeds ``seed0 ..``), each row with its ``seed``."""
    from .synth import SynthGenerator

    gen = SynthGenerator("cpu", label_rule="visible", **options)
    rows = []
    for i in range(n):
        x, y = gen.sample_one(seed0 + i)
        x = x.numpy()
        prob = expit(predictor.logits_model_grid(x) / predictor.temperature)  # -inf outside the brain box: 0
        for r in lesion_rows(prob, y[0].numpy() > 0.5, x[0], x[1], x[0] > 0):
            rows.append({"seed": seed0 + i, **r})
    return rows


def real_rows(predictor, dwi_path, adc_path, mask_path) -> list[dict]:
    """``lesion_rows`` of one real case, on the DWI's grid, through the app's own input steps."""
    import nibabel as nib

    from .real_data import load_reference, prepare_case

    dwi_n, adc_n, affine = prepare_case(dwi_path, adc_path)
    mask = load_reference(mask_path, affine, dwi_n.shape)
    prob = predictor.predict(nib.Nifti1Image(dwi_n, affine), nib.Nifti1Image(adc_n, affine))
    return lesion_rows(prob, mask, dwi_n, adc_n, dwi_n > 0)


def main(argv=None):
    import torch

    from .predictor import BuiltinPredictor
    from .synth import GENERATOR_OPTIONS, add_generator_arguments

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--n", type=int, default=48, help="synthetic volumes (0: none)")
    ap.add_argument("--seed0", type=int, default=940_000_000)
    add_generator_arguments(ap)
    ap.add_argument("--real", nargs=3, metavar=("DWI", "ADC", "MASK"), default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write every row and the summaries to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    predictor = BuiltinPredictor(args.weights)
    options = {k: getattr(args, k) for k in GENERATOR_OPTIONS}
    result = {}
    if args.n > 0:
        rows = synthetic_rows(predictor, args.n, args.seed0, **options)
        result["synthetic"] = {"rows": rows, "summary": summarise(rows)}
    if args.real:
        rows = real_rows(predictor, *args.real)
        result["real"] = {"rows": rows, "summary": summarise(rows)}
    for name, part in result.items():
        print(f"== {name}")
        print(json.dumps(part["summary"], indent=1))
    if args.json:
        from .weights_file import write_json

        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
