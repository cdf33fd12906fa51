"""NVAUTO cost on CPU with a real-size stand-in network, and FLAIR->DWI registration time.

The official NVAUTO TorchScript files are not available here, so one MONAI SegResNet of the
Auto3DSeg size (init_filters 32, blocks_down (1,2,2,4), 2 -> 2 channels, random weights) is
scripted, saved and loaded through the same verified path as the real files. It runs the full
recipe of ``models/nvauto.py`` once on the demo case (DWI 112x112x73 at 2 mm -> 223x223x145 at 1 mm,
window 192x192x128, overlap 0.625 -> 2x2x2 = 8 windows) on ``--threads`` CPU threads; the 15-model
time is extrapolated as preprocessing + 15 x (one model) + inverse resampling.

Usage: python benchmarks/nvauto_benchmark.py [--threads 2] [--part all|nvauto|register] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SES = ROOT / "bids_app/data/demo/isles22-sample/sub-strokecase0009/ses-0001"
DWI = SES / "dwi/sub-strokecase0009_ses-0001_dwi.nii.gz"
ADC = SES / "dwi/sub-strokecase0009_ses-0001_adc.nii.gz"
FLAIR = SES / "anat/sub-strokecase0009_ses-0001_FLAIR.nii.gz"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def bench_nvauto(threads: int) -> dict:
    import nibabel as nib
    import numpy as np
    import torch
    from monai.networks.nets import SegResNet

    from models.nvauto import NVAUTO_FILES, NvautoPredictor, load_models

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, init_filters=32, in_channels=2, out_channels=2,
                    blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)).eval()
    n_params = sum(p.numel() for p in net.parameters())
    scripted = torch.jit.script(net)
    with tempfile.TemporaryDirectory() as tmp:
        ts = Path(tmp) / "NVAUTO/ts"
        ts.mkdir(parents=True)
        torch.jit.save(scripted, str(ts / "model0.ts"))
        size_mb = (ts / "model0.ts").stat().st_size / 1e6
        for rel in NVAUTO_FILES[1:]:  # the loader needs all 15 files; only model0 is used below
            (Path(tmp) / rel).symlink_to(ts / "model0.ts")
        t0 = time.perf_counter()
        models, digests = load_models(tmp, "cpu")
        t_load15 = time.perf_counter() - t0
    predictor = NvautoPredictor(models[:1], digests, "cpu")
    del models
    trace, adc = nib.load(str(DWI)), nib.load(str(ADC))
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    image = predictor.preprocess(trace, adc)
    t_pre = time.perf_counter() - t0
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    shape = tuple(int(s) for s in image.shape[1:])
    n_win = len(dense_patch_slices(shape, predictor.inferer.roi_size,
                                   _get_scan_interval(shape, predictor.inferer.roi_size, 3, (0.625,) * 3)))
    t0, c0 = time.perf_counter(), time.process_time()
    probs = predictor.model_probabilities(predictor.models[0], image)
    t_model, cpu_model = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    native = predictor.to_native(probs, image)
    t_inv = time.perf_counter() - t0
    p1 = native.as_tensor()[1].numpy()
    return {
        "threads": threads, "torch": torch.__version__, "segresnet_params": n_params,
        "torchscript_file_mb": round(size_mb, 1), "load_and_verify_15_files_s": round(t_load15, 2),
        "native_shape": list(trace.shape), "grid_1mm": list(shape), "windows": n_win,
        "preprocess_s": round(t_pre, 2), "one_model_s": round(t_model, 1), "inverse_s": round(t_inv, 2),
        "one_model_cpu_s": round(cpu_model, 1), "one_model_cpu_s_per_thread": round(cpu_model / threads, 1),
        "per_window_s": round(t_model / n_win, 1), "loadavg_1min_after": round(__import__("os").getloadavg()[0], 2),
        "extrapolated_15_models_s": round(t_pre + 15 * t_model + t_inv, 0),
        "extrapolated_15_models_min": round((t_pre + 15 * t_model + t_inv) / 60, 1),
        "peak_rss_mib_before_inference": round(rss0, 0), "peak_rss_mib": round(peak_rss_mib(), 0),
        "p1_range": [float(np.min(p1)), float(np.max(p1))],
    }


def bench_register(threads: int) -> dict:
    import tempfile as _t

    from nodes.register import register_flair

    out = {}
    for mode in ("rigid", "nonrigid"):
        with _t.TemporaryDirectory() as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            res = register_flair(FLAIR, DWI, None, mode, Path(tmp), num_threads=threads)
            out[mode] = {"seconds": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                         **{k: res[k] for k in ("metric_initial", "metric_final", "stages", "threads")}}
    out["peak_rss_mib"] = round(peak_rss_mib(), 0)
    out["loadavg_1min_after"] = round(__import__("os").getloadavg()[0], 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", choices=("all", "nvauto", "register"), default="all")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    result = {}
    if args.part in ("all", "nvauto"):
        result["nvauto"] = bench_nvauto(args.threads)
        print(json.dumps(result["nvauto"], indent=2), flush=True)
    if args.part in ("all", "register"):
        result["register"] = bench_register(args.threads)
        print(json.dumps(result["register"], indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
