"""The device: which one, waiting for it, and timing work on it. One place knows that CUDA
work is asynchronous (gpt-fast's single device-sync helper), so every timing waits the
same way."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

import torch

from traces.errors import TideError

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


def to_device(values, device: torch.device) -> torch.Tensor:
    """A small host array (indices, offsets) on ``device`` without a synchronisation: on a GPU
    through pinned memory (PyTorch's caching host allocator keeps the block until the copy
    has run), so the host goes on issuing work."""
    t = torch.from_numpy(values) if not isinstance(values, torch.Tensor) else values
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def around_reference(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the box's speed reference around it (the mean of a reading before and
    one after): what a timed run is put on a profile's footing with."""
    before = speed_reference_s()
    out = fn()
    return out, (before + speed_reference_s()) / 2


def speed_reference_s(reps: int = 3) -> float:
    """Seconds of a fixed piece of host work (small matmuls and adds from eager PyTorch: the
    mix of kernel calls and interpreter work the engine does), the median of ``reps``. A
    shared box changes speed by 2x within minutes; this tracks it (correlation 0.92 with a
    whole run's time on the 2-core VM), so times measured at different moments can be put
    on one footing: multiply by the reference of the moment you compare with, divide by
    the reference of the moment measured."""
    x = torch.ones(64, 64) * 0.01
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(200):
            torch.nn.functional.linear(x, x).add_(1.0)
        out.append(time.perf_counter() - t0)
    return sorted(out)[len(out) // 2]
