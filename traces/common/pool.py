"""Worker processes that never outlive the command that started them.

The planner and the sweep spread work over spawned processes. A pool from here ends its
workers however the parent ends: normally (closed and joined), on an exception or
SIGTERM (terminated at once, not waited for), or killed outright (each worker asked the
kernel for SIGKILL when its parent dies, Linux ``PR_SET_PDEATHSIG``). Workers ignore
Ctrl-C: the parent handles it and terminates them. Each worker's numpy uses one BLAS
thread: the pool already keeps every core busy, and a worker's BLAS threads on top of it
oversubscribe the cores (the planner's pricing took 49 s on two workers against 18 s).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
from typing import Iterator

_PR_SET_PDEATHSIG = 1
#: Read by the BLAS libraries when a worker imports numpy (spawned workers inherit them).
_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _die_with_parent(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


@contextlib.contextmanager
def worker_pool(n: int) -> Iterator[multiprocessing.pool.Pool]:
    """``n`` spawned workers (no fork of a process that may hold threads), one BLAS thread each."""
    saved = {k: os.environ.get(k) for k in _ONE_THREAD}
    os.environ.update(dict.fromkeys(_ONE_THREAD, "1"))
    try:
        pool = multiprocessing.get_context("spawn").Pool(n, initializer=_die_with_parent, initargs=(os.getpid(),))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield pool
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()
