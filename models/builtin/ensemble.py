"""Join built-in weights of one architecture into one weights file: a logit-mean ensemble, or with
``--average`` a single network whose parameters are the members' mean (a "weight soup": one network's
size and speed; meaningful for members fine-tuned from the same weights).

    python -m models.builtin.ensemble --members R3/builtin_v1.pt H-a/builtin_v1.pt ... --out E [--average]

Each member's SHA-256 is checked against its JSON sidecar before it is read (``weights_only=True``); all
members must share the same hyper-parameters and label rule. The output ``E/builtin_v1.pt`` holds the
members' tensors under ``members.<i>.`` (``network.LogitMean``, ``"ensemble": n`` in the sidecar's
hyper-parameters) or, with ``--average``, the mean of each tensor (computed in float64, stored in the
members' dtype). Its sidecar records the sliding-window patch the app uses (``--patch``; by default the
members' common training patch, i.e. the window each member runs with alone, ``predictor.ROI`` where a
sidecar records none; members of different patches need ``--patch``),
the members' label rule (``calibrate.py`` and ``choose_postprocess.py`` generate labels by it), each
member's SHA-256 and provenance (command, steps, torch) and the file's own SHA-256. Calibration and the
post-processing choice are then made on the result as for single weights. Same members in the same
order -> a bit-identical file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


from .network import build_network, count_parameters
from .predictor import ROI
from .synth import GENERATOR_OPTIONS
from .weights_file import WeightsIntegrityError, read_verified, write_weights

# sidecar fields of each member kept in the ensemble's provenance
MEMBER_FIELDS = ("command", "init", "seed", "selected_step", "synthetic_val", "patch", "device", "torch",
                 "train_minutes", "release")


class EnsembleError(ValueError):
    """A member cannot join the ensemble (missing sidecar, checksum, architecture)."""


def read_member(path: Path) -> tuple[dict, dict]:
    """(sidecar, state dict) of one member; the SHA-256 is checked before the file is deserialised."""
    try:
        meta, state = read_verified(path)
    except WeightsIntegrityError as exc:
        raise EnsembleError(str(exc)) from None
    if int(meta.get("hparams", {}).get("ensemble", 1)) != 1:
        raise EnsembleError(f"{path}: is itself an ensemble; give its members instead")
    return meta, state


def common_patch(metas) -> tuple[int, int, int]:
    """The training patch all members share: the window the predictor runs each of them with alone
    (``predictor.ROI`` where a sidecar records none)."""
    patches = {tuple(int(s) for s in (m.get("patch") or ROI)) for m in metas}
    if len(patches) > 1:
        raise EnsembleError("members were trained with different patches "
                            f"({', '.join('x'.join(map(str, p)) for p in sorted(patches))}); give --patch")
    return patches.pop()


def join(members, out_dir, patch=None, command=None, average=False) -> dict:
    """Write ``out_dir/builtin_v1.pt`` and its sidecar; return the sidecar."""
    paths = [Path(m) for m in members]
    if len(paths) < 2:
        raise EnsembleError("an ensemble needs at least two members")
    metas, states = zip(*(read_member(p) for p in paths))
    hp = metas[0]["hparams"]
    for p, m in zip(paths[1:], metas[1:]):
        if m["hparams"] != hp:
            raise EnsembleError(f"{p}: hyper-parameters differ from {paths[0]} ({m['hparams']} vs {hp})")
    rules = {m.get("label_rule", "threshold") for m in metas}  # calibrate / choose_postprocess read it
    if len(rules) > 1:
        raise EnsembleError(f"members were trained with different label rules ({', '.join(sorted(rules))})")
    patch = common_patch(metas) if patch is None else patch
    if average:
        hparams = dict(hp)
        net = build_network(hparams)
        state = {k: (sum(sd[k].double() for sd in states) / len(states)).to(v.dtype)
                 for k, v in states[0].items()}
    else:
        hparams = dict(hp, ensemble=len(paths))
        net = build_network(hparams)
        state = {f"members.{i}.{k}": v for i, sd in enumerate(states) for k, v in sd.items()}
    net.load_state_dict(state)  # strict: every tensor of every member, nothing else
    meta = {
        "name": "builtin_v1",
        "hparams": hparams,
        "n_parameters": count_parameters(net),
        "patch": [int(s) for s in patch],
        "command": command,
        "label_rule": rules.pop(),
        # calibrate / choose_postprocess draw from the newest generator among the members'
        **{k: max(float(m.get(k, 0.0)) for m in metas) for k in GENERATOR_OPTIONS},
        "members": [dict({"file": str(p), "sha256": m["sha256"]}, **{k: m[k] for k in MEMBER_FIELDS if k in m})
                    for p, m in zip(paths, metas)],
        "input": metas[0].get("input"),
        "combination": "parameter mean (weight soup)" if average else "logit mean",
        "output": ("1 logit channel; sigmoid = lesion probability" if average else
                   "1 logit channel: the mean of the members' logits; sigmoid = lesion probability"),
        "torch": torch.__version__,
    }
    write_weights(net.state_dict(), out_dir, meta)
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", nargs="+", required=True, help="built-in weights files (each with its sidecar)")
    ap.add_argument("--out", required=True, help="output folder (builtin_v1.pt and builtin_v1.json)")
    ap.add_argument("--patch", nargs=3, type=int, default=None,
                    help="sliding-window size (default: the members' common training patch)")
    ap.add_argument("--average", action="store_true",
                    help="one network with the mean of the members' parameters instead of a logit-mean ensemble")
    args = ap.parse_args(argv)
    try:
        meta = join(args.members, args.out, args.patch,
                    "python -m models.builtin.ensemble " + " ".join(sys.argv[1:] if argv is None else argv),
                    average=args.average)
    except EnsembleError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"wrote {Path(args.out) / 'builtin_v1.pt'}: {meta['combination']} of {len(meta['members'])} members, "
          f"{meta['n_parameters']} parameters, sha256 {meta['sha256'][:16]}...")


if __name__ == "__main__":
    main()
