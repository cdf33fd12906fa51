"""Measure nodes.skullstrip on real data: Dice of the recovered brain mask and run time.

(a) the demo ISLES'22 case: its non-zero region is the expert skull strip; a synthetic head (dark
    CSF/skull gap, bright scalp, Rayleigh noise) is wrapped around it and the mask recovered;
(b) the nilearn MNI152 2009a T1 (skull-stripped), same idea, when nilearn is installed;
(c) dipy's small_64D raw DWI (real, 10x10x10 at 2 mm): mask volume on the b0 and on the b~1000 mean.

Run: ``python benchmarks/skullstrip_eval.py`` from the repository root.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodes.skullstrip import detect_skull_stripped, dice, skullstrip, stripped_mask, synthetic_head  # noqa: E402

DEMO = ROOT / "bids_app/data/demo/isles22-sample/sub-strokecase0009/ses-0001/dwi"


def timed(fn, *args, repeat: int = 3):
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return out, best


def eval_stripped(name: str, image: np.ndarray, zooms, seeds=(0, 1, 2)) -> None:
    ref = stripped_mask(image)
    voxel_ml = float(np.prod(zooms)) / 1000.0
    detected, ev = detect_skull_stripped(image, zooms)
    print(f"\n[{name}] shape {image.shape}, voxel {tuple(float(z) for z in zooms)} mm, "
          f"reference brain {ref.sum() * voxel_ml:.0f} ml")
    print(f"  original detected as skull-stripped: {detected} (zero fraction {ev['zero_fraction']:.3f}, "
          f"non-zero {ev['nonzero_volume_ml']:.0f} ml)")
    for seed in seeds:
        head = synthetic_head(image, zooms, seed=seed)
        res, sec = timed(skullstrip, head, head, zooms)
        print(f"  synthetic head seed {seed}: detected stripped {res['stripped_input']}, "
              f"Dice {dice(res['mask'], ref):.4f}, mask {res['mask'].sum() * voxel_ml:.0f} ml, "
              f"time {sec:.2f} s (best of 3)")
    _, sec = timed(skullstrip, image, image, zooms)
    print(f"  already-stripped path: {sec:.2f} s")


def main() -> None:
    img = nib.load(str(DEMO / "sub-strokecase0009_ses-0001_dwi.nii.gz"))
    eval_stripped("a) ISLES'22 demo trace DWI", img.get_fdata(dtype=np.float32), img.header.get_zooms()[:3])

    if importlib.util.find_spec("nilearn"):
        import nilearn

        path = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
        mni = nib.load(str(path))
        eval_stripped("b) MNI152 2009a T1 (nilearn)", mni.get_fdata(dtype=np.float32), mni.header.get_zooms()[:3])
        # 1 mm 182x218x182 timing, the size of a typical 1 mm acquisition
        head = synthetic_head(mni.get_fdata(dtype=np.float32), mni.header.get_zooms()[:3])[7:189, 7:225, 0:182]
        _, sec = timed(skullstrip, head, head, (1.0, 1.0, 1.0))
        print(f"  1 mm 182x218x182 crop of the synthetic head: {sec:.2f} s")
    else:
        print("\n[b) MNI152] nilearn not installed: skipped")

    from dipy.data import get_fnames

    fdwi, fbval, _ = get_fnames(name="small_64D")
    raw = nib.load(fdwi)
    data = raw.get_fdata(dtype=np.float32)
    bvals = np.loadtxt(fbval).ravel()
    zooms = raw.header.get_zooms()[:3]
    b0 = data[..., bvals < 50].mean(-1)
    trace = data[..., bvals > 500].mean(-1)
    adc = np.ones_like(trace)
    fov_ml = trace.size * float(np.prod(zooms)) / 1000.0
    print(f"\n[c) dipy small_64D] shape {data.shape}, voxel {tuple(float(z) for z in zooms)} mm, field of view "
          f"{fov_ml:.1f} ml")
    for name, b0_img in (("trace", None), ("b0", b0)):
        res, sec = timed(skullstrip, trace, adc, zooms, b0_img)
        print(f"  {res['method']}: detected stripped {res['stripped_input']}, mask "
              f"{res['mask'].sum() * float(np.prod(zooms)) / 1000:.2f} ml ({100 * res['mask'].mean():.0f} % of the "
              f"field of view), time {sec:.3f} s")


if __name__ == "__main__":
    main()
