"""The device: which one, waiting for it, and timing work on it. One place knows that CUDA
work is asynchronous (gpt-fast's single device-sync helper), so every timing waits the
same way."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

from traces.common.errors import TideError

T = TypeVar("T")


def check_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, present on this machine (``--device``)."""
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise TideError(f"--device: expected cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TideError("--device cuda: no CUDA device available (install a CUDA build of torch on a GPU box)")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and its wall seconds, the device idle before and drained after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


_KEPT = False


def keep_freed_memory() -> None:
    """Keep large freed blocks in this process's heap instead of handing them back to the OS.

    glibc serves blocks above its mmap threshold with fresh mappings and unmaps them when
    freed, so every forward's large temporaries fault in page by page again: on the 2-core
    VM the head of 256 rows of a mini-shaped model (160 MB of fp32 logits) took 485 ms
    instead of 104 ms, and batches, whose temporaries are larger, paid it most. Called when a
    model is loaded; Linux with glibc only (elsewhere a no-op); memory is reused, not grown."""
    global _KEPT
    if _KEPT:
        return
    _KEPT = True
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)


def give_back_freed_memory() -> None:
    """Hand the heap's free memory back to the OS now (glibc ``malloc_trim``): what
    :func:`keep_freed_memory` keeps between forwards is worth keeping during a run, not after
    a profile's tables, whose temporaries no run reuses."""
    import ctypes
    import ctypes.util
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def to_device(values, device: torch.device) -> torch.Tensor:
    """A small host array (indices, offsets) on ``device`` without a synchronisation: on a GPU
    through pinned memory (PyTorch's caching host allocator keeps the block until the copy
    has run), so the host goes on issuing work."""
    t = torch.from_numpy(values) if not isinstance(values, torch.Tensor) else values
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def speed_reference_s(reps: int = 5) -> float:
    """Seconds of a fixed piece of host work (small matmuls and adds from eager PyTorch: the
    mix of kernel calls and interpreter work the engine does), the median of ``reps`` after
    one pass untimed (a process's first pass ran 23% slower than the next on the 2-core VM).
    Recorded in profiles and validation rounds so a reader sees how the box's speed moved
    between them; never used to rescale a time: being compute-bound it once claimed a 1.4x
    faster box that memory-bound runs never saw."""
    x = torch.ones(64, 64) * 0.01
    out = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        for _ in range(200):
            torch.nn.functional.linear(x, x).add_(1.0)
        out.append(time.perf_counter() - t0)
    out = out[1:]  # the warm-up pass
    return sorted(out)[len(out) // 2]


def host_memory_bytes() -> float:
    """This machine's physical memory (what experts kept in host memory must fit in)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
