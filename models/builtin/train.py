"""Train the built-in lesion segmentation model on synthetic data only.

    python -m models.builtin.train --out DIR --steps N --batch B --device auto|cpu|cuda --seed 0 [--resume]
        [--patch D H W] [--time-budget-min M] [--eval-real PATH_TO_BIDS_SAMPLE]

Deterministic: batch ``s`` depends only on ``(seed, s)``; ``DIR/checkpoint.pt`` (model, optimiser,
scheduler, step, RNG states, best validation) is written every ``--ckpt-every`` steps and on exit,
and ``--resume`` continues from it. Validation uses held-out SYNTHETIC volumes (seeds disjoint from
training). At the end ``DIR/builtin_v1.pt`` (state_dict only, best synthetic-validation weights) and
``DIR/builtin_v1.json`` (hyper-parameters, command, seed, steps, SHA-256) are written.
``--eval-real`` reports metrics on a real case for information only (never used for selection).

Options of release 3: ``--label-rule visible`` (``labels.py``: small lesions still visible after the
generator's degradation keep a label), ``--small-lesion-weight W`` (``loss.py``: cross-entropy weight up
to W on small lesions) and ``--select dice_f1`` (the saved weights maximise the mean of synthetic Dice
and lesion-wise F1). Defaults reproduce the release-2 recipe. ``--lesion-dice-weight`` and
``--lesion-fp-threshold`` add the lesion-wise term of ``loss.py`` (stages P-Q; not in the shipped weights).
``--shift-consistency W --max-shift S`` (with ``--crops-per-volume 2``) pairs each volume's two crops, the
second moved by up to S voxels, and adds ``loss.shift_consistency`` (stage AA; not in the shipped weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .labels import LABEL_RULES
from .loss import LesionWeightedDiceCE, shift_consistency
from .network import DEFAULT_HPARAMS, build_network, count_parameters
from .synth import GENERATOR_OPTIONS, SynthGenerator, add_generator_arguments
from .transforms import random_crop, shifted_pair_crop
from .weights_file import WeightsIntegrityError, read_verified, write_weights

VAL_SEED0 = 900_000_000  # validation volumes: seeds far from any training seed


def _log(msg):
    print(f"[builtin-train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def step_seed(seed: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(step)) % (2 ** 40)


@torch.no_grad()
def validate(net, gen, n, device, amp, patch, seed0=VAL_SEED0):
    """Pooled Dice and lesion-wise F1 (26-connectivity, pooled TP/FP/FN) over ``n`` held-out synthetic
    volumes (generator seeds ``seed0 + i``), with the app's sliding-window inference (``patch`` windows,
    overlap 0.25, gaussian): instance-norm statistics as in training and at inference."""
    from monai.inferers import SlidingWindowInferer

    from .metrics import Pooled

    inferer = SlidingWindowInferer(roi_size=tuple(patch), sw_batch_size=1, overlap=0.25, mode="gaussian",
                                   padding_mode="constant", cval=0.0)
    net.eval()
    pooled = Pooled()
    for i in range(n):
        x, y = gen.sample_one(seed0 + i)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            p = inferer(x[None].to(device), net).float()
        pooled.add(p[0, 0].cpu().numpy() > 0, y[0].cpu().numpy())
    net.train()
    r = pooled.result(digits=None)
    return {"dice": r["dice"], "lesion_f1": r["lesion_f1"]}


def selection_score(val: dict, rule: str) -> float:
    """``dice``: pooled Dice (releases 1-2); ``dice_f1``: mean of pooled Dice and lesion-wise F1."""
    return val["dice"] if rule == "dice" else 0.5 * (val["dice"] + val["lesion_f1"])


def eval_real(state_dict, hparams, bids_path, device="cpu", roi=None):
    """Dice / lesion-wise F1 of ``state_dict`` on the first labelled case of a BIDS folder (information only)."""
    import nibabel as nib

    from models.postprocess import postprocess  # scipy: only where a real case is evaluated

    from .metrics import lesion_metrics
    from .predictor import BuiltinPredictor
    from .real_data import find_cases, load_reference, prepare_case

    case = find_cases(bids_path)[0]
    dn, an, affine = prepare_case(case["dwi"], case["adc"])
    gt = load_reference(case["mask"], affine, dn.shape)
    pred = BuiltinPredictor.from_state_dict(state_dict, hparams, device=device, roi=roi)
    prob = pred.predict(nib.Nifti1Image(dn, affine), nib.Nifti1Image(an, affine))
    vox_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    return lesion_metrics(postprocess(prob, 0.5)[0] > 0, gt, vox_ml)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--patch", type=int, nargs=3, default=None,
                    help="training crop (multiples of 8); default 64^3 on CPU, the whole 88x104x88 FOV on CUDA")
    ap.add_argument("--crops-per-volume", type=int, default=1,
                    help="crops taken from each generated volume (batch = volumes x crops; cheaper on CPU)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--val-every", type=int, default=200)
    ap.add_argument("--val-n", type=int, default=8)
    ap.add_argument("--val-seed0", type=int, default=VAL_SEED0,
                    help="first generator seed of the validation volumes (default VAL_SEED0); an offset keeps "
                         "step selection apart from the volumes score_synthetic reports on")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--time-budget-min", type=float, default=None)
    ap.add_argument("--schedule-by-time", action="store_true",
                    help="with --time-budget-min: after 30 steps, shorten --steps to what fits in the budget "
                         "(so the cosine schedule completes); batches stay a function of (seed, step)")
    ap.add_argument("--channels", type=int, nargs="+", default=None,
                    help="U-Net channels per level (default: network.DEFAULT_HPARAMS, 16 32 64 128)")
    ap.add_argument("--norm", default=None, choices=["instance", "batch"],
                    help="normalisation layers (default instance). batch: running statistics at inference, so "
                         "a window's result no longer depends on what else the window holds; with --init from "
                         "instance-norm weights the new norm layers start with unit scale and zero shift")
    ap.add_argument("--init", default=None,
                    help="start from these weights (fine-tuning): a state_dict .pt beside its JSON sidecar, "
                         "checked by SHA-256 before it is read")
    ap.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--eval-real", default=None)
    ap.add_argument("--real-data", default=None,
                    help="labelled ISLES-style BIDS folder mixed into training (never for the shipped weights)")
    ap.add_argument("--real-fraction", type=float, default=0.25, help="with --real-data: share of real crops")
    ap.add_argument("--label-rule", default="threshold", choices=sorted(LABEL_RULES),
                    help="generator labels (models/builtin/labels.py)")
    add_generator_arguments(ap)
    ap.add_argument("--small-lesion-weight", type=float, default=1.0,
                    help="max cross-entropy weight of small lesions (models/builtin/loss.py); 1 = off")
    ap.add_argument("--lesion-dice-weight", type=float, default=0.0,
                    help="weight of the lesion-wise Dice term (models/builtin/loss.py); 0 = off (releases 1-4)")
    ap.add_argument("--lesion-dice-radius", type=int, default=4,
                    help="neighbourhood of each lesion in the lesion-wise Dice term, in voxels")
    ap.add_argument("--lesion-fp-threshold", type=float, default=None,
                    help="with --lesion-dice-weight: predicted components above this probability that touch no "
                         "lesion join the lesion-wise term (loss.py); default off")
    ap.add_argument("--shift-consistency", type=float, default=0.0,
                    help="weight of the shift-consistency term (loss.shift_consistency): with --crops-per-volume 2, "
                         "each volume's second crop is its first moved by up to --max-shift voxels per axis, and the "
                         "two must agree where they overlap; 0 = off (releases 1-6)")
    ap.add_argument("--max-shift", type=int, default=16, help="with --shift-consistency: largest move per axis")
    ap.add_argument("--select", default="dice", choices=["dice", "dice_f1"],
                    help="synthetic-validation score that picks the saved weights")
    args = ap.parse_args(argv)
    if args.shift_consistency and (args.crops_per_volume != 2 or args.batch % 2):
        ap.error("--shift-consistency needs --crops-per-volume 2 and an even --batch")
    if args.shift_consistency and args.real_data:
        ap.error("--shift-consistency and --real-data: real crops would break the pairs")
    t0 = time.time()

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = device.type == "cuda" and not args.no_amp
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    patch = tuple(args.patch) if args.patch else ((64, 64, 64) if device.type == "cpu" else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"

    random.seed(args.seed)
    np.random.seed(args.seed % (2 ** 32))
    torch.manual_seed(args.seed)
    hp = copy.deepcopy(DEFAULT_HPARAMS)
    if args.channels:
        if len(args.channels) < 2:
            ap.error("--channels needs at least two levels")
        hp["channels"] = list(args.channels)
        hp["strides"] = [2] * (len(args.channels) - 1)
        hp["divisible_by"] = 2 ** (len(args.channels) - 1)
    if args.norm:
        hp["norm"] = args.norm
    net = build_network(hp).to(device)
    gen = SynthGenerator(device, label_rule=args.label_rule, **{k: getattr(args, k) for k in GENERATOR_OPTIONS})
    patch = patch or gen.fov
    if args.init:
        try:  # SHA-256 against the sidecar before anything is unpickled, as for the app
            _, init_state = read_verified(args.init)
        except WeightsIntegrityError as exc:
            raise SystemExit(str(exc)) from None
        try:
            res = net.load_state_dict(init_state, strict=False)
        except RuntimeError as exc:  # tensor shapes differ
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            why = (lines[1:] or lines or [type(exc).__name__])[0]
            raise SystemExit(f"{args.init}: does not fit this network ({why})")
        # only the parameters of norm layers the initial weights did not have may be missing
        if res.unexpected_keys or any(".adn.N." not in k for k in res.missing_keys):
            raise SystemExit(f"{args.init}: does not fit this network (missing {res.missing_keys[:3]}, "
                             f"unexpected {res.unexpected_keys[:3]})")
        _log(f"initialised from {args.init} ({len(res.missing_keys)} new norm tensors)")
    real = None
    if args.real_data:
        from .real_data import RealCases

        real = RealCases(args.real_data, patch)
        _log(f"real cases mixed in ({args.real_fraction:.0%} of crops): {', '.join(real.ids)}")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warm = max(1, min(100, args.steps // 20))

    def lr_lambda(s):
        if s < warm:
            return (s + 1) / warm
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, args.steps - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    loss_fn = LesionWeightedDiceCE(args.small_lesion_weight, lesion_dice_weight=args.lesion_dice_weight,
                                   lesion_dice_radius=args.lesion_dice_radius,
                                   lesion_fp_threshold=args.lesion_fp_threshold)
    step = 0
    best = {"val_dice": -1.0, "step": 0, "state": None}
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step = int(ck["step"])
        best = ck["best"]
        random.setstate(ck["rng"]["python"])
        np.random.set_state(ck["rng"]["numpy"])
        torch.set_rng_state(ck["rng"]["torch"])
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"])
        _log(f"resumed from {ckpt_path} at step {step}")

    def save_ckpt():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({
            "model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "step": step, "best": best, "hparams": hp, "args": vars(args),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
        }, tmp)
        os.replace(tmp, ckpt_path)

    _log(f"device {device} amp={amp} params {count_parameters(net)} patch {patch} batch {args.batch} "
         f"steps {args.steps} start {step}")
    net.train()
    t_loop = time.time()
    s_loop = step
    run_loss = None
    stopped_early = False
    while step < args.steps:
        if args.time_budget_min is not None and (time.time() - t0) / 60.0 >= args.time_budget_min:
            _log(f"time budget of {args.time_budget_min} min reached at step {step}")
            stopped_early = True
            break
        if args.schedule_by_time and args.time_budget_min and step - s_loop == 20:
            t_est = time.time()  # skip the first 20 steps (cudnn autotuning, allocator warm-up)
        if args.schedule_by_time and args.time_budget_min and step - s_loop == 80:
            rate = 60 / max(time.time() - t_est, 1e-6)
            # validation: a guess of ~0.3 s per volume on CUDA, ~2 s on CPU; the final one is reserved too
            val_once = args.val_n * (0.3 if device.type == "cuda" else 2.0) if args.val_every else 0.0
            val_s = val_once / args.val_every if args.val_every else 0.0
            left_s = args.time_budget_min * 60 - (time.time() - t0) - 15 - val_once
            fit = step + int(max(0.0, left_s) * 0.97 / (1.0 / rate + val_s))
            if fit < args.steps:
                _log(f"schedule-by-time: {rate:.2f} steps/s -> steps {args.steps} -> {fit}")
                args.steps = max(step + 1, fit)
        ss = step_seed(args.seed, step)
        x, y = gen.batch(ss, max(1, -(-args.batch // args.crops_per_volume)))  # ceil
        if args.crops_per_volume > 1:
            x = x.repeat_interleave(args.crops_per_volume, 0)[:args.batch]
            y = y.repeat_interleave(args.crops_per_volume, 0)[:args.batch]
        overlaps = None
        if args.shift_consistency:
            x, y, overlaps = shifted_pair_crop(x, y, patch, ss, args.max_shift)
        else:
            x, y = random_crop(x, y, patch, ss)
        if real is not None:
            pick = random.Random(ss + 17)
            for i in range(x.shape[0]):
                if pick.random() < args.real_fraction:
                    x[i], y[i] = real.crop(pick.randrange(2 ** 31))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        if overlaps:
            loss = loss + args.shift_consistency * shift_consistency(logits, overlaps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 2.0)
        opt.step()
        sched.step()
        step += 1
        lv = float(loss.detach())
        run_loss = lv if run_loss is None else 0.9 * run_loss + 0.1 * lv
        if step % args.log_every == 0 or step == args.steps:
            el = time.time() - t_loop
            _log(f"step {step}/{args.steps} loss {run_loss:.4f} lr {sched.get_last_lr()[0]:.2e} "
                 f"{(step - s_loop) / max(el, 1e-9):.3f} steps/s elapsed {(time.time() - t0) / 60:.1f} min")
        if args.val_every and step % args.val_every == 0:
            vm = validate(net, gen, args.val_n, device, amp, patch, args.val_seed0)
            vd = selection_score(vm, args.select)
            if vd > best["val_dice"]:
                best = {"val_dice": vd, "step": step, "val": vm,
                        "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}
            _log(f"step {step} synthetic validation Dice {vm['dice']:.4f} lesion F1 {vm['lesion_f1']:.4f} "
                 f"score {vd:.4f} (best {best['val_dice']:.4f} @ {best['step']})")
        if step % args.ckpt_every == 0:
            save_ckpt()
    save_ckpt()

    # final validation, choose the weights (best synthetic --select score; real data never used)
    if args.val_every and step > 0:
        vm = validate(net, gen, args.val_n, device, amp, patch, args.val_seed0)
        vd = selection_score(vm, args.select)
        _log(f"final synthetic validation Dice {vm['dice']:.4f} lesion F1 {vm['lesion_f1']:.4f} score {vd:.4f}")
        if vd >= best["val_dice"]:
            best = {"val_dice": vd, "step": step, "val": vm,
                    "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}
    state = best["state"] if best["state"] is not None else {k: v.detach().cpu() for k, v in net.state_dict().items()}
    state = {k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}
    meta = {
        "name": "builtin_v1",
        "hparams": hp,
        "n_parameters": count_parameters(net),
        "command": "python -m models.builtin.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "seed": args.seed,
        "init": args.init,
        "steps_done": step,
        "steps_planned": args.steps,
        "stopped_by_time_budget": stopped_early,
        "selected_step": best["step"],
        "synthetic_val_dice": (best.get("val") or {}).get("dice"),
        "synthetic_val": best.get("val"),
        "val_seeds": [args.val_seed0, args.val_seed0 + args.val_n - 1] if args.val_every else None,
        "selection": args.select,
        "label_rule": args.label_rule,
        **{k: getattr(args, k) for k in GENERATOR_OPTIONS},
        "small_lesion_weight": args.small_lesion_weight,
        "lesion_dice_weight": args.lesion_dice_weight,
        "lesion_dice_radius": args.lesion_dice_radius,
        "lesion_fp_threshold": args.lesion_fp_threshold,
        **({"shift_consistency": args.shift_consistency, "max_shift": args.max_shift} if args.shift_consistency
           else {}),
        "batch": args.batch,
        "crops_per_volume": args.crops_per_volume,
        "patch": list(patch),
        "lr": args.lr,
        "device": str(device),
        "torch": torch.__version__,
        "train_minutes": round((time.time() - t0) / 60, 2),
        "input": "[dwi_n, adc_n] from models.builtin.transforms.normalize_channels, RAS 2 mm grid",
        "output": "1 logit channel, sigmoid = lesion probability",
    }
    if real is not None:
        meta["real_data"] = {"path": str(args.real_data), "cases": real.ids, "fraction": args.real_fraction}
    if args.eval_real:
        m = eval_real(state, hp, args.eval_real, roi=patch)
        meta["real_case_info_only"] = m
        _log(f"real case (information only): {json.dumps(m)}")
    wpath = write_weights(state, out, meta)
    _log(f"wrote {wpath} ({wpath.stat().st_size / 1e6:.2f} MB, sha256 {meta['sha256'][:16]}...) in "
         f"{(time.time() - t0) / 60:.1f} min")
    return meta


if __name__ == "__main__":
    main()
