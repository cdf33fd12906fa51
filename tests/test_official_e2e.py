"""The official ensemble end to end through the CLI, on fake weights in the exact official layout.

One subject with FLAIR (SEALS + NVAUTO + FACTORIZER, majority vote) and one without FLAIR (SEALS +
NVAUTO, the documented two-member rule).
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.cli import main
from nodes.ensemble import combine
from tests.datasets import make_isles22
from tests.fake_weights.factorizer import make_fake_factorizer
from tests.fake_weights.nvauto import make_fake_nvauto
from tests.fake_weights.seals import make_fake_seals


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("official")
    weights = base / "weights"
    make_fake_seals(weights, patch=(64, 64, 64))
    make_fake_nvauto(weights)
    make_fake_factorizer(weights)
    bids = base / "bids"
    make_isles22(bids, subjects=("flair",), sessions=False, flair=True)
    make_isles22(bids, subjects=("noflair",), sessions=False, flair=False)
    for image in bids.glob("sub-*/dwi/*.nii.gz"):  # a 96x96x64 mm field of view keeps it quick
        _crop_centre(image, (24, 24, 16))
    out = base / "out"
    code = main([str(bids), str(out), "participant", "-w", str(base / "work"), "--nprocs", "1",
                 "--weights-dir", str(weights)])
    return {"code": code, "out": out, "bids": bids}


def _crop_centre(path: Path, size) -> None:
    img = nib.load(path)
    start = [(n - k) // 2 for n, k in zip(img.shape, size)]
    crop = img.slicer[tuple(slice(a, a + k) for a, k in zip(start, size))]
    nib.save(nib.Nifti1Image(np.asarray(crop.dataobj), crop.affine), path)


def _mask(out: Path, subject: str, desc: str | None = None, suffix: str = "mask"):
    desc_part = f"_desc-{desc}" if desc else ""
    path = out / f"sub-{subject}" / "dwi" / f"sub-{subject}_label-lesion{desc_part}_{suffix}.nii.gz"
    return path, np.asarray(nib.load(path).dataobj)


def test_run_succeeds(run):
    assert run["code"] == 0


def test_three_members_and_majority_vote_with_flair(run):
    members = ("seals", "nvauto", "factorizer")
    masks = [_mask(run["out"], "flair", m)[1] for m in members]
    probs = [_mask(run["out"], "flair", m, "probseg")[1] for m in members]
    path, final = _mask(run["out"], "flair")
    votes = np.sum([m > 0 for m in masks], axis=0)
    assert np.array_equal(final > 0, votes >= 2)
    mean_prob, _, _ = combine(probs, masks, "majority")
    assert np.allclose(_mask(run["out"], "flair", suffix="probseg")[1], mean_prob, atol=1e-6)
    sidecar = json.loads(path.with_suffix("").with_suffix(".json").read_text())
    assert [m["name"] for m in sidecar["Models"]] == list(members)
    assert sidecar["EnsembleRule"] == "majority vote (>= 2 of 3)"
    assert sorted(sidecar["PostProcessingApplied"]) == sorted(members)
    assert any(s.endswith("_FLAIR.nii.gz") for s in sidecar["Sources"])  # FACTORIZER read it
    member = json.loads(_mask(run["out"], "flair", "seals")[0].with_suffix("").with_suffix(".json").read_text())
    assert [m["name"] for m in member["Models"]] == ["seals"] and list(member["PostProcessingApplied"]) == ["seals"]
    assert not any(s.endswith("_FLAIR.nii.gz") for s in member["Sources"])  # SEALS did not


def test_without_flair_seals_and_nvauto_only(run):
    out = run["out"]
    assert not (out / "sub-noflair/dwi/sub-noflair_label-lesion_desc-factorizer_mask.nii.gz").exists()
    masks = [_mask(out, "noflair", m)[1] for m in ("seals", "nvauto")]
    probs = [_mask(out, "noflair", m, "probseg")[1] for m in ("seals", "nvauto")]
    _, expected, _ = combine(probs, masks, "majority")
    assert np.array_equal(_mask(out, "noflair")[1], expected)
    report = (out / "sub-noflair.html").read_text()
    assert "factorizer" in report and "FLAIR" in report
    sidecar = json.loads((out / "sub-noflair/dwi/sub-noflair_label-lesion_mask.json").read_text())
    assert [m["name"] for m in sidecar["Models"]] == ["seals", "nvauto"]  # only the members that ran
    assert sidecar["EnsembleRule"].startswith("majority vote (>= 2 of 2); ties")


def test_provenance_lists_every_weight_file(run):
    desc = json.loads((run["out"] / "dataset_description.json").read_text())
    models = {m["name"]: m for m in desc["GeneratedBy"][0]["Models"]}
    assert set(models) == {"seals", "nvauto", "factorizer"}
    assert len(models["nvauto"]["weights_sha256"]) == 15
    assert len(models["factorizer"]["weights_sha256"]) == 10
    assert len(models["seals"]["weights_sha256"]) == 11
