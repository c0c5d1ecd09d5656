"""The Ray side of ``kunlun curate --executor ray``: datatrove's ``RayPipelineExecutor`` with the SIGTERM fix below.

Each Ray job (datatrove's ``RankWorker`` actor) runs its tasks in a ``fork()``ed ``multiprocess`` Pool, and its
``Pool.__exit__`` calls ``terminate()``: the parent takes the task queue's read lock for good, sends every worker
SIGTERM and joins them. Forked workers inherit the Ray worker's SIGTERM handler, which raises ``SystemExit`` as
Python code. Where that exception is swallowed (e.g. the signal lands in a ``__del__``, a weakref or GC callback, or
an at-fork hook of a worker still starting: Python only prints "Exception ignored"), the worker lives on, blocks on
the lock the parent holds, and the parent's join waits for good (seen once with datatrove 0.10.1 and Ray 2.x: a
minhash-buckets job hung for 23 minutes). :class:`RayExecutor` makes every process forked in a Ray
job's worker start with SIGTERM's default disposition, so the kernel ends it on SIGTERM without running Python
code; SIGTERM is blocked across the fork itself, so one that arrives before the child has reset its handler waits
and then ends the child.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from datatrove.executor.ray import RayPipelineExecutor

_hooks_installed = False


def _block_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _unblock_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _default_sigterm_then_unblock() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the child's only thread is its main thread
    _unblock_sigterm()  # a SIGTERM that came during the fork is delivered now, and ends the child


def default_sigterm_in_forked_children() -> None:
    """Make every process this process forks from now on start with SIGTERM's default disposition (once per
    process; the forked children inherit it)."""
    global _hooks_installed
    if _hooks_installed:
        return
    os.register_at_fork(before=_block_sigterm, after_in_parent=_unblock_sigterm,
                        after_in_child=_default_sigterm_then_unblock)
    _hooks_installed = True


class RayExecutor(RayPipelineExecutor):
    """datatrove's ``RayPipelineExecutor`` whose jobs' pool workers die on SIGTERM (see the module docstring).

    Ray hands each job's ``RankWorker`` a pickled copy of the executor; unpickling it there installs the fork
    hooks before the job's Pool forks its workers.
    """

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        default_sigterm_in_forked_children()
