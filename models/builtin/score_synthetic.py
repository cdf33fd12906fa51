"""Score built-in weights on held-out synthetic volumes, through the app's predictor (brain box).

    python -m models.builtin.score_synthetic --weights A/builtin_v1.pt B/builtin_v1.pt [--mean-of-all]
        [--n 64] [--roi 64 64 64] [--sulci P] [--texture P] [--pileup-low-adc P] [--cortical P]
        [--overlap O [O ...]] [--label-rule visible|rim|threshold] [--json scores.json]

The figure every release decision in ``MODEL_CARD.md`` is based on: for each weights file, the plain mask
(logit >= 0, i.e. probability >= 0.5 at any temperature, no post-processing) of
``BuiltinPredictor.logits_model_grid`` on ``SynthGenerator("cpu", label_rule="visible", **options)``
``.sample_one(seed0 + i)`` (options ``--sulci``, ``--texture``, ``--pileup-low-adc``, ``--cortical``, default 0:
the generator of releases 1-4; ``--label-rule`` scores against another rule of ``labels.py``, same images),
``i = 0 .. n - 1`` (default seeds: ``train.VAL_SEED0``), pooled over the volumes: Dice from summed overlaps,
lesion-wise F1 from summed TP / FP / FN (26-connectivity), and ``score`` = their mean
(``train.selection_score(..., "dice_f1")``), also unrounded (``score_unrounded``; 6 decimals in the table).
``--mean-of-all`` adds the logit mean of all the weights (what ``ensemble.py`` would ship). ``--roi`` forces
one window size for all (else each sidecar's patch); ``--overlap`` one sliding-window overlap for all (else
each sidecar's, 0.25 when it has none), or several, each scored as its own row (``<weights>@overlap=<O>``).
Deterministic: the same weights and seeds give the same figures.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

MEAN_OF_ALL = "mean-of-all"


def score(predictors: dict, n: int, seed0: int, generator=None, mean_of_all: bool = False, progress=None,
          label_rule: str = "visible", **options) -> dict:
    """``{name: pooled metrics}`` of each predictor (and of their logit mean) over ``n`` volumes of
    ``generator`` or of ``SynthGenerator`` with ``options`` (``synth.GENERATOR_OPTIONS``, default all 0)."""
    from .metrics import Pooled
    from .synth import SynthGenerator

    gen = generator or SynthGenerator("cpu", label_rule=label_rule, **options)
    names = list(predictors) + ([MEAN_OF_ALL] if mean_of_all else [])
    pooled = {k: Pooled() for k in names}
    for i in range(n):
        x, y = gen.sample_one(seed0 + i)
        x, y = x.cpu().numpy(), y[0].cpu().numpy() > 0.5
        logits = {k: p.logits_model_grid(x) for k, p in predictors.items()}
        if mean_of_all:
            logits[MEAN_OF_ALL] = sum(logits.values()) / len(predictors)
        for k in names:
            pooled[k].add(logits[k] >= 0, y)
        if progress:
            progress(i + 1)
    # the unrounded score too: a release bar (+0.01) can fall inside the 4-decimal rounding
    return {k: {**p.result(), "score_unrounded": p.result(digits=None)["score"]} for k, p in pooled.items()}


def main(argv=None):
    from .labels import LABEL_RULES
    from .predictor import BuiltinPredictor
    from .synth import GENERATOR_OPTIONS, add_generator_arguments
    from .train import VAL_SEED0

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", nargs="+", required=True, help="built-in weights files (each with its sidecar)")
    ap.add_argument("--n", type=int, default=64, help="synthetic volumes (default 64)")
    ap.add_argument("--seed0", type=int, default=VAL_SEED0, help="first generator seed (default train.VAL_SEED0)")
    add_generator_arguments(ap)
    ap.add_argument("--roi", nargs=3, type=int, default=None, help="one window size for all weights")
    ap.add_argument("--overlap", nargs="+", type=float, default=None,
                    help="sliding-window overlap(s) for all weights (default: each sidecar's); several: each is scored")
    ap.add_argument("--mean-of-all", action="store_true", help="also score the mean of all the weights' logits")
    ap.add_argument("--label-rule", default="visible", choices=sorted(LABEL_RULES),
                    help="labels the masks are scored against (default visible, the releases' figure)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.mean_of_all and len(args.weights) < 2:
        ap.error("--mean-of-all needs at least two weights files")
    torch.set_num_threads(args.threads)
    overlaps = args.overlap or [None]
    preds = {(w if len(overlaps) == 1 else f"{w}@overlap={o:g}"): BuiltinPredictor(w, roi=args.roi, overlap=o)
             for w in args.weights for o in overlaps}
    t0 = time.time()

    def progress(done):
        if done % 16 == 0 or done == args.n:
            print(f"--- {done} volumes, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    options = {k: getattr(args, k) for k in GENERATOR_OPTIONS}
    out = score(preds, args.n, args.seed0, mean_of_all=args.mean_of_all, progress=progress,
                label_rule=args.label_rule, **options)
    print("weights\tDice\tF1\tscore\tunrounded\tTP/FP/FN")
    for k, m in out.items():
        print(f"{k}\t{m['dice']:.4f}\t{m['lesion_f1']:.4f}\t{m['score']:.4f}\t{m['score_unrounded']:.6f}\t"
              f"{m['tp']}/{m['fp']}/{m['fn']}")
    if args.json:
        from .weights_file import write_json

        write_json(args.json, {"n": args.n, "seed0": args.seed0, **options, "roi": args.roi, "overlap": args.overlap,
                               "label_rule": args.label_rule, "scores": out})
    return out


if __name__ == "__main__":
    main()
