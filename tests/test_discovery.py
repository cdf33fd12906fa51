"""Discovery of the diffusion inputs (bids_app/discovery.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bids_app.discovery import SessionInputs, discover, normalize_label
from bids_app.errors import BIDSValidationError, InputError, NoDataError, UsageError
from tests.datasets import (SAMPLE, make_bids_trace, make_isles22, make_raw_dwi, make_rec_trace, save,
                            write_description)

BUILDERS = {"isles22": make_isles22, "bids-trace": make_bids_trace, "raw-dwi": make_raw_dwi,
            "rec-trace": make_rec_trace}
DWI_ENDING = {"bids-trace": "_trace.nii.gz", "rec-trace": "_rec-TRACE_dwi.nii.gz"}


def _snapshot(root: Path) -> set:
    return {(str(p), p.is_file() and p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("sessions", [True, False])
@pytest.mark.parametrize("layout", sorted(BUILDERS))
def test_layouts(tmp_path, layout, sessions):
    root = BUILDERS[layout](tmp_path / "ds", subjects=("01", "s060"), sessions=sessions)
    before = _snapshot(root)
    found = discover(root)
    assert [(s.subject, s.session, s.layout) for s in found] == [
        ("01", "0001" if sessions else None, layout), ("s060", "0001" if sessions else None, layout)]
    s = found[0]
    assert s.problem is None and s.dwi.exists()
    if layout == "raw-dwi":
        assert s.adc is None and s.bval.name.endswith("_dwi.bval") and s.bvec.name.endswith("_dwi.bvec")
    else:
        assert s.adc.exists() and s.bval is None
        assert s.dwi.name.endswith(DWI_ENDING.get(layout, "_dwi.nii.gz"))
        assert s.notes == []  # rec-TRACE and rec-ADC pair without an entity-mismatch note
    assert (s.flair is not None) == (layout == "bids-trace")
    assert s.entities == ({"subject": "01", "session": "0001"} if sessions else {"subject": "01"})
    d = json.loads(json.dumps(s.to_dict()))
    assert d["dwi"] == str(s.dwi) and d["problem"] is None and d["layout"] == layout
    assert _snapshot(root) == before  # nothing written inside the dataset


def test_demo_sample():
    before = _snapshot(SAMPLE)
    (s,) = discover(SAMPLE)
    assert (s.subject, s.session, s.layout) == ("strokecase0009", "0001", "isles22")
    assert s.adc.name == "sub-strokecase0009_ses-0001_adc.nii.gz"
    assert s.flair.name == "sub-strokecase0009_ses-0001_FLAIR.nii.gz"
    assert s.problem is None and s.bval is None
    assert _snapshot(SAMPLE) == before


def test_normalize_label():
    assert normalize_label("sub-01", "sub") == "01"
    assert normalize_label("01", "sub-") == "01"
    assert normalize_label("s060", "sub") == "s060"
    assert normalize_label("sub-s060", "sub") == "s060"
    assert normalize_label("ses-session1", "ses") == "session1"


def test_labels_with_and_without_prefix(tmp_path):
    root = make_isles22(tmp_path / "ds", subjects=("01", "02", "s060"), sessions=("0001", "0002"))
    assert {s.subject for s in discover(root, ["sub-01", "s060"])} == {"01", "s060"}
    found = discover(root, "02", session_labels=["ses-0002"])
    assert [(s.subject, s.session) for s in found] == [("02", "0002")]


def test_unknown_labels(tmp_path):
    root = make_isles22(tmp_path / "ds", subjects=[f"{i:03d}" for i in range(30)])
    with pytest.raises(NoDataError) as err:
        discover(root, ["sub-999", "060"])
    msg = str(err.value)
    assert "999" in msg and "060" in msg and "sub-000" in msg and "more" in msg
    with pytest.raises(NoDataError, match="session.*0003"):
        discover(root, session_labels=["ses-0003"])


def test_empty_and_missing(tmp_path):
    with pytest.raises(InputError):
        discover(tmp_path / "nope")
    root = write_description(tmp_path / "empty")
    with pytest.raises(NoDataError, match="no diffusion data"):
        discover(root)
    (root / "sub-01" / "anat").mkdir(parents=True)
    save(np.zeros((2, 2, 2)), np.eye(4), root / "sub-01/anat/sub-01_FLAIR.nii.gz")
    with pytest.raises(NoDataError):
        discover(root)


def test_dataset_description_validation(tmp_path):
    root = make_isles22(tmp_path / "ds", sessions=False)
    desc = root / "dataset_description.json"
    desc.unlink()
    with pytest.raises(BIDSValidationError, match="dataset_description.json: missing"):
        discover(root)
    assert discover(root, validate=False)[0].layout == "isles22"
    desc.write_text("{not json")
    with pytest.raises(BIDSValidationError, match="not valid JSON"):
        discover(root)
    desc.write_text('{"Name": "x"}')
    with pytest.raises(BIDSValidationError, match="BIDSVersion"):
        discover(root)
    assert len(discover(root, validate=False)) == 1


def _dup(path: Path, new_name: str) -> Path:
    out = path.with_name(new_name)
    shutil.copy(path, out)
    return out


def test_several_runs_choose_lowest(tmp_path):
    root = make_bids_trace(tmp_path / "ds", sessions=False, flair=False)
    d = root / "sub-01" / "dwi"
    for suffix in ("trace", "ADC"):
        src = d / f"sub-01_{suffix}.nii.gz"
        _dup(src, f"sub-01_run-2_{suffix}.nii.gz")
        _dup(src, f"sub-01_run-1_{suffix}.nii.gz")
        src.unlink()
    (s,) = discover(root)
    assert s.dwi.name == "sub-01_run-1_trace.nii.gz" and s.adc.name == "sub-01_run-1_ADC.nii.gz"
    note = " ".join(s.notes)
    assert "chose sub-01/dwi/sub-01_run-1_trace.nii.gz" in note and "sub-01_run-2_trace.nii.gz" in note
    assert discover(root)[0].to_dict() == s.to_dict()  # deterministic


def test_acq_candidates_and_bids_filter(tmp_path):
    root = make_isles22(tmp_path / "ds", sessions=False)
    d = root / "sub-01" / "dwi"
    for acq in ("x", "y"):
        for suffix in ("dwi", "adc"):
            _dup(d / f"sub-01_{suffix}.nii.gz", f"sub-01_acq-{acq}_{suffix}.nii.gz")
    for suffix in ("dwi", "adc"):
        (d / f"sub-01_{suffix}.nii.gz").unlink()
    (s,) = discover(root)
    assert s.dwi.name == "sub-01_acq-x_dwi.nii.gz" and s.adc.name == "sub-01_acq-x_adc.nii.gz"
    assert any("acq-y_dwi" in n for n in s.notes)
    (s,) = discover(root, bids_filter={"dwi": {"acquisition": "y"}, "adc": {"acquisition": "y"}})
    assert s.dwi.name == "sub-01_acq-y_dwi.nii.gz" and s.adc.name == "sub-01_acq-y_adc.nii.gz"
    assert not s.notes
    with pytest.raises(NoDataError, match="bids_filter"):
        discover(root, bids_filter={k: {"acquisition": "z"} for k in ("dwi", "adc")})
    with pytest.raises(UsageError, match="t1w"):
        discover(root, bids_filter={"t1w": {}})
    with pytest.raises(UsageError):
        discover(root, bids_filter={"dwi": {"notanentity": "1"}})


def test_rec_maps_beside_raw_dwi(tmp_path):
    """``rec-TRACEW``/``rec-ADC`` maps next to the raw series: the scanner's pair is used, the raw
    series is reported as not used; a rec-TRACE without its rec-ADC is a clear problem."""
    root = make_raw_dwi(tmp_path / "ds", sessions=False)
    rec = make_rec_trace(tmp_path / "r", sessions=False, trace_label="TRACEW") / "sub-01" / "dwi"
    for f in rec.iterdir():
        shutil.copy(f, root / "sub-01" / "dwi" / f.name)
    (s,) = discover(root)
    assert s.layout == "rec-trace" and s.bval is None
    assert s.dwi.name == "sub-01_rec-TRACEW_dwi.nii.gz" and s.adc.name == "sub-01_rec-ADC_dwi.nii.gz"
    assert any("sub-01_dwi.nii.gz" in n and "not used" in n for n in s.notes)
    (root / "sub-01" / "dwi" / "sub-01_rec-ADC_dwi.nii.gz").unlink()
    (root / "sub-01" / "dwi" / "sub-01_dwi.nii.gz").unlink()
    (s,) = discover(root)
    assert s.layout == "rec-trace" and s.adc is None
    assert ": missing ADC" in s.problem and s.problem.split(": ")[0].endswith("sub-01_rec-TRACEW_dwi.nii.gz")


def test_trace_pair_preferred_over_raw(tmp_path):
    root = make_raw_dwi(tmp_path / "ds", sessions=False)
    trace = make_bids_trace(tmp_path / "t", sessions=False, flair=False) / "sub-01" / "dwi"
    for f in trace.iterdir():
        shutil.copy(f, root / "sub-01" / "dwi" / f.name)
    (s,) = discover(root)
    assert s.layout == "bids-trace" and s.bval is None
    assert any("sub-01_dwi.nii.gz" in n and "not used" in n for n in s.notes)


def test_broken_symlink_dwi(tmp_path):
    root = make_isles22(tmp_path / "ds", sessions=False)
    dwi = root / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    dwi.unlink()
    os.symlink(tmp_path / "annex" / "MD5E-s1--missing.nii.gz", dwi)
    (s,) = discover(root)
    assert s.layout == "isles22" and s.dwi == dwi and s.problem is None
    assert any("broken symbolic link" in n for n in s.notes)


def test_invalid_sidecars_do_not_stop_discovery(tmp_path):
    root = make_raw_dwi(tmp_path / "ds", subjects=("01", "02"), sessions=False)
    (root / "sub-01" / "dwi" / "sub-01_dwi.json").write_bytes(b"\xff\xfe{not json")
    (root / "sub-02" / "dwi" / "sub-02_dwi.json").write_text("{not json")
    (root / "dwi.json").write_text("[1, 2")  # top-level inherited sidecar, invalid too
    assert [s.layout for s in discover(root)] == ["raw-dwi", "raw-dwi"]


def test_missing_adc_or_dwi_is_a_problem_not_a_crash(tmp_path):
    root = make_isles22(tmp_path / "ds", subjects=("01", "02", "03"), sessions=False)
    (root / "sub-02" / "dwi" / "sub-02_adc.nii.gz").unlink()
    (root / "sub-03" / "dwi" / "sub-03_dwi.nii.gz").unlink()
    one, two, three = discover(root)
    assert one.problem is None
    assert two.adc is None and ": missing ADC: " in two.problem
    assert "sub-02_dwi.nii.gz" in two.problem and ".bval" in two.problem and "\n" not in two.problem
    assert two.problem in two.notes and two.to_dict()["problem"] == two.problem
    assert three.dwi is None and ": missing DWI: " in three.problem and "sub-03_adc" in three.problem.split(": ")[0]


def test_raw_without_bval_is_a_problem(tmp_path):
    root = make_raw_dwi(tmp_path / "ds", sessions=False)
    for ext in ("bval", "bvec"):
        (root / "sub-01" / "dwi" / f"sub-01_dwi.{ext}").unlink()
    (s,) = discover(root)
    assert s.layout == "raw-dwi" and ": missing b-values" in s.problem and "10 volumes" in s.problem


def test_bval_of_another_run_is_not_used(tmp_path):
    root = make_raw_dwi(tmp_path / "ds", sessions=False)
    d = root / "sub-01" / "dwi"
    for ext in ("nii.gz", "bval", "bvec"):
        (d / f"sub-01_dwi.{ext}").rename(d / f"sub-01_run-2_dwi.{ext}")
    _dup(d / "sub-01_run-2_dwi.nii.gz", "sub-01_acq-b_dwi.nii.gz")
    (s,) = discover(root)
    assert s.dwi.name == "sub-01_run-2_dwi.nii.gz" and s.bval.name == "sub-01_run-2_dwi.bval"
    assert any("acq-b" in n for n in s.notes)
    # a top-level (inherited) bval/bvec applies to every DWI
    for ext in ("bval", "bvec"):
        shutil.copy(d / f"sub-01_run-2_dwi.{ext}", root / f"dwi.{ext}")
    (s,) = discover(root)
    assert s.dwi.name == "sub-01_acq-b_dwi.nii.gz" and s.bval == root / "dwi.bval"


def test_database_dir_outside_dataset(tmp_path):
    root = make_isles22(tmp_path / "ds", sessions=False)
    db = tmp_path / "work" / "bids_db"
    assert discover(root, database_dir=db)[0].layout == "isles22"
    assert any(db.iterdir())
    assert discover(root, database_dir=db)[0].layout == "isles22"
    assert discover(root, database_dir=root / "db")[0].layout == "isles22"  # in memory instead
    assert not (root / "db").exists()


def test_session_inputs_dict_roundtrip():
    s = SessionInputs("01", None, "raw-dwi", Path("/x/d.nii.gz"), None, Path("/x/d.bval"), None, None, ["n"])
    assert s.to_dict()["dwi"] == "/x/d.nii.gz" and s.to_dict()["problem"] is None
    assert s.entities == {"subject": "01"}
