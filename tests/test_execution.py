"""bids_app/execution.py: the workflow runs with the start-up heap left out of garbage collection."""
import gc
import os
import sys

import pytest

from bids_app import execution as E


def test_heap_is_frozen_during_the_run_and_released_after():
    gc.unfreeze()
    with E._frozen_heap():
        assert gc.get_freeze_count() > 0  # the objects alive at the start (modules, the graph)
    assert gc.get_freeze_count() == 0


def test_heap_is_released_when_the_run_fails():
    gc.unfreeze()
    with pytest.raises(RuntimeError):
        with E._frozen_heap():
            raise RuntimeError("workflow did not execute cleanly")
    assert gc.get_freeze_count() == 0


def test_run_workflow_runs_nipype_inside_the_frozen_heap(monkeypatch, tmp_path):
    seen = {}

    class RecordingWorkflow:
        def run(self, plugin, plugin_args):
            seen.update(frozen=gc.get_freeze_count(), plugin=plugin)

    import bids_app.workflow as W

    monkeypatch.setattr(W, "init_deepisles_wf", lambda *a, **k: RecordingWorkflow())
    monkeypatch.setattr(E, "_nipype_config", lambda config: None)
    # _run_workflow sets OMP_NUM_THREADS when unset: keep that out of the other tests
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    config = E.RunConfig(bids_dir=None, output_dir=None, analysis_level="participant", work_dir=tmp_path, nprocs=1)
    gc.unfreeze()
    E._run_workflow(config, [], [], {})
    assert seen["plugin"] == "Linear" and seen["frozen"] > 0
    assert gc.get_freeze_count() == 0


def test_workers_are_forked_without_a_probe_when_python_cannot_be_run_again(monkeypatch, tmp_path):
    """An interpreter this user cannot execute (e.g. under another user's 0700 home): fork at once. A
    forkserver probe would leave semaphores with a dead resource tracker (a traceback at exit)."""
    exe = tmp_path / "python"
    exe.write_text("")
    exe.chmod(0o644)  # no execute bit, for root too
    monkeypatch.setattr("multiprocessing.spawn.get_executable", lambda: str(exe))
    probes = []

    def probe(*args, **kwargs):
        probes.append(kwargs)
        raise AssertionError("the forkserver was probed")

    monkeypatch.setattr("concurrent.futures.ProcessPoolExecutor", probe)
    assert E._mp_context() == "fork" and not probes
    monkeypatch.setattr("multiprocessing.spawn.get_executable", lambda: os.path.realpath(sys.executable))
    assert E._mp_context() == "fork" and len(probes) == 1  # a runnable one is probed (here: a failing probe)


def test_outputs_of_another_image_are_kept_and_the_session_fails(tmp_path, caplog):
    """A session whose output names already hold another image's mask (e.g. run-1, now run-2) fails with
    one line and exit 73 before any processing; the earlier outputs stay as they were."""
    import json

    from bids_app.cli import main
    from tests.datasets import make_isles22

    bids = make_isles22(tmp_path / "bids", subjects=("01",), sessions=False)
    sidecar = tmp_path / "out" / "sub-01" / "dwi" / "sub-01_label-lesion_mask.json"
    sidecar.parent.mkdir(parents=True)
    earlier = json.dumps({"SpatialReference": "bids:raw:sub-01/dwi/sub-01_run-1_dwi.nii.gz"})
    sidecar.write_text(earlier)
    code = main([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"), "--nprocs", "1"])
    assert code == 73 and sidecar.read_text() == earlier
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "holds the lesion mask of bids:raw:sub-01/dwi/sub-01_run-1_dwi.nii.gz" in errors[0]


def test_a_session_left_without_mask_and_without_error_fails_the_run(tmp_path, monkeypatch, caplog):
    """If the scheduler ends without running a session and without any crash file (a broken worker pool
    before the fix in bids_app/multiproc.py), the run must not report success."""
    import bids_app.workflow as W
    from bids_app.cli import main
    from tests.datasets import make_isles22

    class SilentWorkflow:
        def run(self, plugin, plugin_args):
            return None

    monkeypatch.setattr(W, "init_deepisles_wf", lambda *a, **k: SilentWorkflow())
    bids = make_isles22(tmp_path / "bids", subjects=("01",), sessions=False)
    code = main([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"), "--nprocs", "1"])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 1 and any("not written, and no step reported an error" in e for e in errors), errors
