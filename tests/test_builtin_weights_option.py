"""``--builtin-weights``: the app runs the built-in model from weights the user trained or joined."""

import html
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.cli import main, parse_config
from bids_app.errors import UsageError
from tests.datasets import make_isles22

pytest.importorskip("monai")

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "builtin" / "weights" / "builtin_v1.pt"
OUT_PROB = "sub-isles/ses-0001/dwi/sub-isles_ses-0001_label-lesion_probseg.nii.gz"
OUT_MASK = "sub-isles/ses-0001/dwi/sub-isles_ses-0001_label-lesion_mask.nii.gz"


def _models(out):
    desc = json.loads((out / "dataset_description.json").read_text())
    return {m["name"]: m for m in desc["GeneratedBy"][0]["Models"]}


def test_the_option_is_checked_when_parsed(tmp_path):
    bids = make_isles22(tmp_path / "bids", subjects=("isles",), sessions=["0001"], flair=False)
    args = [str(bids), str(tmp_path / "out"), "participant"]
    with pytest.raises(UsageError, match="file not found"):
        parse_config(args + ["--builtin-weights", str(tmp_path / "none.pt")])
    lone = tmp_path / "lone.pt"
    shutil.copy(SHIPPED, lone)
    with pytest.raises(UsageError, match="no sidecar lone.json"):
        parse_config(args + ["--builtin-weights", str(lone)])
    shutil.copy(SHIPPED.with_suffix(".json"), lone.with_suffix(".json"))
    assert parse_config(args + ["--builtin-weights", str(lone)]).builtin_weights == lone.absolute()
    assert parse_config(args).builtin_weights is None


def test_user_weights_run_and_are_recorded(tmp_path, capsys):
    """An ensemble of the shipped weights with themselves gives the shipped output bit for bit, and the run
    records the file and its SHA-256; a tampered file stops the run (66) before any subject."""
    from models.builtin.calibrate import write_sidecar_entry
    from models.builtin.ensemble import join

    bids = make_isles22(tmp_path / "bids", subjects=("isles",), sessions=["0001"], flair=False, step=1)
    base = ["participant", "--nprocs", "2"]
    assert main([str(bids), str(tmp_path / "o1"), *base, "-w", str(tmp_path / "w1")]) == 0
    folder = tmp_path / "twice <b>&"  # a path the report must escape
    meta = join([SHIPPED, SHIPPED], folder)
    shipped = json.loads(SHIPPED.with_suffix(".json").read_text())
    mine = folder / "builtin_v1.pt"
    for key in ("calibration", "postprocess"):
        write_sidecar_entry(mine, key, shipped[key])
    assert main([str(bids), str(tmp_path / "o2"), *base, "-w", str(tmp_path / "w2"),
                 "--builtin-weights", str(mine)]) == 0
    for rel in (OUT_PROB, OUT_MASK):
        a, b = (np.asarray(nib.load(tmp_path / o / rel).dataobj) for o in ("o1", "o2"))
        assert np.array_equal(a, b), rel
    assert (np.asarray(nib.load(tmp_path / "o2" / OUT_MASK).dataobj) > 0).any()
    assert "weights_file" not in _models(tmp_path / "o1")["builtin"]
    assert _models(tmp_path / "o1")["builtin"]["weights_sha256"] == shipped["sha256"]
    recorded = _models(tmp_path / "o2")["builtin"]
    assert recorded["weights_file"] == str(mine) and recorded["weights_sha256"] == meta["sha256"]
    side = json.loads((tmp_path / "o2" / OUT_MASK.replace(".nii.gz", ".json")).read_text())
    assert side["Models"][0]["weights_file"] == str(mine)
    report = (tmp_path / "o2" / "sub-isles.html").read_text()  # the segment step's own record
    assert meta["sha256"] in report and shipped["sha256"] not in report
    assert f"the user's weights: <span class=\"mono\">{html.escape(str(mine))}</span>" in report
    assert "twice <b>" not in report

    bad = tmp_path / "bad" / "builtin_v1.pt"
    shutil.copytree(folder, bad.parent)
    with open(bad, "r+b") as fh:
        fh.seek(4000)
        fh.write(b"\x00\x01\x02")
    capsys.readouterr()
    assert main([str(bids), str(tmp_path / "o3"), *base, "-w", str(tmp_path / "w3"),
                 "--builtin-weights", str(bad)]) == 66
    err = capsys.readouterr().err
    assert str(bad) in err and "does not match the sidecar" in err
    assert not list((tmp_path / "o3").glob("sub-*"))


def test_refused_when_the_builtin_model_is_not_a_member(tmp_path, capsys):
    from tests.fake_weights.seals import make_fake_seals

    bids = make_isles22(tmp_path / "bids", subjects=("isles",), sessions=["0001"], flair=False)
    make_fake_seals(tmp_path / "W")
    code = main([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"), "--models", "seals",
                 "--weights-dir", str(tmp_path / "W"), "--builtin-weights", str(SHIPPED)])
    assert code == 64
    assert "not among the members (seals)" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("sub-*"))
