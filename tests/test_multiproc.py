"""bids_app/multiproc.py: a worker killed mid-task fails its node; the run neither hangs nor stops."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import os, sys
from pathlib import Path
from nipype import config
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from bids_app.multiproc import ResilientMultiProcPlugin

base = Path(sys.argv[1])
config.set("execution", "crashdump_dir", str(base / "crash"))
config.set("execution", "crashfile_format", "txt")

def die():
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does

def survive(path):
    from pathlib import Path
    Path(path).write_text("done")
    return path

wf = pe.Workflow("wf", base_dir=str(base / "work"))
killed = pe.Node(niu.Function(function=die, input_names=[], output_names=[]), name="killed")
after = pe.Node(niu.Function(function=survive, input_names=["path"], output_names=["out"]), name="after")
after.inputs.path = str(base / "after.txt")
wf.add_nodes([killed, after])
try:
    wf.run(plugin=ResilientMultiProcPlugin(plugin_args={"n_procs": 1, "mp_context": "fork"}))
except RuntimeError as exc:
    print("FAILED-NODES", exc)
'''


def test_killed_worker_fails_its_node_and_the_rest_runs(tmp_path):
    script = tmp_path / "run_killed.py"  # a file: nipype's Function nodes read their functions' source
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=str(ROOT), capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "NIPYPE_NO_ET": "1",
                                                       "PATH": "/usr/bin:/bin"})
    assert "FAILED-NODES" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    crashes = list((tmp_path / "crash").glob("crash-*killed*.txt"))
    assert len(crashes) == 1 and "WorkerDiedError: the worker process running this step ended abruptly" in \
        crashes[0].read_text()
    assert (tmp_path / "after.txt").read_text() == "done"  # a fresh pool ran the next task
