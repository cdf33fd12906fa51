"""FACTORIZER member throughput: the 10 real-size models (random weights) on an ISLES-size case.

    python benchmarks/factorizer_benchmark.py [--threads 2] [--max-windows N] [--no-dropout]

Case: 112 x 112 x 73 at 2 mm (the ISLES'22 example grid: no resampling, 3 x 3 x 2 = 18 windows of
64^3). ``--max-windows N`` times only the first N windows of the full ensemble and extrapolates to
the whole case (for slow or shared machines). Prints seconds and the peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-windows", type=int, default=0, help="0 = the whole case")
    ap.add_argument("--no-dropout", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import nibabel as nib

    from models.factorizer.predictor import FactorizerPredictor
    from models.factorizer.resunet import ResUNet
    from models.factorizer.swin_factorizer import SwinFactorizer

    t0 = time.perf_counter()
    torch.manual_seed(0)
    nets = [ResUNet() for _ in range(5)] + [SwinFactorizer() for _ in range(5)]
    t_build = time.perf_counter() - t0
    shape = (112, 112, 73)
    rng = np.random.default_rng(0)
    brain = np.zeros(shape, bool)
    brain[10:100, 8:104, 5:68] = True
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    imgs = [nib.Nifti1Image((rng.random(shape) * 1000 * brain).astype(np.float32), aff) for _ in range(3)]
    pred = FactorizerPredictor(nets, dropout_at_inference=not args.no_dropout)

    n_windows = int(np.prod([int(np.ceil((n - 64) / 32)) + 1 for n in shape]))
    if args.max_windows and args.max_windows < n_windows:
        # time the ensemble on the first windows only (same per-window work as the full run)
        from models.factorizer.predictor import _Ensemble
        from models.factorizer.swin_factorizer import attach_generator

        gen = torch.Generator()
        gen.manual_seed(42)
        for net in nets:
            attach_generator(net, None if args.no_dropout else gen)
        ens = _Ensemble(nets)
        x = torch.randn(1, 3, 64, 64, 64)
        per = []
        with torch.inference_mode():
            for _ in range(args.max_windows):
                t = time.perf_counter()
                ens(x)
                per.append(time.perf_counter() - t)
        t_pred = float(np.mean(per)) * n_windows
        note = f"extrapolated from {args.max_windows} window(s): {np.mean(per):.1f} s/window x {n_windows}"
    else:
        t = time.perf_counter()
        prob = pred.predict(*imgs)
        t_pred = time.perf_counter() - t
        note = f"full case, {n_windows} windows, mean prob {prob.mean():.3f}"
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"FACTORIZER 10 models, {shape} at 2 mm, {args.threads} thread(s), dropout "
          f"{'off' if args.no_dropout else 'on (faithful)'}: build {t_build:.1f} s, inference {t_pred:.1f} s "
          f"({note}); peak RSS {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
