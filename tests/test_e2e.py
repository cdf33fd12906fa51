"""End to end: one dataset mixing the four layouts, participant then group level, through the CLI."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_app.cli import main
from bids_app.evaluate import dice
from bids_app.report.subject import read_report_status
from tests.datasets import make_bids_trace, make_isles22, make_raw_dwi, make_rec_trace

ROOT = Path(__file__).resolve().parents[1]
EXPERT = (ROOT / "bids_app/data/demo/isles22-sample/derivatives/sub-strokecase0009/ses-0001/"
          "sub-strokecase0009_ses-0001_msk.nii.gz")
SUBJECTS = {  # subject -> (session or None, layout)
    "isles": ("0001", "isles22"),
    "bids": (None, "bids-trace"),
    "raw": ("1", "raw-dwi"),
    "rec": (None, "rec-trace"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    bids = base / "bids"
    make_isles22(bids, subjects=("isles",), sessions=["0001"], flair=False, step=1)
    make_bids_trace(bids, subjects=("bids",), sessions=False, flair=True, adc_scale=1e3)
    make_rec_trace(bids, subjects=("rec",), sessions=False)  # 4-D with one volume, ADC in 1e-6 mm2/s
    make_raw_dwi(bids, subjects=("raw",), sessions=["1"])
    out, work = base / "out", base / "work"
    code = main([str(bids), str(out), "participant", "-w", str(work), "--nprocs", "2"])
    group_code = main([str(bids), str(out), "group"])
    return {"bids": bids, "out": out, "work": work, "code": code, "group_code": group_code}


def _prefix(subject):
    ses = SUBJECTS[subject][0]
    folder = f"sub-{subject}/ses-{ses}/dwi" if ses else f"sub-{subject}/dwi"
    name = f"sub-{subject}_ses-{ses}" if ses else f"sub-{subject}"
    return folder, name


def _input_dwi(bids, subject):
    folder, name = _prefix(subject)
    suffix = {"bids": "trace", "rec": "rec-TRACE_dwi"}.get(subject, "dwi")
    return bids / folder / f"{name}_{suffix}.nii.gz"


def test_exit_codes(run):
    assert run["code"] == 0
    assert run["group_code"] == 0


@pytest.mark.parametrize("subject", sorted(SUBJECTS))
def test_masks_on_the_input_grid(run, subject):
    folder, name = _prefix(subject)
    mask_path = run["out"] / folder / f"{name}_label-lesion_mask.nii.gz"
    mask, src = nib.load(mask_path), nib.load(_input_dwi(run["bids"], subject))
    assert mask.shape == src.shape[:3]
    assert np.array_equal(mask.affine, src.affine)
    assert mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    sidecar = json.loads(mask_path.with_name(f"{name}_label-lesion_mask.json").read_text())
    assert sidecar["Type"] == "Lesion" and sidecar["Models"][0]["name"] == "builtin"
    assert len(sidecar["Models"][0]["weights_sha256"]) == 64
    assert sidecar["PostProcessing"] == {"MinLesionMl": None, "ContrastCheck": "auto", "GrowLesions": "auto",
                                         "DetectLesions": "auto", "MirrorCheck": "off"}
    applied = sidecar["PostProcessingApplied"]["builtin"]  # "auto" resolved from the weights' sidecar
    assert applied["threshold"] == 0.5 and applied["grow_lesions"] in ("on", "off")
    assert applied["contrast_check"] in ("on", "off") and applied["detect_lesions"] in ("on", "off")
    assert ("grow_low" in applied) == (applied["grow_lesions"] == "on")
    assert sidecar["EnsembleRule"] == "identity (single member)"
    for suffix in ("label-lesion_probseg.nii.gz", "desc-preproc_trace.nii.gz",
                   "desc-preproc_ADC.nii.gz", "desc-brain_mask.nii.gz", "desc-lesion_stats.tsv"):
        assert (run["out"] / folder / f"{name}_{suffix}").is_file(), suffix
    stats_dictionary = json.loads((run["out"] / folder / f"{name}_desc-lesion_stats.json").read_text())
    assert stats_dictionary["total_volume_ml"]["Units"] == "mL" and "voxel_volume_ml" in stats_dictionary
    assert "*_stats.tsv" in (run["out"] / ".bidsignore").read_text()
    methods = (run["out"] / f"sub-{subject}.html").read_text().split('id="methods"')[1]
    assert "built-in model of the DeepISLES BIDS App" in methods and "an implementation of DeepISLES" not in methods
    prob = nib.load(run["out"] / folder / f"{name}_label-lesion_probseg.nii.gz")
    assert prob.shape == src.shape[:3] and np.array_equal(prob.affine, src.affine)
    values = np.asarray(prob.dataobj)
    assert values.min() >= 0 and values.max() <= 1


@pytest.mark.parametrize("subject", sorted(SUBJECTS))
def test_report_names_layout_and_decisions(run, subject):
    report = run["out"] / f"sub-{subject}.html"
    html = report.read_text()
    assert SUBJECTS[subject][1] in html
    statuses = read_report_status(report)
    assert statuses and all(status.lower() != "failed" for status in statuses.values()), statuses
    assert list((run["out"] / f"sub-{subject}" / "figures").glob("*.png"))


def test_decisions_follow_the_inputs(run):
    reportlets = run["work"] / "reportlets"
    units = json.loads((reportlets / "sub-bids" / "adc_units.json").read_text())
    assert units["values"]["scale"] == pytest.approx(1e-3)
    units = json.loads((reportlets / "sub-rec" / "adc_units.json").read_text())
    assert units["values"]["scale"] == pytest.approx(1e-3)
    strip_raw = json.loads((reportlets / "sub-raw" / "ses-1" / "skullstrip.json").read_text())
    assert strip_raw["values"]["skull_stripped_input"] is False
    assert strip_raw["values"]["method"].startswith("median_otsu")
    strip_isles = json.loads((reportlets / "sub-isles" / "ses-0001" / "skullstrip.json").read_text())
    assert strip_isles["values"]["skull_stripped_input"] is True


def test_real_case_lesion_found(run):
    """The embedded real case (never used in training): the built-in model finds its lesion."""
    folder, name = _prefix("isles")
    pred = np.asarray(nib.load(run["out"] / folder / f"{name}_label-lesion_mask.nii.gz").dataobj) > 0
    expert = np.asarray(nib.load(EXPERT).dataobj) > 0
    assert dice(pred, expert) > 0.08  # built-in v1 scores 0.15 (MODEL_CARD.md); the floor catches breakage


def test_group_table_and_description(run):
    table = pd.read_csv(run["out"] / "group_lesions.tsv", sep="\t", dtype=str)
    assert sorted(table["participant_id"]) == ["sub-bids", "sub-isles", "sub-raw", "sub-rec"]
    columns = json.loads((run["out"] / "group_lesions.json").read_text())
    assert set(table.columns) <= set(columns)
    assert (run["out"] / "group_lesions.html").is_file()
    desc = json.loads((run["out"] / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert not list(run["out"].rglob("*.part"))


def test_input_dataset_untouched(run):
    assert not [p for p in run["bids"].rglob("*") if "derivatives" in p.parts and p.is_dir()
                and p.name == "deepisles"]
    assert not list(run["bids"].rglob("*.html"))


def test_reports_only_rewrites_reports(run):
    report = run["out"] / "sub-isles.html"
    report.unlink()
    code = main([str(run["bids"]), str(run["out"]), "participant", "-w", str(run["work"]),
                 "--reports-only"])
    assert code == 0 and report.is_file()
