"""Bad-input matrix (issue #5 A): every defective input fails alone, with one clear line and its code.

All participant-level cases live in ONE dataset (one subject per case plus two good controls) and
are run by ONE participant run (:func:`matrix`): bad subjects stop in discovery or in the first
nodes, before inference; the accepted-but-awkward ones go through the whole pipeline. Each case is
then checked from its own crash file, report and outputs. Command-line cases (no data, usage errors,
unwritable output) stop before any workflow and run one by one, in this process.

The tables :data:`badinputs.PARTICIPANT_CASES` and :data:`CLI_CASES` are the matrix:
``(case, expected exit code, expected message fragment)``.
"""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import badinputs as bi
from bids_app.cli import main
from bids_app.errors import WeightsError
from bids_app.execution import _exit_code
from bids_app.report.common import find_crashes
from bids_app.report.subject import STATUS_EMPTY, STATUS_FAILED, STATUS_OK, read_report_status
from datasets import write_description

ROOT = Path(__file__).resolve().parents[1]
FAILING = [c for c in bi.PARTICIPANT_CASES if c.exit_code]
ACCEPTED = [c for c in bi.PARTICIPANT_CASES if not c.exit_code]


# ----------------------------------------------------------------------------- the participant run
class Matrix:
    def __init__(self, root: Path):
        self.bids, self.out, self.work = root / "bids", root / "out", root / "work"
        bi.make_matrix_dataset(self.bids)
        cmd = [sys.executable, str(ROOT / "run.py"), str(self.bids), str(self.out), "participant",
               "-w", str(self.work), "--nprocs", "1"]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=900)
        self.seconds = time.perf_counter() - t0
        self.returncode, self.stderr = proc.returncode, proc.stderr

    def mask(self, sub) -> Path:
        return self.out / f"sub-{sub}" / f"ses-{bi.SES}" / "dwi" / f"sub-{sub}_ses-{bi.SES}_label-lesion_mask.nii.gz"

    def input_dwi(self, sub) -> Path:
        return self.bids / f"sub-{sub}" / f"ses-{bi.SES}" / "dwi" / f"sub-{sub}_ses-{bi.SES}_dwi.nii.gz"

    def report(self, sub) -> str:
        return (self.out / f"sub-{sub}.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    m = Matrix(tmp_path_factory.mktemp("matrix"))
    print(f"bad-input matrix: {len(bi.PARTICIPANT_CASES) + len(bi.GOOD)} subjects, "
          f"participant run {m.seconds:.1f} s, exit {m.returncode}")
    return m


def test_matrix_table_is_complete():
    names = [c.name for c in bi.PARTICIPANT_CASES + bi.GOOD]
    assert len(names) == len(set(names)) and all(n.isalnum() for n in names)
    assert len(bi.PARTICIPANT_CASES) + len(CLI_CASES) >= 25
    for case in FAILING:
        assert case.message and case.blame, case.name


def test_run_exit_code_combines_the_subjects(matrix):
    """Every failure is an input problem (66), so the run exits 66; it did not crash as a whole."""
    assert "run.py\", line" not in matrix.stderr  # no uncaught exception
    n_ok = len(ACCEPTED) + len(bi.GOOD)
    assert f"participant level finished: {n_ok} of {n_ok + len(FAILING)} subjects without errors" \
        in matrix.stderr.strip().splitlines()[-1]
    expected = {c.exit_code for c in FAILING}
    assert matrix.returncode == (expected.pop() if len(expected) == 1 else 1), matrix.stderr[-3000:]


def test_good_subjects_finish(matrix):
    for case in bi.GOOD:
        assert matrix.mask(case.name).is_file(), case.name
        assert not find_crashes(matrix.out, case.name)
        assert set(read_report_status(matrix.out / f"sub-{case.name}.html").values()) <= {STATUS_OK, STATUS_EMPTY}


def test_no_partial_outputs(matrix):
    assert not [p for p in matrix.out.rglob("*.part")]
    assert not [p for p in matrix.out.rglob("*") if p.name.startswith(".") and p.name != ".bidsignore"]
    for case in FAILING:  # nothing under a final name for a subject that failed
        assert not matrix.mask(case.name).exists(), case.name
        assert not list((matrix.out / f"sub-{case.name}").rglob("*.nii.gz")), case.name
        assert not list((matrix.out / f"sub-{case.name}").rglob("*.tsv")), case.name


@pytest.mark.parametrize("case", FAILING, ids=[c.name for c in FAILING])
def test_failing_case(matrix, case):
    sub = case.name
    crashes = find_crashes(matrix.out, sub)
    assert len(crashes) == 1, [c["file"] for c in crashes]
    crash = crashes[0]
    assert crash["run_id"] and (matrix.out / f"sub-{sub}" / "log" / crash["run_id"] / crash["file"]).is_file()
    line = crash["error"]
    # one line naming the input file (in the BIDS dataset, not a work copy) and the problem
    assert "\n" not in line and case.message in line, line
    named = [w.rstrip(":") for w in line.split() if w.rstrip(":").endswith(case.blame)]
    assert named, line
    assert all(Path(n).is_relative_to(matrix.bids) for n in named), line
    assert Path(named[0]).name == f"sub-{sub}_ses-{bi.SES}{case.blame}", line
    assert _exit_code({sub: [line]}) == case.exit_code, line
    # the report says FAILED and shows the message; stderr has the line
    assert set(read_report_status(matrix.out / f"sub-{sub}.html").values()) == {STATUS_FAILED}
    assert html.escape(case.message, quote=False) in matrix.report(sub).replace("&#39;", "'")
    # the summary line the run logs for the subject (not only nipype's traceback)
    assert any(f"ERROR: sub-{sub}: " in ln and case.message in ln and case.blame in ln
               for ln in matrix.stderr.splitlines()), sub
    assert not matrix.mask(sub).exists()


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.name for c in ACCEPTED])
def test_accepted_case(matrix, case):
    """Accepted inputs: a uint8 0/1 mask on exactly the input DWI grid, no crash, report not FAILED."""
    sub = case.name
    assert not find_crashes(matrix.out, sub), find_crashes(matrix.out, sub)[:1]
    mask_file = matrix.mask(sub)
    assert mask_file.is_file()
    mask, ref = nib.load(str(mask_file)), nib.load(str(matrix.input_dwi(sub)))
    assert mask.shape == ref.shape[:3]
    assert np.allclose(mask.affine, ref.affine, atol=1e-4)
    data = np.asanyarray(mask.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
    assert set(read_report_status(matrix.out / f"sub-{sub}.html").values()) <= {STATUS_OK, STATUS_EMPTY}
    if case.message:
        assert case.message in matrix.report(sub)


def test_grids_differ_is_resampled_with_a_warning(matrix):
    rep = json.loads((matrix.work / "reportlets" / "sub-gridsdiffer" / f"ses-{bi.SES}" / "conform.json").read_text())
    assert rep["values"]["resampled"] is True
    assert any(i["level"] == "warning" and "resampled" in i["text"] for i in rep["items"])


def test_large_fov_mask_is_on_the_input_grid(matrix):
    img = nib.load(str(matrix.mask("largefov")))
    assert img.shape == bi.LARGE_FOV_SHAPE
    fov = np.array(img.shape) * np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    assert fov[0] >= 256 and fov[1] >= 256


def test_anisotropic_voxels_kept(matrix):
    zooms = nib.load(str(matrix.mask("aniso"))).header.get_zooms()[:3]
    assert np.allclose(sorted(zooms), [0.9, 0.9, 6.0], atol=1e-3)


def test_reports_escape_html(matrix):
    # the b-value error message carries "<script>...": shown escaped, never as markup
    for sub in ("bvalhtml", "htmlsidecar"):
        text = matrix.report(sub)
        assert "<script>alert" not in text and "<img src=x" not in text
    assert html.escape("<script>alert(") in matrix.report("bvalhtml")


def test_broken_symlink_says_how_to_fetch(matrix):
    line = find_crashes(matrix.out, "brokenlink")[0]["error"]
    assert "DataLad" in line and "datalad get" in line


# ----------------------------------------------------------------------------- command-line cases
def _one_good(root: Path) -> Path:
    bi.b_good_crop(root, "01")
    return root


def _setup_empty(tmp):
    return [str(write_description(tmp / "bids")), str(tmp / "out"), "participant"]


def _setup_no_description(tmp):
    root = _one_good(tmp / "bids")
    return [str(root), str(tmp / "out"), "participant"]


def _setup_bad_description(tmp):
    root = _one_good(write_description(tmp / "bids"))
    (root / "dataset_description.json").write_bytes(b'{"Name": "x", \xff')
    return [str(root), str(tmp / "out"), "participant"]


def _setup_description_without_version(tmp):
    root = _one_good(tmp / "bids")
    (root / "dataset_description.json").write_text('{"Name": "x"}')
    return [str(root), str(tmp / "out"), "participant"]


def _setup_unknown_label(tmp):
    root = _one_good(write_description(tmp / "bids"))
    return [str(root), str(tmp / "out"), "participant", "--participant-label", "sub-nobody"]


def _setup_unknown_session(tmp):
    root = _one_good(write_description(tmp / "bids"))
    return [str(root), str(tmp / "out"), "participant", "--session-label", "9"]


def _setup_out_is_bids(tmp):
    root = _one_good(write_description(tmp / "bids"))
    return [str(root), str(root), "participant"]


def _setup_out_inside_bids(tmp):
    root = _one_good(write_description(tmp / "bids"))
    return [str(root), str(root / "derivatives" / "deepisles"), "participant"]


def _setup_work_inside_bids(tmp):
    root = _one_good(write_description(tmp / "bids"))
    return [str(root), str(tmp / "out"), "participant", "-w", str(root / "work")]


def _uncreatable() -> str:
    # a path no user can create, root included (/proc refuses new entries)
    return "/proc/deepisles-cannot-create/out"


def _setup_out_uncreatable(tmp):
    root = _one_good(write_description(tmp / "bids"))
    return [str(root), _uncreatable(), "participant"]


def _setup_work_uncreatable(tmp):
    root = _one_good(write_description(tmp / "bids"))
    return [str(root), str(tmp / "out"), "participant", "-w", _uncreatable()]


def _setup_out_is_a_file(tmp):
    root = _one_good(write_description(tmp / "bids"))
    (tmp / "afile").write_text("x")
    return [str(root), str(tmp / "afile"), "participant"]


def _setup_unknown_level(tmp):
    root = _one_good(write_description(tmp / "bids"))
    return [str(root), str(tmp / "out"), "subject"]


def _setup_missing_bids_dir(tmp):
    return [str(tmp / "nope"), str(tmp / "out"), "participant"]


def _setup_filter_not_json(tmp):
    root = _one_good(write_description(tmp / "bids"))
    (tmp / "filter.json").write_text("{dwi: oops")
    return [str(root), str(tmp / "out"), "participant", "--bids-filter-file", str(tmp / "filter.json")]


def _setup_filter_bad_key(tmp):
    root = _one_good(write_description(tmp / "bids"))
    (tmp / "filter.json").write_text('{"bold": {"task": "rest"}}')
    return [str(root), str(tmp / "out"), "participant", "--bids-filter-file", str(tmp / "filter.json")]


def _setup_unknown_member(tmp):
    root = _one_good(write_description(tmp / "bids"))
    return [str(root), str(tmp / "out"), "participant", "--models", "nosuchmodel"]


def _setup_missing_official_weights(tmp):
    root = _one_good(write_description(tmp / "bids"))
    (tmp / "weights").mkdir()
    return [str(root), str(tmp / "out"), "participant", "--models", "seals", "--weights-dir",
            str(tmp / "weights")]


# (case, setup(tmp) -> argv, expected exit code, expected message fragment)
CLI_CASES = [
    ("empty dataset", _setup_empty, 18, "no diffusion data"),
    ("no dataset_description.json", _setup_no_description, 16, "dataset_description.json: missing"),
    ("dataset_description.json not UTF-8 JSON", _setup_bad_description, 16, "not valid JSON"),
    ("dataset_description.json without BIDSVersion", _setup_description_without_version, 16,
     "missing required field(s) BIDSVersion"),
    ("unknown participant label", _setup_unknown_label, 18, "participant label(s) not found: nobody"),
    ("unknown session label", _setup_unknown_session, 18, "session label(s) not found: 9"),
    ("output_dir equal to bids_dir", _setup_out_is_bids, 64, "output_dir must differ from bids_dir"),
    ("output_dir inside bids_dir", _setup_out_inside_bids, 64, "output_dir is inside bids_dir"),
    ("work dir inside bids_dir", _setup_work_inside_bids, 64, "work directory is inside bids_dir"),
    ("output dir cannot be created", _setup_out_uncreatable, 73, "cannot write the output directory"),
    ("work dir cannot be created", _setup_work_uncreatable, 73, "cannot write the work directory"),
    ("output dir is a file", _setup_out_is_a_file, 73, "cannot write the output directory"),
    ("unknown analysis level", _setup_unknown_level, 17, "unknown analysis level 'subject'"),
    ("bids_dir missing", _setup_missing_bids_dir, 66, "BIDS directory not found"),
    ("--bids-filter-file not JSON", _setup_filter_not_json, 64, "not a readable JSON filter file"),
    ("--bids-filter-file unknown key", _setup_filter_bad_key, 64, "unknown key(s) bold"),
    ("--models unknown member", _setup_unknown_member, 64, "nosuchmodel"),
    ("--weights-dir without the member's files", _setup_missing_official_weights, 66, "weight file(s) missing"),
]


NO_PATH = {"unknown analysis level", "--bids-filter-file unknown key", "--models unknown member"}


@pytest.fixture
def clean_env(monkeypatch):
    """main() sets a few environment variables with setdefault: undo them after the test."""
    for var in ("MPLCONFIGDIR", "NIPYPE_NO_ET", "OMP_NUM_THREADS"):
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("name,setup,code,fragment", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_case(tmp_path, capsys, clean_env, name, setup, code, fragment):
    argv = setup(tmp_path)
    bids = Path(argv[0])
    before = sorted(p.relative_to(bids) for p in bids.rglob("*")) if bids.is_dir() else None
    assert main(argv) == code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("deepisles: error: "), err
    assert fragment in err[0], err[0]
    if name not in NO_PATH:  # the file or folder concerned is named
        assert str(tmp_path) in err[0] or "/proc/" in err[0], err[0]
    if before is not None:  # the input dataset is never written
        assert sorted(p.relative_to(bids) for p in bids.rglob("*")) == before
    assert not list(tmp_path.rglob("*_label-lesion_mask.nii.gz"))


def test_skip_bids_validation_runs_without_description(tmp_path, capsys, clean_env):
    root = _one_good(tmp_path / "bids")
    assert not (root / "dataset_description.json").exists()
    out = tmp_path / "out"
    code = main([str(root), str(out), "participant", "--skip-bids-validation", "-w", str(tmp_path / "w"),
                 "--nprocs", "1"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert (out / "sub-01" / f"ses-{bi.SES}" / "dwi" / f"sub-01_ses-{bi.SES}_label-lesion_mask.nii.gz").is_file()
    assert not (root / "dataset_description.json").exists()


# ----------------------------------------------------------------------------- tampered weights
def _weights():
    from models.builtin import predictor as bp

    if not bp.DEFAULT_WEIGHTS.is_file():
        pytest.skip("built-in weights not present")
    return bp


@pytest.fixture
def tampered(tmp_path):
    bp = _weights()
    return bi.tampered_weights(bp.DEFAULT_WEIGHTS, tmp_path / "weights")


@pytest.fixture
def no_torch_load(monkeypatch):
    """Fail if anything tries to deserialise weights: a bad checksum must be refused first."""
    import torch

    def refuse(*a, **k):
        raise AssertionError("torch.load called on weights that fail their checksum")

    monkeypatch.setattr(torch, "load", refuse)


def test_registry_refuses_tampered_weights_before_loading(tampered, no_torch_load):
    from models import registry

    with pytest.raises(WeightsError) as err:
        registry.build_predictor("builtin", device="cpu", weights=str(tampered))
    assert err.value.exit_code == 66
    msg = str(err.value)
    assert "\n" not in msg and str(tampered) in msg and "does not match" in msg


def test_registry_refuses_weights_without_sidecar(tmp_path, no_torch_load):
    bp = _weights()
    lone = tmp_path / "lone.pt"
    lone.write_bytes(bp.DEFAULT_WEIGHTS.read_bytes())
    from models import registry

    with pytest.raises(WeightsError, match="lone.pt"):
        registry.build_predictor("builtin", device="cpu", weights=str(lone))


def test_segment_node_refuses_tampered_weights(tmp_path, tampered, no_torch_load, monkeypatch):
    from nodes import segment

    c = bi.cropped_case()
    dwi = bi.save(c["dwi"] / c["dwi"].max(), c["affine"], tmp_path / "dwi_norm.nii.gz")
    adc = bi.save(c["adc"] / c["adc"].max(), c["affine"], tmp_path / "adc_norm.nii.gz")
    segment.clear_predictor_cache()
    cwd = tmp_path / "node"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    node = segment.SegmentLesions(dwi_norm_file=str(dwi), adc_norm_file=str(adc), weights_file=str(tampered),
                                  device="cpu", reportlets_dir=str(tmp_path / "rep"))
    with pytest.raises(WeightsError) as err:
        node.run(cwd=str(cwd))
    assert err.value.exit_code == 66 and str(tampered) in str(err.value)
    assert _exit_code({"x": [f"bids_app.errors.WeightsError: {err.value}"]}) == 66
    assert not list(cwd.glob("*.nii.gz")) and not (tmp_path / "rep" / "segment.json").exists()
