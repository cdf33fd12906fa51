"""nipype's MultiProc plugin, made to survive a worker that dies (the OOM killer, ``kill -9``).

nipype's plugin reads each task's result in a callback of its ``ProcessPoolExecutor``. When a worker
process is killed, the pool breaks: every task running in it ends with ``BrokenProcessPool``, the callback
raises, the tasks never get a result and the scheduler waits for them forever (a job that hangs until the
batch system's time limit). Here such a task gets a failed result instead (its node writes a crash file
naming the cause and its session fails alone), and the next submission starts a fresh pool for the
remaining sessions.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

from nipype.pipeline.plugins.multiproc import MultiProcPlugin, process_initializer, run_node

WORKER_DIED = "WorkerDiedError"


def _worker_initializer(cwd) -> None:
    """nipype's initializer, and the worker dies with its parent (the forkserver, or the app itself for
    forked workers): a killed or stopped app leaves no worker behind."""
    from bids_app.die_with_parent import arm

    arm()
    process_initializer(cwd)


class ResilientMultiProcPlugin(MultiProcPlugin):
    """MultiProc whose tasks fail (instead of hanging the run) when their worker process dies, and whose
    workers die with the app."""

    def __init__(self, plugin_args=None):
        super().__init__(plugin_args=plugin_args)
        self.pool.shutdown(wait=True)  # no worker started yet: they start at the first submission
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.processors, initializer=_worker_initializer,
                                   initargs=(self._cwd,),
                                   mp_context=mp.get_context(self.plugin_args.get("mp_context")))

    def _submit_job(self, node, updatehash=False):
        if getattr(self.pool, "_broken", False):  # a worker died: the old pool takes no more work
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()
        self._taskid += 1
        if getattr(node.interface, "terminal_output", "") == "stream":
            node.interface.terminal_output = "allatonce"
        future = self.pool.submit(run_node, node, updatehash, self._taskid)
        future.deepisles_task = (self._taskid, node.fullname)  # known even if the worker never answers
        self._task_obj[self._taskid] = future
        future.add_done_callback(self._async_callback)
        return self._taskid

    def _async_callback(self, args):
        try:
            result = args.result()
        except Exception as exc:  # BrokenProcessPool: the worker running this task was killed
            taskid, name = getattr(args, "deepisles_task", (None, "?"))
            if taskid is None:
                raise
            result = {"result": None, "taskid": taskid, "traceback": [
                "Traceback (most recent call last):\n", f"  (worker process running {name})\n",
                f"{WORKER_DIED}: the worker process running this step ended abruptly ({type(exc).__name__}); "
                "it was killed from outside, most often by the system for lack of memory: give the job more "
                "memory or lower --nprocs\n"]}
        self._taskresult[result["taskid"]] = result
