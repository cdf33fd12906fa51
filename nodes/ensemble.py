"""Combine the members' outputs: mean probability and a vote of the masks (one member: identity).

Rules (``rule`` input):

- ``majority`` (default): a voxel is lesion when more than half of the member masks mark it
  (2 of 3, 3 of 4, ...). With an even number of members a tie (1 of 2, 2 of 4) is broken by the mean
  probability: lesion if mean probability >= 0.5. So two members give "both agree, or one is
  confident enough to pull the mean to 0.5". For three members this is exactly the DeepISLES vote.
  (The official code has no 2-way vote: it copies the best-ranked member; here both are used.)
- ``mean``: lesion where the mean probability >= ``threshold``.

The output probability is always the voxel-wise mean of the members' probabilities.

A member that failed is never counted as an empty mask (the official code's bug 2): when a
member's node fails, nipype does not run this node at all, so the session fails with that member's
crash file and error in the report instead of giving a vote over fewer members. This node cannot
tell a failure from a true "no lesion" and therefore does not try.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from nipype.interfaces.base import File, InputMultiObject, traits

from bids_app.errors import DeepIslesError, InputError
from nodes.base import (
    DecisionInputSpec,
    DecisionInterface,
    DecisionOutputSpec,
    load_nifti,
    new_image,
    save_nifti_atomic,
)


def rule_text(n: int, rule: str = "majority", threshold: float = 0.5) -> str:
    """What :func:`combine` does with ``n`` members, in words (also written into the mask sidecar)."""
    if n == 1:
        return "identity (single member)"
    if rule == "mean":
        return f"mean probability >= {threshold:g}"
    text = f"majority vote (>= {n // 2 + 1} of {n})"
    if n % 2 == 0:
        text += f"; ties ({n // 2} of {n}) decided by mean probability >= 0.5"
    return text


def combine(probs: list[np.ndarray], masks: list[np.ndarray], rule: str = "majority",
            threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, str]:
    """Pure combination: ``(mean probability float32, uint8 mask, description of the rule used)``."""
    if not probs or len(probs) != len(masks):
        raise ValueError("need one probability map and one mask per member")
    n = len(probs)
    prob = np.mean(np.stack([np.asarray(p, dtype=np.float32) for p in probs]), axis=0).astype(np.float32)
    if rule not in ("majority", "mean"):
        raise ValueError(f"unknown ensemble rule {rule!r}; choose majority or mean")
    text = rule_text(n, rule, threshold)
    if n == 1:
        return prob, (np.asarray(masks[0]) > 0).astype(np.uint8), text
    if rule == "mean":
        return prob, (prob >= threshold).astype(np.uint8), text
    votes = np.sum(np.stack([np.asarray(m) > 0 for m in masks]), axis=0)
    mask = 2 * votes > n
    if n % 2 == 0:
        mask |= (2 * votes == n) & (prob >= 0.5)
    return prob, mask.astype(np.uint8), text


def _dice(a, b) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


class _EnsembleInputSpec(DecisionInputSpec):
    prob_files = InputMultiObject(File(exists=True), mandatory=True, desc="one probability map per member")
    mask_files = InputMultiObject(File(exists=True), mandatory=True, desc="one mask per member")
    members = traits.List(traits.Str, desc="member names, in the order of the files")
    rule = traits.Enum("majority", "mean", usedefault=True, desc="how masks are combined")
    threshold = traits.Range(0.0, 1.0, 0.5, usedefault=True, desc="threshold of the 'mean' rule")


class _EnsembleOutputSpec(DecisionOutputSpec):
    prob_file = File(exists=True, desc="mean probability (float32, DWI grid)")
    mask_file = File(exists=True, desc="ensemble lesion mask (uint8, DWI grid)")
    rule_used = traits.Str(desc="the rule actually applied")


class EnsembleMembers(DecisionInterface):
    """Mean probability and vote of the member masks; one member is passed through unchanged."""

    input_spec = _EnsembleInputSpec
    output_spec = _EnsembleOutputSpec
    step = "ensemble"
    title = "Ensemble"

    def _run_step(self, runtime):
        probs_in, masks_in = list(self.inputs.prob_files), list(self.inputs.mask_files)
        n = len(probs_in)
        members = list(self.inputs.members) if self.inputs.members else [f"member{i + 1}" for i in range(n)]
        if len(masks_in) != n or len(members) != n:
            raise DeepIslesError(f"ensemble: {n} probability maps, {len(masks_in)} masks and "
                                 f"{len(members)} member names; they must match one to one")
        cwd = Path(runtime.cwd)
        out_prob, out_mask = cwd / "ensemble_prob.nii.gz", cwd / "ensemble_mask.nii.gz"
        self.record("members", members)
        if n == 1:
            shutil.copyfile(probs_in[0], out_prob)
            shutil.copyfile(masks_in[0], out_mask)
            rule_used = "identity (single member)"
            self.decide(f"One member ('{members[0]}'): its probability map and mask are the result.")
        else:
            ref_img, probs, masks = None, [], []
            for name, pf, mf in zip(members, probs_in, masks_in):
                p_img, p = load_nifti(pf)
                m_img, m = load_nifti(mf)
                ref_img = p_img if ref_img is None else ref_img
                for path, img in ((pf, p_img), (mf, m_img)):
                    if img.shape[:3] != ref_img.shape[:3] or not np.allclose(img.affine, ref_img.affine, atol=1e-3):
                        raise InputError(path, f"member '{name}' output is not on the grid of the first member")
                probs.append(p.reshape(ref_img.shape[:3]))
                masks.append(np.nan_to_num(m.reshape(ref_img.shape[:3])) > 0)
            prob, mask, rule_used = combine(probs, masks, self.inputs.rule, float(self.inputs.threshold))
            save_nifti_atomic(new_image(prob, ref_img, dtype=np.float32), out_prob)
            save_nifti_atomic(new_image(mask, ref_img, dtype=np.uint8), out_mask)
            counts = {name: int(m.sum()) for name, m in zip(members, masks)}
            agreement = {f"{a}~{b}": round(_dice(masks[i], masks[j]), 4)
                         for i, a in enumerate(members) for j, b in enumerate(members) if i < j}
            self.record("member_lesion_voxels", counts)
            self.record("pairwise_dice", agreement)
            self.record("ensemble_lesion_voxels", int(mask.sum()))
            self.decide(f"{n} members ({', '.join(members)}): probability = mean; mask = {rule_used}.")
            self.decide("Lesion voxels per member: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                        + f"; ensemble {int(mask.sum())}.")
            low = [k for k, v in agreement.items() if v < 0.5 and (counts[k.split('~')[0]] or counts[k.split('~')[1]])]
            if low:
                self.decide("Members disagree (Dice < 0.5): " + ", ".join(f"{k} {agreement[k]:.2f}" for k in low),
                            "warning")
        self.record("rule", rule_used)
        self._results.update(prob_file=str(out_prob), mask_file=str(out_mask), rule_used=rule_used)
        return runtime
