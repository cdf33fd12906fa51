"""Throughput of the built-in model: synthetic batch generation, one training step, and inference.

    python benchmarks/builtin_throughput.py [--device cpu|cuda] [--batch 2] [--patch 64] [--steps 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    from models.builtin.network import build_network
    from models.builtin.synth import SynthGenerator
    from models.builtin.transforms import random_crop
    from models.builtin.loss import LesionWeightedDiceCE

    dev = torch.device(args.device)
    gen = SynthGenerator(dev)
    net = build_network().to(dev)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    loss_fn = LesionWeightedDiceCE()
    tg = tt = 0.0
    for s in range(args.steps):
        t0 = time.time()
        x, y = gen.batch(s, args.batch)
        x, y = random_crop(x, y, (args.patch,) * 3, s)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.time()
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.time()
        if s:  # skip warm-up
            tg += t1 - t0
            tt += t2 - t1
    n = max(1, args.steps - 1)
    print(f"generation {tg / n:.2f} s/batch, train step {tt / n:.2f} s, total {(tg + tt) / n:.2f} s/step "
          f"({n / (tg + tt):.3f} steps/s) on {dev}, batch {args.batch}, patch {args.patch}^3")

    sample = Path(__file__).resolve().parents[1] / "bids_app" / "data" / "demo" / "isles22-sample"
    dwi_f = next(sample.glob("sub-*/ses-*/dwi/*_dwi.nii.gz"), None)
    if dwi_f is not None:
        import nibabel as nib

        from models.builtin.predictor import BuiltinPredictor, normalize_images

        adc_f = next(sample.glob("sub-*/ses-*/dwi/*_adc.nii.gz"))
        dwi, adc = nib.load(str(dwi_f)), nib.load(str(adc_f))
        dn, an = normalize_images(dwi, adc, np.asarray(dwi.dataobj) > 0)
        p = BuiltinPredictor(device=args.device)
        p.predict(dn, an)
        t0 = time.time()
        p.predict(dn, an)
        print(f"inference {time.time() - t0:.1f} s on {dwi.shape} ({args.device}, no TTA)")


if __name__ == "__main__":
    main()
