"""Whole runs through ``run.py``: determinism across runs and ``--nprocs``, and resume after SIGKILL.

Two subjects (the ISLES'22 sample at 4 mm, ``tests.datasets.make_isles22``):

- reference: one uninterrupted run with ``--nprocs 1`` (Linear plugin, 1 torch thread);
- killed: the same command in another work directory, killed with SIGKILL (whole process group)
  as soon as the first subject's segmentation has finished, mid-way through the second's;
- resumed: rerun with the killed run's work directory but ``--nprocs 2`` (MultiProc, 2 torch
  threads), as a user moving to a bigger node would.

The resumed run must finish (exit 0) and give byte-identical derivatives (NIfTI, TSV, JSON sidecars,
figures) to the reference, except that a probability map computed with 2 torch threads may differ from
the 1-thread one by at most ``PROB_ATOL`` (float reduction order; masks, tables and figures identical);
every node that had finished before the kill must be reused from nipype's cache (its result file
untouched), outputs written before the kill must not be rewritten, and no ``*.part`` temporary file may
be left anywhere. The other subjects are segmented by the resumed
``--nprocs 2`` run, so the comparison also shows that ``--nprocs 1`` and ``--nprocs 2`` (Linear vs
MultiProc, 1 vs 2 torch threads) give the same outputs, and that separate runs give bit-identical
files.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from models.builtin import predictor as bp
from tests.datasets import make_isles22

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ("01", "02")
PROB_ATOL = 1e-6  # 1 vs 2 torch threads, probability maps only
pytestmark = pytest.mark.skipif(not bp.DEFAULT_WEIGHTS.is_file(), reason="built-in weights not present")


def cli(bids, out, work, nprocs):
    return [sys.executable, str(ROOT / "run.py"), str(bids), str(out), "participant", "-w", str(work),
            "--nprocs", str(nprocs)]


def run_cli(bids, out, work, nprocs, timeout=300):
    proc = subprocess.run(cli(bids, out, work, nprocs), cwd=str(out.parent), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def derivatives(out: Path) -> dict[str, str]:
    """SHA-256 of every per-subject derivative (images, TSV, sidecars, figures); not logs or HTML."""
    files = {}
    for path in sorted(out.glob("sub-*/**/*")):
        rel = path.relative_to(out)
        if path.is_file() and "log" not in rel.parts:
            files[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def node_results(work: Path) -> dict[str, int]:
    """``{node result file: mtime_ns}`` of every finished nipype node of the run."""
    out = {}
    for res in (work / "deepisles_wf").rglob("result_*.pklz"):
        node = res.parent
        finished = [h for h in node.glob("_0x*.json") if not h.name.endswith("_unfinished.json")]
        if finished:
            out[str(res.relative_to(work))] = res.stat().st_mtime_ns
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    bids = make_isles22(base / "bids", subjects=SUBJECTS, sessions=True, step=2)
    return base, bids


@pytest.fixture(scope="module")
def reference(dataset):
    base, bids = dataset
    out, work = base / "ref_out", base / "ref_work"
    out.mkdir()
    t0 = time.perf_counter()
    run_cli(bids, out, work, nprocs=1)
    files = derivatives(out)
    assert len([f for f in files if f.endswith("_label-lesion_mask.nii.gz")]) == len(SUBJECTS)
    return {"out": out, "work": work, "files": files, "seconds": time.perf_counter() - t0}


def _kill_after_first_segmentation(bids, out, work, timeout=240) -> None:
    proc = subprocess.Popen(cli(bids, out, work, nprocs=1), cwd=str(out.parent), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if list((work / "deepisles_wf").rglob("result_segment_*.pklz")):
                os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, like a batch system
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before it could be killed")
            time.sleep(0.02)
        else:
            pytest.fail("no segmentation finished in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_killed_run_resumes_to_identical_outputs(dataset, reference):
    base, bids = dataset
    out, work = base / "killed_out", base / "killed_work"
    out.mkdir()
    _kill_after_first_segmentation(bids, out, work)

    masks_before = sorted(out.glob("sub-*/ses-*/dwi/*_label-lesion_mask.nii.gz"))
    segmented = list((work / "deepisles_wf").rglob("result_segment_*.pklz"))
    assert len(segmented) < len(SUBJECTS) and len(masks_before) < len(SUBJECTS), \
        "the kill came too late: nothing was left to resume"
    cached = node_results(work)
    written = {p: p.stat().st_mtime_ns for p in out.glob("sub-*/**/*") if p.is_file()}
    assert any("segment_" in k for k in cached) and written, "nothing had finished before the kill"

    proc = run_cli(bids, out, work, nprocs=2)

    # finished nodes reused from the cache: result files untouched (nipype rewrites them on a rerun)
    after = node_results(work)
    rerun = sorted(k for k, mtime in cached.items() if after.get(k) != mtime)
    assert not rerun, f"nodes finished before the kill were executed again: {rerun}"
    rewritten = sorted(str(p.relative_to(out)) for p, m in written.items() if p.stat().st_mtime_ns != m)
    assert not rewritten, f"outputs written before the kill were rewritten: {rewritten}"
    assert len(after) > len(cached)  # the rest was computed

    # same bytes as the uninterrupted run (the first subject's model ran in the --nprocs 1 run); the
    # probability maps of subjects segmented with 2 torch threads instead of 1 may differ in the last
    # float bits (split reductions: up to 3.9e-7 seen on an AMX Xeon, 2026-11-28), never their masks
    files = derivatives(out)
    assert files.keys() == reference["files"].keys()
    differ = sorted(k for k in files if files[k] != reference["files"][k])
    assert all(k.endswith("_probseg.nii.gz") for k in differ), f"derivatives differ from the uninterrupted run: {differ}"
    for k in differ:
        got, ref = nib.load(str(out / k)), nib.load(str(reference["out"] / k))
        assert got.header.get_data_dtype() == ref.header.get_data_dtype() and np.array_equal(got.affine, ref.affine)
        assert np.abs(np.asanyarray(got.dataobj) - np.asanyarray(ref.dataobj)).max() <= PROB_ATOL, k

    leftovers = [str(p) for root in (out, work) for p in root.rglob("*.part")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    assert "Traceback" not in proc.stderr
    crashes = list(out.glob("sub-*/log/*/crash-*"))
    assert not crashes, crashes
    for sub in SUBJECTS:
        assert (out / f"sub-{sub}.html").is_file()


def test_second_identical_run_is_fully_cached(dataset, reference):
    """Rerunning the finished reference (same command, same work dir) recomputes nothing and leaves
    every derivative byte-identical."""
    base, bids = dataset
    before = node_results(reference["work"])
    run_cli(bids, reference["out"], reference["work"], nprocs=1)
    after = node_results(reference["work"])
    assert after == before
    assert derivatives(reference["out"]) == reference["files"]


def test_deleted_outputs_are_written_again(dataset, reference):
    """Outputs deleted after a finished run come back, byte-identical, when the same command is run
    with the same work directory (the sinks run again; every other node stays cached)."""
    import shutil

    base, bids = dataset
    before = node_results(reference["work"])
    shutil.rmtree(reference["out"] / f"sub-{SUBJECTS[0]}")
    run_cli(bids, reference["out"], reference["work"], nprocs=1)
    assert derivatives(reference["out"]) == reference["files"]
    after = node_results(reference["work"])
    rerun = sorted(k for k, mtime in before.items() if after.get(k) != mtime)
    assert rerun and all("/ds_" in k for k in rerun), rerun
