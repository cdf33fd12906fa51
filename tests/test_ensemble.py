"""nodes/ensemble.py: identity for one member, mean probability, majority vote with tie rule."""

import nibabel as nib
import numpy as np
import pytest

from bids_app.errors import DeepIslesError, InputError
from nodes.ensemble import EnsembleMembers, combine

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def test_combine_three_members_majority():
    m = [np.array([1, 1, 0, 0, 1]), np.array([1, 0, 1, 0, 0]), np.array([0, 1, 1, 0, 0])]
    p = [np.array([0.9, 0.8, 0.1, 0.0, 0.7]), np.array([0.6, 0.2, 0.9, 0.0, 0.4]),
         np.array([0.3, 0.9, 0.8, 0.0, 0.1])]
    prob, mask, rule = combine(p, m)
    assert mask.tolist() == [1, 1, 1, 0, 0]  # >= 2 of 3 votes; 1 vote never enough
    assert np.allclose(prob, [0.6, 19 / 30, 0.6, 0.0, 0.4]) and prob.dtype == np.float32
    assert rule == "majority vote (>= 2 of 3)"


def test_combine_two_members_tie_broken_by_mean_probability():
    m = [np.array([1, 1, 1, 0]), np.array([1, 0, 0, 0])]
    p = [np.array([0.9, 0.9, 0.6, 0.2]), np.array([0.8, 0.3, 0.3, 0.2])]
    prob, mask, rule = combine(p, m)
    # both agree -> lesion; 1 of 2 -> lesion only if mean prob >= 0.5 (0.6 yes, 0.45 no)
    assert mask.tolist() == [1, 1, 0, 0]
    assert "ties" in rule and "0.5" in rule


def test_combine_mean_rule_and_single_member():
    p = [np.array([0.9, 0.4]), np.array([0.2, 0.4])]
    m = [np.array([1, 0]), np.array([0, 0])]
    _, mask, rule = combine(p, m, rule="mean", threshold=0.4)
    assert mask.tolist() == [1, 1] and rule == "mean probability >= 0.4"
    _, mask, rule = combine(p[:1], [np.array([0, 1])])
    assert mask.tolist() == [0, 1] and rule.startswith("identity")
    with pytest.raises(ValueError):
        combine(p, m[:1])


def _save(tmp_path, name, data, dtype, affine=AFFINE):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), path)
    return str(path)


def _member_files(tmp_path, n=3, shape=(6, 5, 4)):
    rng = np.random.default_rng(0)
    probs, masks = [], []
    for i in range(n):
        p = rng.random(shape).astype(np.float32)
        probs.append(_save(tmp_path, f"p{i}.nii.gz", p, np.float32))
        masks.append(_save(tmp_path, f"m{i}.nii.gz", p >= 0.5, np.uint8))
    return probs, masks


def test_node_single_member_is_a_copy(tmp_path):
    probs, masks = _member_files(tmp_path, n=1)
    out = EnsembleMembers(prob_files=probs, mask_files=masks, members=["builtin"]).run(cwd=str(tmp_path)).outputs
    assert open(out.prob_file, "rb").read() == open(probs[0], "rb").read()
    assert open(out.mask_file, "rb").read() == open(masks[0], "rb").read()
    assert out.rule_used == "identity (single member)"


def test_node_three_members(tmp_path):
    probs, masks = _member_files(tmp_path, n=3)
    rdir = tmp_path / "rep"
    out = EnsembleMembers(prob_files=probs, mask_files=masks, members=["seals", "nvauto", "factorizer"],
                          reportlets_dir=str(rdir)).run(cwd=str(tmp_path)).outputs
    votes = sum(np.asanyarray(nib.load(m).dataobj) for m in masks)
    mean = np.mean([nib.load(p).get_fdata() for p in probs], axis=0)
    mask_img = nib.load(out.mask_file)
    assert mask_img.get_data_dtype() == np.uint8 and np.allclose(mask_img.affine, AFFINE)
    assert np.array_equal(np.asanyarray(mask_img.dataobj), (votes >= 2).astype(np.uint8))
    assert np.allclose(nib.load(out.prob_file).get_fdata(), mean, atol=1e-6)
    assert nib.load(out.prob_file).get_data_dtype() == np.float32
    values = out.decisions["values"]
    assert set(values["member_lesion_voxels"]) == {"seals", "nvauto", "factorizer"}
    assert "seals~nvauto" in values["pairwise_dice"] and (rdir / "ensemble.json").is_file()


def test_node_rejects_mismatched_inputs(tmp_path):
    probs, masks = _member_files(tmp_path, n=2)
    with pytest.raises(DeepIslesError, match="one to one"):
        EnsembleMembers(prob_files=probs, mask_files=masks[:1], members=["a", "b"]).run(cwd=str(tmp_path))
    other = _save(tmp_path, "shifted.nii.gz", np.zeros((6, 5, 4)), np.float32,
                  affine=np.diag([2.0, 2.0, 3.0, 1.0]))
    with pytest.raises(InputError, match="grid"):
        EnsembleMembers(prob_files=[probs[0], other], mask_files=masks, members=["a", "b"]).run(cwd=str(tmp_path))
