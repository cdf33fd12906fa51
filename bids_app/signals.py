"""Stopping a run cleanly: SIGTERM as an exception, and every process the run started killed with it."""

from __future__ import annotations

import os
from pathlib import Path


class Terminated(Exception):
    """SIGTERM (``kill``, ``timeout``, a batch system's warning signal) turned into an exception."""


def raise_terminated(signum, frame):
    """SIGTERM handler of the command line."""
    raise Terminated()


def stop_descendants() -> None:
    """Kill every process this one started, directly or not (nipype's workers and the forkserver), so
    that an interrupted run leaves nothing running on a shared node."""
    import signal

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    todo, found = [os.getpid()], []
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    for pid in found:
        try:
            if b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue  # it cleans the pool's semaphores up and exits with us (killed, it prints tracebacks)
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
