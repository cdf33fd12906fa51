"""Choose the post-processing recommended with a set of built-in weights, on synthetic volumes only.

    python -m models.builtin.choose_postprocess --weights models/builtin/weights/builtin_v1.pt [--n 32]
        [--label-rule rim]

Whole synthetic brains (generator seeds ``POST_SEED0 + i``, disjoint from training, from the validation
volumes of model selection and from calibration; the weights' own generator options) go through the
predictor exactly as in the app (calibrated probability, threshold 0.5). The masks are judged against
the labels of ``--label-rule`` (default ``rim``, ``labels.py``: lesions with the partial-volume edge that
experts outline; the images do not depend on the rule). Pooled Dice and lesion-wise F1 (as in training
validation) are measured for: the 0.5 mask; with the contrast check (``models/contrast_filter.py``); and, on top of
the chosen check setting, hysteresis growth (``models/grow_lesions.py``) at each low threshold of
``GROW_LOWS``. The rule, fixed before any measurement:

- the contrast check is recommended when it lowers neither Dice nor F1;
- growth is recommended at the low threshold, among those that lower neither Dice nor F1, with the
  highest mean of the two; at none, it is off.

The choice and every measured figure are written into the weights' JSON sidecar under
``"postprocess"`` (atomic rewrite; the weights file and its SHA-256 are not touched). The app follows
it with ``--contrast-check auto`` and ``--grow-lesions auto``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

POST_SEED0 = 970_000_000
GROW_LOWS = (0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
JUDGE_LABELS = "rim"  # what experts outline (MODEL_CARD.md, stage AC)


def candidate_masks(prob, dwi, adc, brain):
    """``{name: mask}`` of every option the rule compares, for one volume."""
    from models.contrast_filter import contrast_filter
    from models.grow_lesions import grow_lesions
    from models.postprocess import postprocess

    base = postprocess(prob, 0.5)[0] > 0
    checked = contrast_filter(base, dwi, adc, brain)[0] > 0
    out = {"none": base, "check": checked}
    for low in GROW_LOWS:
        out[f"none+grow{low:g}"] = grow_lesions(base, prob, dwi, adc, brain, low)[0] > 0
        out[f"check+grow{low:g}"] = grow_lesions(checked, prob, dwi, adc, brain, low)[0] > 0
    return out


def measure(predictor, generator, n: int, seed0: int = POST_SEED0) -> dict:
    """Pooled metrics of every option over ``n`` synthetic volumes."""
    import nibabel as nib

    from .metrics import Pooled

    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # the generator's grid: RAS 2 mm
    pooled: dict[str, Pooled] = {}
    for i in range(n):
        x, y = generator.sample_one(seed0 + i)
        dwi, adc = x[0].numpy(), x[1].numpy()
        gt = y[0].numpy() > 0
        prob = predictor.predict(nib.Nifti1Image(dwi, affine), nib.Nifti1Image(adc, affine))
        for name, mask in candidate_masks(prob, dwi, adc, adc > 0).items():
            pooled.setdefault(name, Pooled()).add(mask, gt)
    return {name: {k: v for k, v in p.result().items() if k != "score"} for name, p in pooled.items()}


def _not_worse(a: dict, b: dict) -> bool:
    return bool(a["dice"] >= b["dice"] and a["lesion_f1"] >= b["lesion_f1"])


def choose(results: dict) -> dict:
    """Apply the rule of the module docstring to ``measure``'s output."""
    check = _not_worse(results["check"], results["none"])
    base = "check" if check else "none"
    ok = [low for low in GROW_LOWS if _not_worse(results[f"{base}+grow{low:g}"], results[base])]
    score = {low: results[f"{base}+grow{low:g}"]["dice"] + results[f"{base}+grow{low:g}"]["lesion_f1"]
             for low in ok}
    low = max(ok, key=lambda v: (score[v], -v)) if ok else None
    return {"contrast_check": check, "grow_lesions": low is not None, "grow_low": low}


def choose_postprocess(weights, n: int = 32, generator=None, label_rule: str = JUDGE_LABELS) -> dict:
    """Measure, choose and record in the sidecar of ``weights``; returns the record."""
    from .calibrate import write_sidecar_entry
    from .predictor import BuiltinPredictor
    from .synth import generator_for

    pred = BuiltinPredictor(weights)  # SHA-256 checked against the sidecar before loading
    gen = generator or generator_for(pred.meta, label_rule=label_rule)
    results = measure(pred, gen, n)
    rec = dict(choose(results), rule="check if it lowers neither synthetic Dice nor F1; growth at the "
               "low threshold (of %s) with the best mean of both among those that lower neither"
               % list(GROW_LOWS), label_rule=getattr(gen, "label_rule_name", None),
               n_volumes=n, generator_seeds=[POST_SEED0, POST_SEED0 + n - 1], measured=results)
    write_sidecar_entry(weights, "postprocess", rec)
    return rec


def main(argv=None):
    from .labels import LABEL_RULES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--n", type=int, default=32, help="synthetic volumes (default 32)")
    ap.add_argument("--label-rule", default=JUDGE_LABELS, choices=sorted(LABEL_RULES),
                    help=f"labels the masks are judged against (models/builtin/labels.py; default {JUDGE_LABELS})")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(choose_postprocess(args.weights, args.n, label_rule=args.label_rule), indent=2))


if __name__ == "__main__":
    main()
