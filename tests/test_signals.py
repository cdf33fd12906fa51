"""bids_app/signals.py: the processes a stopped run started are killed with it."""

import os
import subprocess
import sys
from pathlib import Path


def test_stop_descendants_kills_the_whole_tree(tmp_path):
    """On SIGTERM / Ctrl-C the CLI kills every process it started (nipype's forkserver and workers)."""
    script = (
        "import subprocess, sys, time\n"
        "from bids_app.signals import stop_descendants\n"
        "inner = 'import subprocess, time; p = subprocess.Popen([\"sleep\", \"60\"]); print(p.pid, flush=True); "
        "time.sleep(60)'\n"
        "mid = subprocess.Popen([sys.executable, '-c', inner], stdout=subprocess.PIPE, text=True)\n"
        "grandchild = int(mid.stdout.readline())\n"
        "stop_descendants()\n"
        "mid.wait(timeout=10)\n"
        "time.sleep(0.5)\n"
        "state = open(f'/proc/{grandchild}/stat').read().rsplit(')', 1)[1].split()[0] "
        "if __import__('os').path.exists(f'/proc/{grandchild}') else 'gone'\n"
        "print('GRANDCHILD', state)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("GRANDCHILD")[1].strip() in ("gone", "Z"), proc.stdout

