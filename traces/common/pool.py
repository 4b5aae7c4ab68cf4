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
import multiprocessing.queues
import os
import queue
import signal
import sys
from typing import Iterator

from traces.common.errors import TideError

_PR_SET_PDEATHSIG = 1
#: Read by the BLAS libraries when a worker imports numpy (spawned workers inherit them).
_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: How long a worker may take to start (import numpy, pandas, the planner) before the pool gives up.
_START_S = 300


#: Held back while workers start (see :func:`worker_pool`).
_HELD = {signal.SIGINT, signal.SIGTERM}


def _die_with_parent(parent: int, ready: "multiprocessing.queues.Queue") -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)  # held back by the parent while it started us
    if sys.platform.startswith("linux"):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
    ready.put(os.getpid())


@contextlib.contextmanager
def worker_pool(n: int) -> Iterator[multiprocessing.pool.Pool]:
    """``n`` spawned workers (no fork of a process that may hold threads), one BLAS thread each."""
    saved = {k: os.environ.get(k) for k in _ONE_THREAD}
    os.environ.update(dict.fromkeys(_ONE_THREAD, "1"))
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    # SIGTERM and Ctrl-C wait until every worker has started: one arriving while a worker still
    # reads its start-up data from this process would end that worker in a traceback
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    pool = None
    try:
        pool = ctx.Pool(n, initializer=_die_with_parent, initargs=(os.getpid(), ready))
        for _ in range(n):
            try:
                ready.get(timeout=_START_S)
            except queue.Empty:
                raise TideError(f"worker processes did not start within {_START_S} s") from None
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
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
