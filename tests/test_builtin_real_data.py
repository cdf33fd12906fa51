"""Labelled real cases for fine-tuning (``models/builtin/real_data.py``): any layout the app reads,
preprocessed exactly as the app does before the model."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from models.builtin.real_data import find_cases, load_case, prepare_case
from nodes.normalize import normalize
from tests.test_invariance import run_chain

ROOT = Path(__file__).resolve().parents[1]
SOOP = ROOT / "bids_app" / "data" / "demo" / "soop-sub-3"
SAMPLE = ROOT / "bids_app" / "data" / "demo" / "isles22-sample"


def test_finds_dcm2niix_names_and_a_bids_lesion_mask():
    (case,) = find_cases(SOOP)
    assert case["id"] == "sub-3"
    assert case["dwi"].name == "sub-3_rec-TRACE_dwi.nii.gz" and case["adc"].name == "sub-3_rec-ADC_dwi.nii.gz"
    assert case["mask"].name == "sub-3_space-TRACE_desc-lesionAcute_mask.nii.gz"


def test_no_mask_no_case(tmp_path):
    import shutil

    shutil.copytree(SOOP, tmp_path / "soop", ignore=shutil.ignore_patterns("derivatives"))
    with pytest.raises(FileNotFoundError, match="no session"):
        find_cases(tmp_path / "soop")


def test_the_apps_own_masks_are_never_references(tmp_path):
    """A derivatives folder written by this app inside the dataset: its label-lesion masks would
    outrank the expert's ``desc-lesionAcute_mask``; they must be ignored."""
    import json
    import shutil

    from bids_app import APP_NAME

    root = tmp_path / "soop"
    shutil.copytree(SOOP, root)
    app = root / "derivatives" / "deepisles" / "sub-3" / "dwi"
    app.mkdir(parents=True)
    (app.parents[1] / "dataset_description.json").write_text(json.dumps(
        {"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": APP_NAME}]}))
    shutil.copy(find_cases(SOOP)[0]["mask"], app / "sub-3_label-lesion_mask.nii.gz")
    (case,) = find_cases(root)
    assert case["mask"].name == "sub-3_space-TRACE_desc-lesionAcute_mask.nii.gz"


def test_preprocessing_is_the_apps(tmp_path):
    """Skull on, ADC in 1e-6 mm2/s, 4-D files: the same normalised arrays as the app's own steps."""
    (case,) = find_cases(SOOP)
    dwi_n, adc_n, affine = prepare_case(case["dwi"], case["adc"])
    files = run_chain(case["dwi"], case["adc"], tmp_path / "work")
    arr = {k: np.asanyarray(nib.load(str(files[k])).dataobj) for k in ("trace", "adc", "brain")}
    app_dwi, app_adc, _ = normalize(arr["trace"], arr["adc"], arr["brain"])
    assert np.array_equal(dwi_n, app_dwi) and np.array_equal(adc_n, app_adc)
    assert np.allclose(affine, nib.load(str(files["trace"])).affine)
    brain_ml = float((arr["brain"] > 0).sum()) * np.prod(nib.load(str(files["brain"])).header.get_zooms()[:3]) / 1000
    assert 800 < brain_ml < 2000  # the skull was removed
    assert 0.6 < float(np.median(adc_n[arr["brain"] > 0])) < 1.2  # units harmonised


def test_mask_reaches_the_model_grid_with_its_volume():
    (case,) = find_cases(SOOP)
    x, y = load_case(case)
    ref = nib.load(str(case["mask"]))
    ref_ml = float((np.asanyarray(ref.dataobj) > 0).sum()) * np.prod(ref.header.get_zooms()[:3]) / 1000
    assert x.shape[0] == 2 and y.shape[0] == 1 and x.shape[1:] == y.shape[1:]
    assert abs(float(y.sum()) * 0.008 - ref_ml) < 0.05 * ref_ml  # resampled 0.9 x 0.9 x 6 mm -> 2 mm
    assert float(x[0][y[0] > 0].mean()) > 1.3 * float(x[0][(x[1] > 0) & (y[0] == 0)].mean())  # bright on trace


@pytest.mark.skipif(not SAMPLE.exists(), reason="no sample")
def test_skull_stripped_isles_case_is_reoriented_exactly():
    (case,) = find_cases(SAMPLE)
    x, y = load_case(case)
    assert int(y.sum()) == 523 and tuple(x.shape[1:]) == (112, 112, 73)


@pytest.mark.skipif(not SAMPLE.exists(), reason="no sample")
def test_train_eval_real_reads_both_layouts():
    """``train.py --eval-real``: the shipped weights' plain 0.5 mask scored on either demo case."""
    from models.builtin import predictor as bp
    from models.builtin.train import eval_real
    from models.builtin.weights_file import read_verified

    if not bp.DEFAULT_WEIGHTS.is_file():
        pytest.skip("built-in weights not present")
    meta, state = read_verified(bp.DEFAULT_WEIGHTS)
    soop = eval_real(state, meta["hparams"], SOOP, roi=tuple(meta["patch"]))
    isles = eval_real(state, meta["hparams"], SAMPLE, roi=tuple(meta["patch"]))
    assert soop["dice"] > 0.6 and isles["dice"] > 0.3, (soop, isles)
    assert abs(isles["gt_ml"] - 4.184) < 1e-6  # 523 voxels of 8 ul, on the case's own grid
