"""Subject report: full data, a crash with no outputs, escaping, self-containment."""

import json
import re
import shutil
from pathlib import Path

import pytest

from bids_app.report import build_subject_report
from bids_app.report.common import parse_crash_file
from bids_app.report.subject import read_report_status
from nodes.biomarkers import LesionStats
from nodes.figures import LesionFigures

SAMPLE = Path(__file__).resolve().parents[1] / "bids_app/data/demo/isles22-sample"
DWI = SAMPLE / "sub-strokecase0009/ses-0001/dwi/sub-strokecase0009_ses-0001_dwi.nii.gz"
ADC = SAMPLE / "sub-strokecase0009/ses-0001/dwi/sub-strokecase0009_ses-0001_adc.nii.gz"
MASK = SAMPLE / "derivatives/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_msk.nii.gz"
XSS = "<script>alert(1)</script>"

CRASH = """Node: deepisles_wf.sub_01_ses_2_wf.segment
Working directory: /work/deepisles_wf/sub_01_ses_2_wf/segment

Node inputs:

dwi_file = /data/sub-01/ses-2/dwi/sub-01_ses-2_dwi.nii.gz

Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/nipype/pipeline/plugins/multiproc.py", line 67, in run_node
    result["result"] = node.run(updatehash=updatehash)
  File "/venv/lib/python3.11/site-packages/nipype/pipeline/engine/nodes.py", line 787, in _run_command
    raise NodeExecutionError(msg)
nipype.pipeline.engine.nodes.NodeExecutionError: Exception raised while executing Node segment.

Traceback:
\tTraceback (most recent call last):
\t  File "/venv/lib/python3.11/site-packages/nipype/interfaces/base/core.py", line 402, in run
\t    runtime = self._run_interface(runtime)
\tbids_app.errors.WeightsError: weights.pt: checksum mismatch <b>bad</b>
"""
CRASH_NAME = "crash-20260101-120000-user-segment-0a1b2c3d-0000-4000-8000-123456789abc.txt"


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_session(out, work, sub="01", ses="1", notes=(), sidecar_extra=None):
    """Outputs of one successful session made with the real biomarker and figure nodes."""
    ent = f"sub-{sub}_ses-{ses}"
    rl = work / "reportlets" / f"sub-{sub}" / f"ses-{ses}"
    rl.mkdir(parents=True)
    _write_json(rl / "discovery.json", {"subject": sub, "session": ses, "layout": "isles22", "dwi": str(DWI),
                                        "adc": str(ADC), "bval": None, "bvec": None, "flair": None,
                                        "notes": list(notes), "problem": None})
    _write_json(rl / "conform.json", {"step": "conform", "title": "ADC onto the DWI grid", "values": {"moved": True},
                                      "items": [{"level": "warning", "text": "grids differ: ADC resampled"}]})
    node = work / "node"
    node.mkdir(exist_ok=True)
    st = LesionStats(mask_file=str(MASK), adc_file=str(ADC), reportlets_dir=str(rl)).run(cwd=str(node))
    fig = LesionFigures(trace_file=str(DWI), adc_file=str(ADC), mask_file=str(MASK), out_prefix=ent,
                        reportlets_dir=str(rl)).run(cwd=str(node))
    dwi_dir = out / f"sub-{sub}" / f"ses-{ses}" / "dwi"
    dwi_dir.mkdir(parents=True)
    shutil.copy(st.outputs.stats_file, dwi_dir / f"{ent}_desc-lesion_stats.tsv")
    shutil.copy(MASK, dwi_dir / f"{ent}_label-lesion_mask.nii.gz")
    sidecar = {"Type": "Lesion", "Sources": [f"bids::sub-{sub}/ses-{ses}/dwi/{ent}_dwi.nii.gz"], "Threshold": 0.5,
               "Models": [{"name": "builtin", "weights_sha256": "f" * 64}], "SpatialReference": "orig"}
    sidecar.update(sidecar_extra or {})
    _write_json(dwi_dir / f"{ent}_label-lesion_mask.json", sidecar)
    figs = out / f"sub-{sub}" / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    for f in fig.outputs.figure_files:
        shutil.copy(f, figs)


def add_crash(out, sub="01", text=CRASH):
    log = out / f"sub-{sub}" / "log" / "20260101-120000_ab12"
    log.mkdir(parents=True, exist_ok=True)
    (log / CRASH_NAME).write_text(text)


@pytest.fixture()
def dirs(tmp_path):
    return tmp_path / "out", tmp_path / "work"


def test_full_report(dirs):
    out, work = dirs
    make_session(out, work)
    run_info = {"version": "0.1.0", "command_line": "deepisles /bids /out participant", "run_id": "20260101_ab",
                "models": ["builtin"]}
    path = build_subject_report(out, "sub-01", work_dir=work, run_info=run_info)
    assert path == out / "sub-01.html"
    html = path.read_text()
    for text in ("4.184", ">18<", "isles22", "f" * 64, "grids differ: ADC resampled", "deepisles /bids /out participant",
                 'src="sub-01/figures/sub-01_ses-1_desc-lesion_mosaic.png"', "Lesion biomarkers", "Report figures",
                 "10.1038/s41467-025-62373-x", "10.1038/s41597-022-01875-5", "2211.02701", "Gorgolewski"):
        assert text in html, text
    assert 'class="warning"' in html
    assert read_report_status(path) == {"1": "OK"}
    # self-contained: no external resources
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<link" not in html and "<script" not in html


def test_crash_and_no_outputs(dirs):
    out, _ = dirs
    add_crash(out)
    html = build_subject_report(out, "01").read_text()
    assert "FAILED" in html
    assert "bids_app.errors.WeightsError: weights.pt: checksum mismatch &lt;b&gt;bad&lt;/b&gt;" in html
    assert "deepisles_wf.sub_01_ses_2_wf.segment" in html
    assert "<details>" in html and "NodeExecutionError" in html  # full traceback, collapsed
    assert read_report_status(out / "sub-01.html") == {"2": "FAILED"}
    crash = parse_crash_file(next((out / "sub-01/log").glob("*/crash-*.txt")))
    assert (crash["step"], crash["session"], crash["run_id"]) == ("segment", "2", "20260101-120000_ab12")


def test_one_session_ok_one_crashed(dirs):
    out, work = dirs
    make_session(out, work)
    add_crash(out)
    status = read_report_status(build_subject_report(out, "01", work_dir=work))
    assert status == {"1": "OK", "2": "FAILED"}


def test_escaping(dirs):
    out, work = dirs
    make_session(out, work, notes=[XSS], sidecar_extra={"Models": [{"name": XSS, "weights_sha256": XSS}],
                                                        "SpatialReference": XSS})
    add_crash(out, text=CRASH.replace("segment.\n", f"segment {XSS}.\n"))
    html = build_subject_report(out, "01", work_dir=work, run_info={"command_line": XSS}).read_text()
    assert XSS not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_empty_mask_status(dirs, tmp_path):
    out, work = dirs
    make_session(out, work)
    tsv = out / "sub-01/ses-1/dwi/sub-01_ses-1_desc-lesion_stats.tsv"
    tsv.write_text(tsv.read_text().splitlines()[0] + "\n0\t0\t0\tn/a\t0.008\n")
    assert read_report_status(build_subject_report(out, "01", work_dir=work)) == {"1": "no lesion found"}


def test_pre_workflow_error_file_and_provenance(dirs):
    out, _ = dirs
    log = out / "sub-01" / "log" / "run2"
    log.mkdir(parents=True)
    (log / "crash-sub-01_ses-3-discovery.txt").write_text(
        "Node: discovery\nSession: sub-01_ses-3\n\nTraceback (most recent call last):\n"
        "  (before the workflow)\nInputError: /bids/sub-01/ses-3/dwi: no DWI found\n")
    run_info = {"version": "0.1.0", "command": "deepisles a b participant",
                "models": [{"name": "builtin", "weights_sha256": "e" * 64, "needs_flair": False}]}
    path = build_subject_report(out, "01", run_info=run_info)
    html = path.read_text()
    assert read_report_status(path) == {"3": "FAILED"}
    assert "InputError: /bids/sub-01/ses-3/dwi: no DWI found" in html
    assert "builtin (weights SHA-256 " + "e" * 64 in html
