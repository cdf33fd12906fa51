"""Temperature calibration of the built-in model's probability map, on synthetic volumes only.

    python -m models.builtin.calibrate --weights models/builtin/weights/builtin_v1.pt [--n 16]

The network's logits over whole synthetic brains (generator seeds ``CAL_SEED0 + i``, disjoint from
training and from the validation volumes used for model selection) are taken through the same
sliding-window inference as the app. One scalar temperature ``T`` minimising the binary cross-entropy
of ``sigmoid(logit / T)`` inside the brain is written into the weights' JSON sidecar under
``"calibration"``, with the expected calibration error (ECE, 15 equal-width bins) before and after.
``T`` does not move the 0.5 decision boundary: masks at threshold 0.5 are unchanged, only the
probability map is calibrated. The weights file (and its SHA-256) is not touched.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .weights_file import write_json

CAL_SEED0 = 950_000_000
N_BINS = 15


def ece(prob: np.ndarray, label: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error: bin-size weighted |mean label - mean probability| over equal bins."""
    prob = np.asarray(prob, dtype=np.float64).ravel()
    label = np.asarray(label, dtype=np.float64).ravel()
    idx = np.minimum((prob * n_bins).astype(int), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    gap = np.abs(np.bincount(idx, label, n_bins) - np.bincount(idx, prob, n_bins))
    return float(gap.sum() / max(count.sum(), 1))


def bce(logit: np.ndarray, label: np.ndarray, temperature: float) -> float:
    z = np.asarray(logit, dtype=np.float64) / temperature
    return float(np.mean(np.logaddexp(0.0, z) - label * z))


def fit_temperature(logit: np.ndarray, label: np.ndarray) -> float:
    """The temperature in [0.05, 20] minimising the cross-entropy (bounded 1-D search on log T)."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda lt: bce(logit, label, float(np.exp(lt))), bounds=(np.log(0.05), np.log(20.0)),
                          method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


@torch.no_grad()
def synthetic_logits(predictor, generator, n: int, seed0: int = CAL_SEED0):
    """Brain-voxel logits and labels of ``n`` synthetic volumes, through the app's inference path
    (``BuiltinPredictor.logits_model_grid``: brain box, sliding window)."""
    logits, labels = [], []
    for i in range(n):
        x, y = generator.sample_one(seed0 + i)
        brain = (x[1] > 0).numpy()
        z = predictor.logits_model_grid(x.numpy())
        logits.append(z[brain])
        labels.append(y[0].numpy()[brain])
    return np.concatenate(logits), np.concatenate(labels)


def calibrate(weights, n: int = 16, generator=None) -> dict:
    """Fit ``T`` for ``weights`` and record it in the sidecar (atomic rewrite). Returns the record."""
    from scipy.special import expit

    from .predictor import BuiltinPredictor
    from .synth import generator_for

    weights = Path(weights)
    pred = BuiltinPredictor(weights)  # SHA-256 checked against the sidecar before loading
    # the generator (label rule, sulci, texture) the weights were trained with
    gen = generator or generator_for(pred.meta)
    logit, label = synthetic_logits(pred, gen, n)
    t = fit_temperature(logit, label)
    p1, pt = expit(logit), expit(logit / t)  # no overflow warning for large logits
    rec = {"temperature": round(t, 6), "n_volumes": n, "generator_seeds": [CAL_SEED0, CAL_SEED0 + n - 1],
           "n_voxels": int(label.size), "bce_before": round(bce(logit, label, 1.0), 6),
           "bce_after": round(bce(logit, label, t), 6), "ece_before": round(ece(p1, label), 6),
           "ece_after": round(ece(pt, label), 6)}
    write_sidecar_entry(weights, "calibration", rec)
    return rec


def write_sidecar_entry(weights, key: str, value) -> None:
    """Set ``key`` in the JSON sidecar of ``weights`` (temporary file, then rename)."""
    side = Path(weights).with_suffix(".json")
    meta = json.loads(side.read_text())
    meta[key] = value
    write_json(side, meta)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--n", type=int, default=16, help="synthetic volumes (default 16)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(calibrate(args.weights, args.n), indent=2))


if __name__ == "__main__":
    main()
