"""CPU cost of the SEALS member at real size (random weights; no official files needed).

Builds the Generic_UNet of a typical nnU-Net v2.1 plan for 1 mm brain MRI (5 x [2,2,2] pooling,
3^3 kernels, 32-64-128-256-320-320 features, patch 128^3: 31,195,648 parameters), runs the full
SEALS recipe (resampling to 1 mm, crop, normalisation, sliding window, resampling back) with ONE
fold and ONE mirror (no TTA) on a synthetic ISLES'22-size case (112 x 112 x 73 at 2 mm ->
224 x 224 x 146 at 1 mm, brain box about 138 x 171 x 133 mm like the real SEALS artefact), then
extrapolates to the official 5 folds x 8 mirrors.

    python benchmarks/seals_benchmark.py [--threads 2] [--json out.json] [--folds 1 --mirrors]

Peak memory is the process's maximum resident set size (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def typical_plans() -> dict:
    from collections import OrderedDict

    return {
        "num_modalities": 2, "num_classes": 1, "base_num_features": 32, "conv_per_stage": 2,
        "normalization_schemes": OrderedDict([(0, "nonCT"), (1, "nonCT")]),
        "use_mask_for_norm": OrderedDict([(0, True), (1, True)]),
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "plans_per_stage": {0: {
            "patch_size": np.array([128, 128, 128]), "current_spacing": np.array([1.0, 1.0, 1.0]),
            "pool_op_kernel_sizes": [[2, 2, 2]] * 5, "conv_kernel_sizes": [[3, 3, 3]] * 6,
        }},
    }


def isles_case(seed: int = 0):
    """112 x 112 x 73 at 2 mm, an ellipsoidal 'brain' of about 171 x 138 x 133 mm with a lesion."""
    shape, zooms = (112, 112, 73), (2.0, 2.0, 2.0)
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * z for n, z in zip(shape, zooms)], indexing="ij")
    centre, radii = (112.0, 112.0, 73.0), (69.0, 85.5, 66.5)
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
    brain = r2 < 1
    lesion = (((grids[0] - 90) / 12) ** 2 + ((grids[1] - 120) / 15) ** 2 + ((grids[2] - 80) / 10) ** 2) < 1
    dwi = np.where(brain, 300 + 40 * rng.standard_normal(shape) + 400 * lesion, 0).astype(np.float32)
    adc = np.where(brain, 0.8 + 0.1 * rng.standard_normal(shape) - 0.4 * lesion, 0).astype(np.float32)
    aff = np.diag(list(zooms) + [1.0])
    return nib.Nifti1Image(dwi, aff), nib.Nifti1Image(adc, aff)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folds", type=int, default=1, help="random folds to run (default 1)")
    ap.add_argument("--mirrors", action="store_true", help="run the 8-flip TTA (default: one mirror)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from models.seals.network import build_network, count_parameters
    from models.seals.plans import plan_from_dict
    from models.seals.predictor import SealsPredictor

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    plan = plan_from_dict(typical_plans())
    torch.manual_seed(0)
    nets = [build_network(plan).eval().to(args.device) for _ in range(args.folds)]
    t_build = time.perf_counter() - t0
    pred = SealsPredictor(nets, [plan] * args.folds, list(range(args.folds)), {}, device=args.device,
                          mirroring=args.mirrors)
    dwi, adc = isles_case()
    rss_before = rss_mb()
    t1 = time.perf_counter()
    prob = pred.predict(dwi, adc)
    t_pred = time.perf_counter() - t1
    info = pred.last_info
    windows = info["windows"][0]
    passes = windows * (8 if args.mirrors else 1) * args.folds
    t_net = info["seconds"]["networks"]
    per_pass = t_net / passes
    t_other = t_pred - t_net
    full_passes = windows * 8 * 5
    result = {
        "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "parameters": count_parameters(nets[0]), "patch": list(plan.patch_size),
        "native_shape": list(dwi.shape), "grid_1mm_xyz": list(info["grid_1mm_xyz"]),
        "crop_bbox_zyx": info["crop_bbox_zyx"], "window_steps": info["steps"], "windows": windows,
        "folds_run": args.folds, "mirrors_run": 8 if args.mirrors else 1, "forward_passes": passes,
        "build_s": round(t_build, 2), "predict_s": round(t_pred, 2), "networks_s": round(t_net, 2),
        "pre_and_post_s": round(t_other, 2), "seconds_per_forward_pass": round(per_pass, 2),
        "peak_rss_mb_before_predict": round(rss_before, 1), "peak_rss_mb": round(rss_mb(), 1),
        "extrapolated_official_5folds_8mirrors_s": round(full_passes * per_pass + t_other, 1),
        "extrapolated_official_forward_passes": full_passes,
        "output_shape": list(prob.shape), "output_dtype": str(prob.dtype),
        "loadavg_start": [round(v, 2) for v in load0], "loadavg_end": [round(v, 2) for v in os.getloadavg()],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
