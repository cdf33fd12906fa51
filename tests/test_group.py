"""Group level: table, data dictionary and report from participant outputs."""

import base64
import json
from pathlib import Path

import pytest

from bids_app.errors import NoDataError
from bids_app.group import COLUMNS, run_group
from bids_app.report import build_subject_report

HEADER = "total_volume_ml\tlesion_count\tlargest_lesion_ml\tmean_adc_lesion\tvoxel_volume_ml\n"
CRASH = """Node: deepisles_wf.sub_03_wf.load
Working directory: /work/deepisles_wf/sub_03_wf/load

Traceback (most recent call last):
  File "core.py", line 402, in run
bids_app.errors.InputError: /data/sub-03/dwi/sub-03_dwi.nii.gz: truncated or corrupt image data
"""


def _session(out, sub, ses, row, models=("builtin",)):
    ent = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    d = out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "dwi"
    d.mkdir(parents=True)
    (d / f"{ent}_desc-lesion_stats.tsv").write_text(HEADER + row + "\n")
    (d / f"{ent}_label-lesion_mask.nii.gz").write_bytes(b"")
    sidecar = {"Type": "Lesion", "Models": [{"name": m, "weights_sha256": "0" * 64} for m in models]}
    (d / f"{ent}_label-lesion_mask.json").write_text(json.dumps(sidecar))


def _read_tsv(path):
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return head, [dict(zip(head, ln.split("\t"))) for ln in lines[1:]]


def test_group_table(tmp_path):
    out = tmp_path / "out"
    _session(out, "01", None, "4.184\t18\t1.608\t0.625447\t0.008", models=("seals", "nvauto"))
    _session(out, "02", "1", "12.5\t2\t10\t0.51\t0.001")
    _session(out, "02", "2", "0\t0\t0\tn/a\t0.001")
    log = out / "sub-03" / "log" / "run1"
    log.mkdir(parents=True)
    (log / "crash-20260101-120000-u-load-0a1b2c3d-0000-4000-8000-123456789abc.txt").write_text(CRASH)
    build_subject_report(out, "03")
    res = run_group(out)
    head, rows = _read_tsv(out / "group_lesions.tsv")
    assert head == list(COLUMNS)
    assert [(r["participant_id"], r["session_id"], r["status"]) for r in rows] == [
        ("sub-01", "n/a", "ok"), ("sub-02", "ses-1", "ok"), ("sub-02", "ses-2", "no lesion"),
        ("sub-03", "n/a", "failed")]
    assert rows[0]["total_volume_ml"] == "4.184" and rows[0]["lesion_count"] == "18"
    assert rows[0]["models"] == "seals+nvauto" and rows[1]["models"] == "builtin"
    assert rows[2]["mean_adc_lesion"] == "n/a"
    assert all(rows[3][c] == "n/a" for c in ("total_volume_ml", "lesion_count", "largest_lesion_ml", "models"))
    assert res["status_counts"] == {"ok": 2, "no lesion": 1, "failed": 1}

    dictionary = json.loads((out / "group_lesions.json").read_text())
    assert set(dictionary) == set(head)
    assert all(dictionary[c].get("Description") for c in head)
    assert dictionary["total_volume_ml"]["Units"] == "mL"
    assert set(dictionary["status"]["Levels"]) == {"ok", "no lesion", "failed", "stale", "incomplete"}

    html = (out / "group_lesions.html").read_text()
    b64 = html.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(b64)[:4] == b"\x89PNG"
    assert "sub-02" in html and '<a href="sub-03.html">' in html
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert not list(out.glob(".*.part"))


def test_failed_by_report_only(tmp_path):
    out = tmp_path / "out"
    _session(out, "01", None, "1\t1\t1\t0.6\t0.001")
    (out / "sub-05").mkdir()
    (out / "sub-05.html").write_text('<meta name="deepisles-session-status" content="{&#34;a&#34;: &#34;FAILED&#34;}">')
    rows = _read_tsv(Path(run_group(out)["tsv"]))[1]
    assert ("sub-05", "ses-a", "failed") in [(r["participant_id"], r["session_id"], r["status"]) for r in rows]


def test_no_data(tmp_path):
    with pytest.raises(NoDataError):
        run_group(tmp_path)


def _crash(out, sub, run_id, ses="1"):
    log = out / f"sub-{sub}" / "log" / run_id
    log.mkdir(parents=True, exist_ok=True)
    (log / f"crash-sub-{sub}_ses-{ses}-load.txt").write_text(
        f"Node: load\nSession: sub-{sub}_ses-{ses}\n\nTraceback (most recent call last):\n"
        f"InputError: /data/sub-{sub}_ses-{ses}_adc.nii.gz: truncated or corrupt image data\n")


def _ran(out, sub, run_id, sessions=("1",)):
    log = out / f"sub-{sub}" / "log" / run_id
    log.mkdir(parents=True, exist_ok=True)
    (log / "sessions.json").write_text(json.dumps({"run_id": run_id, "sessions": list(sessions)}))


def test_latest_run_decides_the_status(tmp_path):
    """A crash that a later run superseded does not fail the session; a session whose latest run failed
    keeps its earlier biomarkers but is 'stale'; without run records every crash counts (older outputs)."""
    out = tmp_path / "out"
    _session(out, "01", "1", "1\t1\t1\t0.6\t0.001")  # failed in run A, fixed in run B
    _crash(out, "01", "20260101-000000_a")
    _ran(out, "01", "20260101-000000_a")
    _ran(out, "01", "20260102-000000_b")
    _session(out, "02", "1", "2\t1\t2\t0.6\t0.001")  # ok in run A, failed in run B
    _ran(out, "02", "20260101-000000_a")
    _crash(out, "02", "20260102-000000_b")
    _ran(out, "02", "20260102-000000_b")
    _session(out, "03", "1", "3\t1\t3\t0.6\t0.001")  # no run records (outputs of an older version)
    _crash(out, "03", "20260101-000000_a")
    for sub in ("01", "02", "03"):
        build_subject_report(out, sub)
    rows = _read_tsv(Path(run_group(out)["tsv"]))[1]
    assert [(r["participant_id"], r["status"], r["total_volume_ml"]) for r in rows] == [
        ("sub-01", "ok", "1"), ("sub-02", "stale", "2"), ("sub-03", "stale", "3")]
    html = (out / "sub-01.html").read_text()
    assert '&#34;1&#34;: &#34;OK&#34;' in html and "superseded" in html
    assert '&#34;1&#34;: &#34;FAILED&#34;' in (out / "sub-02.html").read_text()


def test_interrupted_session_is_listed(tmp_path):
    """A run killed after the preprocessed images and before the biomarkers left no crash file: the
    session still gets a row ('incomplete'), it is not silently left out."""
    out = tmp_path / "out"
    _session(out, "01", "1", "1\t1\t1\t0.6\t0.001")
    d = out / "sub-02" / "ses-1" / "dwi"
    d.mkdir(parents=True)
    (d / "sub-02_ses-1_desc-preproc_ADC.nii.gz").write_bytes(b"")
    rows = _read_tsv(Path(run_group(out)["tsv"]))[1]
    assert [(r["participant_id"], r["session_id"], r["status"]) for r in rows] == [
        ("sub-01", "ses-1", "ok"), ("sub-02", "ses-1", "incomplete")]
