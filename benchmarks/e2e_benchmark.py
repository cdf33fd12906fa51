"""End-to-end benchmark: one ISLES-size subject, participant level, fresh work dir.

Prints wall time, peak memory (max RSS over the process tree) and the share of each workflow step.

    python benchmarks/e2e_benchmark.py [--bids DIR] [--nprocs 2] [--models builtin]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "bids_app" / "data" / "demo" / "isles22-sample"


def step_durations(work_dir: Path) -> dict[str, float]:
    """Seconds per node, read from nipype's result files."""
    from nipype.utils.filemanip import loadpkl

    out = {}
    for res in sorted((work_dir / "deepisles_wf").rglob("result_*.pklz")):
        result = loadpkl(res)
        duration = getattr(getattr(result, "runtime", None), "duration", None)
        if duration is not None:
            out[res.parent.name] = out.get(res.parent.name, 0.0) + float(duration)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bids", type=Path, default=DEMO)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out, work = Path(tmp) / "out", Path(tmp) / "work"
        cmd = [sys.executable, str(ROOT / "run.py"), str(args.bids), str(out), "participant",
               "-w", str(work), "--nprocs", str(args.nprocs), *args.extra]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        if proc.returncode:
            print(proc.stderr[-3000:])
        steps = step_durations(work)
    total = sum(steps.values()) or 1.0
    print(f"exit code {proc.returncode}")
    print(f"wall time {wall:.1f} s, peak memory (largest process) {peak_gb:.2f} GB, "
          f"nprocs {args.nprocs}")
    for name, sec in sorted(steps.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {sec:7.2f} s  {100 * sec / total:5.1f} %")
    print(f"  {'sum of steps':28s} {total:7.2f} s; outside steps (start-up, scheduling, reports) "
          f"{wall - total:.1f} s")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
