"""bids_app/evaluate.py: ISLES'22 metrics on hand-made masks, the real expert mask, pairing and TSV."""

import argparse
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from bids_app import evaluate as E
from bids_app.errors import NoDataError, UsageError

SAMPLE = Path(__file__).parents[1] / "bids_app/data/demo/isles22-sample"
EXPERT = SAMPLE / "derivatives/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_msk.nii.gz"


def _vol(shape=(10, 10, 10)):
    return np.zeros(shape, np.uint8)


def test_two_gt_blobs_one_hit_one_false_positive():
    gt, pred = _vol(), _vol()
    gt[1:3, 1:3, 1:3] = 1           # blob A, 8 voxels
    gt[7:9, 7:9, 7:9] = 1           # blob B, 8 voxels (missed)
    pred[2:4, 1:3, 1:3] = 1         # hits A with 4 voxels
    pred[1, 8, 8] = 1               # touches no GT voxel
    # TP 1, FN 1, FP 1 -> 1 / (1 + (1 + 1) / 2) = 0.5
    assert E.lesion_counts(pred, gt) == (1, 1, 1) and E.lesion_f1(pred, gt) == 0.5
    pred[8, 8, 8] = 1               # now touches B: TP 2, FP 1, FN 0
    assert E.lesion_counts(pred, gt) == (2, 1, 0)
    pred[8, 8, 8] = 0
    assert E.dice(pred, gt) == pytest.approx(2 * 4 / (16 + 9))
    assert E.volume_difference_ml(pred, gt, 0.008) == pytest.approx(7 * 0.008)
    assert E.lesion_count_difference(pred, gt) == 0


def test_both_empty_and_one_empty():
    empty, blob = _vol(), _vol()
    blob[2:4, 2:4, 2:4] = 1
    assert E.dice(empty, empty) == 1.0 and E.lesion_f1(empty, empty) == 1.0
    assert E.volume_difference_ml(empty, empty, 1.0) == 0 and E.lesion_count_difference(empty, empty) == 0
    # prediction empty: FN 1 -> 0 / (0 + 0.5) = 0
    assert E.dice(empty, blob) == 0.0 and E.lesion_f1(empty, blob) == 0.0
    assert E.lesion_count_difference(empty, blob) == 1
    assert E.volume_difference_ml(empty, blob, 0.001) == pytest.approx(0.008)
    two = blob.copy()
    two[7, 7, 7] = 1
    assert E.dice(two, empty) == 0.0 and E.lesion_f1(two, empty) == 0.0  # FP 2
    assert E.lesion_count_difference(two, empty) == 2


def test_26_connectivity_diagonal():
    gt, pred = _vol(), _vol()
    gt[1, 1, 1] = gt[2, 2, 2] = 1   # corner neighbours: one lesion with 26-, two with 6-connectivity
    pred[1, 1, 1] = 1
    assert ndimage.label(gt)[1] == 2 and E.count_lesions(gt) == 1
    assert E.lesion_count_difference(pred, gt) == 0     # 6-connectivity would give 1
    assert E.lesion_f1(pred, gt) == 1.0                  # 6-connectivity would give 1 / 1.5
    far = _vol()
    far[3, 3, 3] = 1                                     # 26-neighbour of GT, but touches no GT voxel
    assert E.lesion_f1(far, gt) == 0.0                   # TP 0, FN 1, FP 1


def test_split_and_merged_components():
    gt, pred = _vol(), _vol()
    gt[2:8, 2:4, 2:4] = 1
    pred[2:4, 2:4, 2:4] = pred[6:8, 2:4, 2:4] = 1  # two predicted pieces of one lesion
    assert E.lesion_f1(pred, gt) == 1.0 and E.lesion_count_difference(pred, gt) == 1
    # one predicted component covering two GT lesions: both TP
    assert E.lesion_f1(gt, pred) == 1.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        E.dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_load_mask_3d_drops_singleton_axes_and_names_bad_files(tmp_path):
    from bids_app.errors import InputError

    data = np.zeros((4, 5, 6, 1, 1), dtype=np.uint8)
    data[1, 2, 3] = 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "ok_mask.nii.gz")
    _, got = E.load_mask_3d(tmp_path / "ok_mask.nii.gz")
    assert got.shape == (4, 5, 6) and int(got.sum()) == 1
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), dtype=np.uint8), np.eye(4)), tmp_path / "two_mask.nii.gz")
    with pytest.raises(InputError, match="two_mask.nii.gz") as err:
        E.load_mask_3d(tmp_path / "two_mask.nii.gz")
    assert "3-D mask" in str(err.value)


def test_expert_mask_against_itself():
    res = E.evaluate_case(EXPERT, EXPERT)
    assert res["dice"] == 1.0 and res["lesion_f1"] == 1.0
    assert res["abs_volume_diff_ml"] == 0 and res["abs_lesion_count_diff"] == 0
    assert res["ref_lesions"] == 18   # 26-connectivity (21 with 6-connectivity)
    assert (res["tp_lesions"], res["fp_lesions"], res["fn_lesions"]) == (18, 0, 0)
    assert res["ref_volume_ml"] == pytest.approx(523 * 0.008) and res["note"] == ""


def _save(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.uint8), affine), path)
    return path


def test_expert_mask_against_shifted_copy(tmp_path):
    img = nib.load(EXPERT)
    gt = np.asanyarray(img.dataobj) > 0
    shifted = np.roll(gt, 1, axis=0)
    assert not gt[-1].any()  # nothing leaves the field of view
    overlap = int((gt & shifted).sum())
    by_data = E.evaluate_case(_save(tmp_path / "a.nii.gz", shifted, img.affine), EXPERT)
    assert by_data["dice"] == pytest.approx(2 * overlap / (2 * 523))
    assert by_data["abs_volume_diff_ml"] == 0 and by_data["note"] == ""
    assert 0 < by_data["dice"] < 1
    # same data, origin moved by one voxel along i: resampled onto the reference grid, same result
    moved = img.affine.copy()
    moved[:3, 3] += img.affine[:3, 0]
    by_grid = E.evaluate_case(_save(tmp_path / "b.nii.gz", gt, moved), EXPERT)
    assert "resampled" in by_grid["note"]
    for key in E.METRICS:
        assert by_grid[key] == pytest.approx(by_data[key])


def test_finer_prediction_grid_resampled(tmp_path):
    img = nib.load(EXPERT)
    gt = (np.asanyarray(img.dataobj) > 0)[40:70, 40:80, 20:50]
    aff = img.affine.copy()
    aff[:3, 3] = img.affine[:3, :3] @ [40, 40, 20] + img.affine[:3, 3]
    fine = np.repeat(np.repeat(np.repeat(gt, 2, 0), 2, 1), 2, 2)
    fine_aff = aff @ np.array([[0.5, 0, 0, -0.25], [0, 0.5, 0, -0.25], [0, 0, 0.5, -0.25], [0, 0, 0, 1]])
    res = E.evaluate_case(_save(tmp_path / "fine.nii.gz", fine, fine_aff), _save(tmp_path / "gt.nii.gz", gt, aff))
    assert res["dice"] == 1.0 and "resampled" in res["note"]


def _layout(tmp_path):
    deriv, ref = tmp_path / "deriv", tmp_path / "ref"
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    blob = _vol()
    blob[2:5, 2:5, 2:5] = 1
    half = blob.copy()
    half[2] = 0
    p = _save(deriv / "sub-01/ses-1/dwi/sub-01_ses-1_label-lesion_mask.nii.gz", blob, aff)
    _save(deriv / "sub-01/ses-1/dwi/sub-01_ses-1_desc-brain_mask.nii.gz", np.ones((10, 10, 10)), aff)
    _save(deriv / "sub-01/ses-1/dwi/sub-01_ses-1_label-lesion_desc-seals_mask.nii.gz", half, aff)
    _save(deriv / "sub-02/dwi/sub-02_label-lesion_mask.nii.gz", half, aff)
    _save(deriv / "sub-03/ses-1/dwi/sub-03_ses-1_label-lesion_mask.nii.gz", blob, aff)
    _save(ref / "sub-01/ses-1/sub-01_ses-1_msk.nii.gz", blob, aff)
    _save(ref / "sub-02/anat/sub-02_label-lesion_mask.nii.gz", blob, aff)
    _save(ref / "sub-02/anat/sub-02_desc-brain_mask.nii.gz", np.ones((10, 10, 10)), aff)
    _save(ref / "sub-04/ses-1/sub-04_ses-1_msk.nii.gz", blob, aff)
    return deriv, ref, p


def test_find_pairs(tmp_path):
    deriv, ref, p = _layout(tmp_path)
    pairs = {(x.subject, x.session): x for x in E.find_pairs(deriv, ref)}
    assert set(pairs) == {("01", "1"), ("02", None), ("03", "1"), ("04", "1")}
    assert pairs[("01", "1")].prediction == p and pairs[("01", "1")].reference.name == "sub-01_ses-1_msk.nii.gz"
    assert pairs[("02", None)].reference.name == "sub-02_label-lesion_mask.nii.gz"
    assert pairs[("03", "1")].reference is None and pairs[("04", "1")].prediction is None
    seals = {(x.subject, x.session): x for x in E.find_pairs(deriv, ref, desc="seals")}
    assert seals[("01", "1")].prediction.name == "sub-01_ses-1_label-lesion_desc-seals_mask.nii.gz"
    with pytest.raises(UsageError, match="not found"):
        E.find_pairs(tmp_path / "nope", ref)


def test_run_evaluate_table(tmp_path):
    deriv, ref, _ = _layout(tmp_path)
    out = tmp_path / "out" / "eval.tsv"
    df = E.run_evaluate(deriv, ref, out)
    assert list(df["case"]) == ["sub-01_ses-1", "sub-02", "sub-03_ses-1", "sub-04_ses-1", "mean", "median"]
    rows = df.set_index("case")
    assert rows.loc["sub-01_ses-1", "dice"] == 1.0
    assert rows.loc["sub-02", "dice"] == pytest.approx(2 * 18 / (18 + 27))
    assert np.isnan(rows.loc["sub-03_ses-1", "dice"]) and "no reference" in rows.loc["sub-03_ses-1", "note"]
    assert "no app mask" in rows.loc["sub-04_ses-1", "note"]
    assert rows.loc["mean", "dice"] == pytest.approx((1 + 0.8) / 2)
    assert rows.loc["median", "abs_volume_diff_ml"] == pytest.approx(9 * 0.008 / 2)
    back = pd.read_csv(out, sep="\t", na_values="n/a", keep_default_na=False)
    assert list(back.columns) == list(E.COLUMNS) and len(back) == 6
    assert "n/a" in out.read_text()
    assert not list(out.parent.glob("*.part"))


def test_missing_prediction_counts_as_empty_when_asked(tmp_path):
    """A failed subject can make a cohort look better by dropping out of the mean: --missing-as-empty."""
    deriv, ref, _ = _layout(tmp_path)
    rows = E.run_evaluate(deriv, ref, tmp_path / "e.tsv", missing_as_empty=True).set_index("case")
    assert rows.loc["sub-04_ses-1", "dice"] == 0.0 and rows.loc["sub-04_ses-1", "fn_lesions"] == 1
    assert rows.loc["sub-04_ses-1", "lesion_f1"] == 0.0
    assert "scored as an empty mask" in rows.loc["sub-04_ses-1", "note"]
    assert rows.loc["mean", "dice"] == pytest.approx((1 + 0.8 + 0) / 3)
    assert np.isnan(rows.loc["sub-03_ses-1", "dice"])  # no reference: still not scored


def test_run_evaluate_no_pairs(tmp_path):
    deriv, ref, _ = _layout(tmp_path)
    shutil.rmtree(ref)
    ref.mkdir()
    with pytest.raises(NoDataError):
        E.run_evaluate(deriv, ref, tmp_path / "x.tsv")


def test_cli_on_demo_case(tmp_path, capsys):
    deriv = tmp_path / "deriv"
    app_mask = deriv / "sub-strokecase0009/ses-0001/dwi/sub-strokecase0009_ses-0001_label-lesion_mask.nii.gz"
    app_mask.parent.mkdir(parents=True)
    shutil.copyfile(EXPERT, app_mask)
    assert E.main_evaluate([str(deriv), str(SAMPLE)]) == 0
    df = pd.read_csv(deriv / "evaluation.tsv", sep="\t")
    assert df.loc[0, "dice"] == 1.0 and df.loc[0, "case"] == "sub-strokecase0009_ses-0001"
    assert "1 case(s) evaluated" in capsys.readouterr().out
    parser = argparse.ArgumentParser()
    E.add_evaluate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", str(deriv), str(SAMPLE / "derivatives"), "-o", str(tmp_path / "e.tsv")])
    assert args.func(args) == 0 and (tmp_path / "e.tsv").is_file()
    with pytest.raises(UsageError):
        E.main_evaluate(["only-one-arg"])
