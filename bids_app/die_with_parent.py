"""Processes the app starts die with it (Linux ``PR_SET_PDEATHSIG``), even when it is killed outright.

Imported by multiprocessing's forkserver (its preload, set in ``execution._mp_context``) and called in
every nipype worker (``multiproc._worker_initializer``): the forkserver dies with the app, the workers
with their parent. Without it a killed app (``kill -9``, a batch system's SIGKILL) left the forkserver and
its workers running, then idle for ever, on a shared node.
"""

from __future__ import annotations

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def arm() -> bool:
    """Ask the kernel to SIGKILL this process when its parent ends; ``False`` where that is not possible."""
    try:
        import ctypes
        import signal

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL)) == 0
    except Exception:  # not Linux
        return False


arm()  # on import: the forkserver imports this module as its preload
