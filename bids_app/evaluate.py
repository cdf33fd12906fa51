"""Score lesion masks against expert masks with the ISLES'22 challenge metrics.

``deepisles evaluate DERIV_DIR REFERENCE_DIR [-o OUT.tsv]``: every app mask
``sub-*/[ses-*/]dwi/*_label-lesion_mask.nii.gz`` is paired with the reference of the same
subject/session (ISLES'22 ``sub-*/ses-*/*_msk.nii.gz``, or a BIDS ``*_mask``/``*_dseg`` image that is
not a brain mask) and scored. Metrics (any non-zero voxel is lesion, 26-connectivity):

- Dice; 1.0 when both masks are empty.
- absolute volume difference in ml (voxel-count difference x voxel volume of the reference);
- absolute lesion-count difference;
- lesion-wise F1: a reference component is TP if >= 1 predicted voxel overlaps it, else FN; a
  predicted component touching no reference voxel is FP; F1 = TP / (TP + (FP + FN) / 2); 1.0 when
  there is no component at all.

Each row also holds the volumes, the component counts and the TP / FP / FN lesion counts behind the F1.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from bids_app.errors import InputError, NoDataError, UsageError
from nodes.base import atomic_write_text, load_nifti
from nodes.load import squeeze_extra_axes

GRID_TOL_MM = 1e-4
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
METRICS = ("dice", "lesion_f1", "abs_volume_diff_ml", "abs_lesion_count_diff")
COUNTS = ("pred_volume_ml", "ref_volume_ml", "pred_lesions", "ref_lesions", "tp_lesions", "fp_lesions", "fn_lesions")
COLUMNS = ("case", "subject", "session", *METRICS, *COUNTS, "prediction", "reference", "note")


# ----------------------------------------------------------------------------- metrics
def _binary(a) -> np.ndarray:
    return np.nan_to_num(np.asarray(a, dtype=np.float64), nan=0.0) > 0


def _same_shape(pred, gt):
    pred, gt = _binary(pred), _binary(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {gt.shape}")
    return pred, gt


def dice(pred, gt) -> float:
    """Dice coefficient of two masks; 1.0 when both are empty."""
    pred, gt = _same_shape(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, gt).sum()) / total


def volume_difference_ml(pred, gt, voxel_ml: float) -> float:
    """Absolute volume difference in ml."""
    pred, gt = _same_shape(pred, gt)
    return abs(int(pred.sum()) - int(gt.sum())) * float(voxel_ml)


def count_lesions(mask) -> int:
    """Number of 26-connected components."""
    return int(ndimage.label(_binary(mask), structure=_STRUCTURE_26)[1])


def lesion_count_difference(pred, gt) -> int:
    """Absolute difference of the 26-connected component counts."""
    pred, gt = _same_shape(pred, gt)
    return abs(count_lesions(pred) - count_lesions(gt))


def _lesions(pred, gt) -> tuple[int, int, int, int]:
    """``(TP, FP, predicted components, reference components)``, labelling each mask once."""
    gt_lab, n_gt = ndimage.label(gt, structure=_STRUCTURE_26)
    pred_lab, n_pred = ndimage.label(pred, structure=_STRUCTURE_26)
    overlap = pred & gt
    tp = int(np.count_nonzero(np.unique(gt_lab[overlap])))
    return tp, n_pred - int(np.count_nonzero(np.unique(pred_lab[overlap]))), n_pred, n_gt


def _f1(tp: int, fp: int, fn: int) -> float:
    return 1.0 if tp + fp + fn == 0 else tp / (tp + (fp + fn) / 2.0)


def lesion_counts(pred, gt) -> tuple[int, int, int]:
    """``(TP, FP, FN)`` lesions (26-connectivity, ISLES'22): a reference component is found when a
    predicted voxel overlaps it; a predicted component touching no reference voxel is a false positive."""
    tp, fp, _, n_gt = _lesions(*_same_shape(pred, gt))
    return tp, fp, n_gt - tp


def lesion_f1(pred, gt) -> float:
    """Lesion-wise F1 (26-connectivity), as defined for ISLES'22: TP / (TP + (FP + FN) / 2)."""
    return _f1(*lesion_counts(pred, gt))


def evaluate_masks(pred, gt, voxel_ml: float) -> dict:
    """All metrics plus volumes and counts of two masks on the same grid."""
    pred, gt = _same_shape(pred, gt)
    tp, fp, n_pred, n_gt = _lesions(pred, gt)  # each mask labelled once for every count
    return {
        "dice": dice(pred, gt), "lesion_f1": _f1(tp, fp, n_gt - tp),
        "abs_volume_diff_ml": volume_difference_ml(pred, gt, voxel_ml),
        "abs_lesion_count_diff": abs(n_pred - n_gt),
        "pred_volume_ml": int(pred.sum()) * voxel_ml, "ref_volume_ml": int(gt.sum()) * voxel_ml,
        "pred_lesions": n_pred, "ref_lesions": n_gt,
        "tp_lesions": tp, "fp_lesions": fp, "fn_lesions": n_gt - tp,
    }


# ----------------------------------------------------------------------------- one case
def load_mask_3d(path):
    """(image, array) of a 3-D mask; singleton axes beyond the third are dropped, any other shape is an
    ``InputError`` naming the file."""
    img, data = load_nifti(path)
    data = squeeze_extra_axes(data)
    if data.ndim != 3:
        raise InputError(path, f"expected a 3-D mask, got shape {data.shape}")
    return img, data


def resample_nearest(data, src_affine, dst_affine, dst_shape) -> np.ndarray:
    """Nearest-neighbour resampling of ``data`` (voxel grid ``src_affine``) onto another grid."""
    vox = np.linalg.inv(src_affine) @ dst_affine
    return ndimage.affine_transform(np.asarray(data, dtype=np.float32), vox[:3, :3], offset=vox[:3, 3],
                                    output_shape=tuple(dst_shape), order=0, mode="constant", cval=0.0)


def evaluate_case(pred_path, gt_path) -> dict:
    """Metrics of one prediction against its reference; volumes use the reference voxel size.

    Grids are the same when shapes match and affines agree within ``GRID_TOL_MM``; otherwise the
    prediction is resampled (nearest neighbour) onto the reference grid and ``note`` says so.
    """
    p_img, pred = load_mask_3d(pred_path)
    g_img, gt = load_mask_3d(gt_path)
    note = ""
    if pred.shape != gt.shape or not np.allclose(p_img.affine, g_img.affine, atol=GRID_TOL_MM):
        pred = resample_nearest(pred, p_img.affine, g_img.affine, gt.shape)
        note = (f"prediction grid {p_img.shape[:3]} differs from reference grid {g_img.shape[:3]} "
                "(or affines differ by > 1e-4 mm): prediction resampled nearest-neighbour")
    voxel_ml = float(np.prod(g_img.header.get_zooms()[:3])) / 1000.0
    return {**evaluate_masks(pred, gt, voxel_ml), "note": note}


# ----------------------------------------------------------------------------- pairing
@dataclass
class Pair:
    subject: str
    session: str | None
    prediction: Path | None
    reference: Path | None
    note: str = ""


_NII = re.compile(r"\.nii(\.gz)?$")
_REF_SUFFIX = re.compile(r"_(msk|mask|dseg)\.nii(\.gz)?$")


def _entities(path: Path) -> dict:
    ents = dict(re.findall(r"(?:^|_)([a-zA-Z]+)-([a-zA-Z0-9]+)", _NII.sub("", path.name)))
    for part in path.parts[:-1]:  # sub-/ses- from the folders when the name lacks them
        m = re.fullmatch(r"(sub|ses)-([a-zA-Z0-9]+)", part)
        if m:
            ents.setdefault(m.group(1), m.group(2))
    return ents


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _prediction_files(deriv_dir: Path, desc: str | None) -> list[Path]:
    tail = f"_label-lesion_desc-{desc}_mask" if desc else "_label-lesion_mask"
    found = []
    for ext in (".nii.gz", ".nii"):
        for pattern in (f"sub-*/dwi/*{tail}{ext}", f"sub-*/ses-*/dwi/*{tail}{ext}"):
            found += deriv_dir.glob(pattern)
    return sorted(set(found))


def _reference_rank(path: Path, ents: dict) -> int | None:
    """0: ISLES'22 ``_msk``; 1: ``label-lesion`` mask/dseg; 2: other mask/dseg; None: not a reference."""
    if not _REF_SUFFIX.search(path.name) or "sub" not in ents:
        return None
    if any("brain" in str(ents.get(k, "")).lower() for k in ("label", "desc")):
        return None
    if path.name.endswith(("_msk.nii.gz", "_msk.nii")):
        return 0
    return 1 if str(ents.get("label", "")).lower() == "lesion" else 2


def find_pairs(deriv_dir, reference_dir, desc: str | None = None) -> list[Pair]:
    """Pair app masks with references by subject and session.

    Returns one :class:`Pair` per subject/session seen on either side; ``prediction`` or
    ``reference`` is None when that side is missing (or the reference is ambiguous, see ``note``).
    Files under ``deriv_dir`` are never taken as references. ``desc`` selects per-member masks
    (``*_label-lesion_desc-<desc>_mask``).
    """
    deriv_dir, reference_dir = Path(deriv_dir), Path(reference_dir)
    for folder, what in ((deriv_dir, "derivatives folder"), (reference_dir, "reference folder")):
        if not folder.is_dir():
            raise UsageError(f"{folder}: {what} not found")
    preds: dict[tuple, list[Path]] = {}
    pred_files = _prediction_files(deriv_dir, desc)
    for path in pred_files:
        ents = _entities(path)
        preds.setdefault((ents["sub"], ents.get("ses")), []).append(path)
    skip_dirs = () if _inside(reference_dir, deriv_dir) else (deriv_dir,)  # app outputs are never references
    refs = find_references(reference_dir, skip={p.resolve() for p in pred_files}, skip_dirs=skip_dirs)
    pairs = []
    for key in sorted(set(preds) | set(refs), key=lambda k: (k[0], k[1] or "")):
        note = ""
        pred = None
        if key in preds:
            pred = preds[key][0]
            if len(preds[key]) > 1:
                note = "several app masks: " + ", ".join(p.name for p in preds[key])
                pred = None
        ref, ref_note = refs.get(key, (None, ""))
        pairs.append(Pair(key[0], key[1], pred, ref, note or ref_note))
    return pairs


def find_references(reference_dir, skip=frozenset(), skip_dirs=()) -> dict[tuple, tuple[Path | None, str]]:
    """``{(subject, session): (reference mask or None, note)}`` for every reference under ``reference_dir``.

    The best-ranked candidate wins (see :func:`_reference_rank`); a tie gives None and an
    "ambiguous reference" note. Files in ``skip`` or under one of ``skip_dirs`` are ignored.
    """
    ranked: dict[tuple, list[tuple[int, Path]]] = {}
    for path in sorted(Path(reference_dir).rglob("sub-*")):
        if not path.is_file() or path.resolve() in skip or any(_inside(path, d) for d in skip_dirs):
            continue
        ents = _entities(path)
        rank = _reference_rank(path, ents)
        if rank is not None:
            ranked.setdefault((ents["sub"], ents.get("ses")), []).append((rank, path))
    out = {}
    for key, cands in ranked.items():
        best = min(r for r, _ in cands)
        top = [p for r, p in cands if r == best]
        out[key] = (top[0], "") if len(top) == 1 else (None, "ambiguous reference: " + ", ".join(p.name for p in top))
    return out


# ----------------------------------------------------------------------------- table
def evaluate_missing(gt_path) -> dict:
    """Metrics of a case the app left without a mask, scored as an empty prediction (every lesion missed)."""
    g_img, gt = load_mask_3d(gt_path)
    voxel_ml = float(np.prod(g_img.header.get_zooms()[:3])) / 1000.0
    return {**evaluate_masks(np.zeros_like(gt), gt, voxel_ml),
            "note": "no app mask (failed or not run?): scored as an empty mask"}


def run_evaluate(deriv_dir, reference_dir, out_tsv, desc: str | None = None,
                 missing_as_empty: bool = False) -> pd.DataFrame:
    """Score every pair, write ``out_tsv`` (per-case rows, then ``mean`` and ``median``) atomically."""
    pairs = find_pairs(deriv_dir, reference_dir, desc)
    if not any(p.prediction and p.reference for p in pairs):
        raise NoDataError(f"no app mask in {deriv_dir} has a matching reference mask in {reference_dir} "
                          f"({sum(p.prediction is not None for p in pairs)} app masks, "
                          f"{sum(p.reference is not None for p in pairs)} references found)")
    rows = []
    for p in pairs:
        row = {"case": f"sub-{p.subject}" + (f"_ses-{p.session}" if p.session else ""),
               "subject": p.subject, "session": p.session,
               "prediction": str(p.prediction) if p.prediction else None,
               "reference": str(p.reference) if p.reference else None, "note": p.note}
        if p.prediction and p.reference:
            try:
                row.update(evaluate_case(p.prediction, p.reference))
            except (InputError, ValueError) as exc:
                row["note"] = f"not evaluated: {exc}"
        elif p.reference and missing_as_empty and not p.note:
            row.update(evaluate_missing(p.reference))
        elif not p.note:
            row["note"] = "no reference mask" if p.prediction else "no app mask (failed or not run?)"
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    numeric = [*METRICS, *COUNTS]
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    scored = df.dropna(subset=list(METRICS))
    summary = []
    for stat in ("mean", "median"):
        values = getattr(scored[numeric], stat)()
        summary.append({"case": stat, **values.to_dict(), "note": f"over {len(scored)} evaluated case(s)"})
    df = pd.concat([df, pd.DataFrame(summary, columns=list(COLUMNS))], ignore_index=True)
    text = df.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.6g", lineterminator="\n")
    atomic_write_text(text, out_tsv)
    return df


# ----------------------------------------------------------------------------- command line
def _add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("deriv_dir", type=Path, help="the app's derivative dataset (output_dir)")
    p.add_argument("reference_dir", type=Path, help="folder of expert masks (ISLES'22 derivatives/ or BIDS)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="output TSV (default: DERIV_DIR/evaluation.tsv)")
    p.add_argument("--desc", default=None, help="score the per-member masks *_label-lesion_desc-<DESC>_mask")
    p.add_argument("--missing-as-empty", action="store_true",
                   help="score a reference without an app mask (a failed subject) as an empty prediction, so "
                        "that failures count in the mean and median (default: left out of them, with a note)")
    return p


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("evaluate", help="score lesion masks against expert masks (ISLES'22 metrics)",
                              description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    p.set_defaults(func=main_evaluate)
    return p


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"evaluate: {message}")


def main_evaluate(args) -> int:
    """Run the subcommand; ``args`` is a parsed namespace or the list of arguments after ``evaluate``."""
    if args is None or isinstance(args, (list, tuple)):
        args = _add_arguments(_Parser(prog="deepisles evaluate")).parse_args(list(args or []))
    out = args.output or Path(args.deriv_dir) / "evaluation.tsv"
    df = run_evaluate(args.deriv_dir, args.reference_dir, out, desc=getattr(args, "desc", None),
                      missing_as_empty=bool(getattr(args, "missing_as_empty", False)))
    cases = df[~df["case"].isin(["mean", "median"])]
    for _, row in cases[cases["note"].astype(str).str.len() > 0].iterrows():
        print(f"deepisles evaluate: {row['case']}: {row['note']}", file=sys.stderr)
    summary = df.set_index("case").loc[["mean", "median"], list(METRICS)]
    print(f"{int(cases['dice'].notna().sum())} case(s) evaluated; written to {out}")
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    return 0
