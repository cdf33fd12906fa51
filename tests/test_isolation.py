"""Isolation and atomicity (issue #5 A).

- A failing subject is reported (HTML report, crash file, exit code) while the others complete, with
  nipype's MultiProc plugin (``--nprocs 2``).
- Every output file is written under a temporary name and renamed: the run is instrumented
  (``os.replace`` recorded in every process) and a writer that fails half-way leaves nothing under
  the final name.
- ``--stop-on-first-crash`` stops after the first failure.

Runs go through ``run.py`` in a subprocess (nipype forks its workers; the test process may hold
OpenMP threads, which must not be forked).
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import badinputs as bi
from bids_app.report.common import find_crashes
from bids_app.report.subject import STATUS_EMPTY, STATUS_FAILED, STATUS_OK, read_report_status
from datasets import write_description
from nodes import base

ROOT = Path(__file__).resolve().parents[1]

# records every os.replace of every process (workers are forked and inherit the patch), then runs
# the CLI; the log holds one JSON line per call: [pid, src, dst]
DRIVER = """
import json, os, sys
sys.path.insert(0, {root!r})
LOG = {log!r}
_real = os.replace
def _spy(src, dst, *a, **k):
    out = _real(src, dst, *a, **k)
    with open(LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps([os.getpid(), os.fspath(src), os.fspath(dst)]) + "\\n")
    return out
os.replace = _spy
from bids_app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(args, cwd, spy_log=None, timeout=600):
    if spy_log is None:
        cmd = [sys.executable, str(ROOT / "run.py"), *map(str, args)]
    else:
        cmd = [sys.executable, "-c", DRIVER.format(root=str(ROOT), log=str(spy_log)), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def mask_of(out: Path, sub: str) -> Path:
    return out / f"sub-{sub}" / f"ses-{bi.SES}" / "dwi" / f"sub-{sub}_ses-{bi.SES}_label-lesion_mask.nii.gz"


# ----------------------------------------------------------------------------- isolation, MultiProc
@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation")
    bids = write_description(root / "bids")
    bi.b_good_crop(bids, "good")
    bi.b_nan_adc(bids, "badload")  # fails in the workflow (node 'load')
    bi.b_missing_adc(bids, "baddisc")  # fails in discovery
    log = root / "replace.jsonl"
    proc = run_cli([bids, root / "out", "participant", "-w", root / "work", "--nprocs", "2"], root, log)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {"root": root, "bids": bids, "out": root / "out", "proc": proc, "replaced": calls}


def test_failing_subjects_do_not_stop_the_others(isolated):
    out, proc = isolated["out"], isolated["proc"]
    assert proc.returncode == 66, proc.stderr[-3000:]
    assert mask_of(out, "good").is_file()
    assert set(read_report_status(out / "sub-good.html").values()) <= {STATUS_OK, STATUS_EMPTY}
    assert not find_crashes(out, "good")
    for sub, fragment in (("badload", "NaN or infinite"), ("baddisc", "missing ADC")):
        crashes = find_crashes(out, sub)
        assert len(crashes) == 1 and fragment in crashes[0]["error"], crashes
        assert (out / f"sub-{sub}" / "log" / crashes[0]["run_id"] / crashes[0]["file"]).is_file()
        assert set(read_report_status(out / f"sub-{sub}.html").values()) == {STATUS_FAILED}
        assert fragment in (out / f"sub-{sub}.html").read_text(encoding="utf-8")
        assert not mask_of(out, sub).exists()
    assert "participant level finished: 1 of 3 subjects without errors" in proc.stderr


def test_every_output_is_renamed_into_place(isolated):
    """Each file of the output dataset arrived by a rename from a hidden ``*.part`` in its folder."""
    out, calls = isolated["out"], isolated["replaced"]
    assert calls, "os.replace was never called"
    arrived = {}
    for _, src, dst in calls:
        arrived[Path(dst)] = Path(src)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert mask_of(out, "good") in files
    # nipype writes the crash files of failed nodes itself (plain open/write), named
    # crash-<date>-<time>-<user>-<node>-<uuid>.txt: logs, not outputs (ours are renamed into place)
    nipype_crashes = {p for p in files if re.match(r"crash-\d{8}-\d{6}-", p.name)}
    assert len(nipype_crashes) == 1
    checked = [p for p in files if p not in nipype_crashes]
    assert len(checked) >= 15
    for path in checked:
        src = arrived.get(path)
        assert src is not None, f"{path.relative_to(out)} was written in place, not renamed"
        assert src.parent == path.parent and src.name.startswith(".") and src.name.endswith(".part"), src
    assert not list(out.rglob("*.part"))


# ----------------------------------------------------------------------------- atomic writers
def _image(shape=(4, 5, 6)):
    return nib.Nifti1Image(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), np.eye(4))


def _failing_write_bytes(monkeypatch):
    """Path.write_bytes that writes half of the data, then fails like a full disk."""
    real = Path.write_bytes

    def half(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half)


@pytest.mark.parametrize("name", ["mask.nii.gz", "mask.nii"])
def test_save_nifti_atomic_crash_leaves_no_final_file(tmp_path, monkeypatch, name):
    target = tmp_path / "sub-01" / "dwi" / name
    _failing_write_bytes(monkeypatch)
    with pytest.raises(OSError):
        base.save_nifti_atomic(_image(), target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary left either


def test_save_nifti_atomic_crash_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "mask.nii.gz"
    base.save_nifti_atomic(_image(), target)
    before = target.read_bytes()
    _failing_write_bytes(monkeypatch)
    with pytest.raises(OSError):
        base.save_nifti_atomic(_image((3, 3, 3)), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


def test_save_nifti_atomic_failing_serialisation(tmp_path, monkeypatch):
    """The image fails while being encoded (e.g. its data cannot be read): nothing is created."""
    def broken(self, *a, **k):
        raise ValueError("cannot read the data")

    monkeypatch.setattr(nib.Nifti1Image, "to_bytes", broken)
    with pytest.raises(ValueError):
        base.save_nifti_atomic(_image(), tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_removes_the_temporary(tmp_path, monkeypatch):
    def no_rename(src, dst):
        raise OSError(errno.EXDEV, "rename failed")

    monkeypatch.setattr(os, "replace", no_rename)
    for write in (lambda p: base.save_nifti_atomic(_image(), p), lambda p: base.write_json_atomic({"a": 1}, p),
                  lambda p: base.atomic_write_text("x", p)):
        with pytest.raises(OSError):
            write(tmp_path / "out" / "f.nii.gz")
    assert list((tmp_path / "out").iterdir()) == []


def test_save_nifti_atomic_writes_via_a_hidden_temporary(tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((Path(src), Path(dst), Path(src).exists(), Path(dst).exists()))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    target = tmp_path / "m.nii.gz"
    base.save_nifti_atomic(_image(), target)
    [(src, dst, src_existed, dst_existed)] = seen
    assert dst == target and src.parent == tmp_path and src.name.startswith(".m.nii.gz.")
    assert src.name.endswith(".part") and src_existed and not dst_existed
    assert np.array_equal(np.asanyarray(nib.load(str(target)).dataobj), _image().get_fdata())


def test_sink_of_a_table_leaves_no_temporary_on_failure(tmp_path, monkeypatch):
    """DerivativesSink copies TSV files; a failure while renaming must not leave a ``.part``."""
    from nodes.datasink import DerivativesSink

    src = tmp_path / "stats.tsv"
    src.write_text("total_volume_ml\n1.0\n")
    out = tmp_path / "out"

    def no_rename(a, b):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "replace", no_rename)
    sink = DerivativesSink(in_file=str(src), output_dir=str(out), entities={"subject": "01"},
                           suffix="stats", desc="lesion")
    with pytest.raises(OSError):
        sink.run(cwd=str(tmp_path))
    assert [p for p in out.rglob("*") if p.is_file()] == []


# ----------------------------------------------------------------------------- stop on first crash
@pytest.mark.parametrize("where", ["discovery", "workflow"])
def test_stop_on_first_crash(tmp_path, where):
    """The first subject fails (in discovery, or in the workflow's first node): with the flag the run
    stops, the good subjects are not (all) processed and the exit code is not 0."""
    bids = write_description(tmp_path / "bids")
    (bi.b_missing_adc if where == "discovery" else bi.b_nan_adc)(bids, "aaa")
    for sub in ("bbb", "ccc"):
        bi.b_good_crop(bids, sub)
    out = tmp_path / "out"
    proc = run_cli([bids, out, "participant", "-w", tmp_path / "work", "--nprocs", "1",
                    "--stop-on-first-crash"], tmp_path)
    assert proc.returncode == 66, proc.stderr[-3000:]
    assert len(find_crashes(out, "aaa")) == 1
    done = [s for s in ("bbb", "ccc") if mask_of(out, s).exists()]
    if where == "discovery":
        assert done == []  # stopped before the workflow
        # only the session this run processed is recorded: an unrun one keeps its earlier status
        assert list(out.glob("sub-aaa/log/*/sessions.json")) and not list(out.glob("sub-bbb/log/*/sessions.json"))
    else:
        assert len(done) < 2
    assert "stopping on first crash" in proc.stderr or where == "discovery"
    assert (out / "sub-aaa.html").is_file()
