"""The CPU expert kernel for bf16 weights (``cpu_kernels.c``): built with the machine's C
compiler at first use, cached per source, compiler and machine, called through ctypes.

torch's bf16 matmul on a CPU without AVX-512 BF16 converts every weight once per token; this
kernel converts each weight row once for all of an expert's tokens (see the C file). Where no
compiler is found, or the build fails, :func:`library` is None and the experts run on torch's
kernels (:mod:`runtime.experts` measures which is faster and takes it)."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def cache_dir() -> Path:
    """Where built kernels are kept (``TIDE_CACHE`` or ``~/.cache/tide``)."""
    return Path(os.environ.get("TIDE_CACHE") or Path.home() / ".cache" / "tide") / "kernels"


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The built kernel library, or None where this machine cannot build it (or where
    ``TIDE_C_KERNELS=0`` turns it off: torch's kernels alone, the before of a comparison)."""
    if os.environ.get("TIDE_C_KERNELS", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc or not SOURCE.is_file():
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()
                             + platform.processor().encode() + cpu_flags().encode()).hexdigest()[:16]
        lib = cache_dir() / f"tide-cpu-{key}.so"
        if not lib.is_file():
            lib.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=lib.parent, suffix=".so")
            os.close(fd)
            try:
                subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
                os.replace(tmp, lib)  # whole or not at all: another process may build it at the same time
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError):
        return None
    fn = dll.tide_experts_bf16
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, p, p, p, i64, p, p, p, i64, i64, p, p, ctypes.c_int]
    fn.restype = None
    lin = dll.tide_linear_bf16
    lin.argtypes = [p, i64, p, i64, i64, p, p, p, ctypes.c_int]
    lin.restype = None
    dll.tide_fma_flops.argtypes = [ctypes.c_int, i64]
    dll.tide_fma_flops.restype = ctypes.c_double
    return dll


def cpu_flags() -> str:
    """The CPU's feature flags (what ``-march=native`` compiled for), '' where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def on_host_bf16(*tensors: torch.Tensor | None) -> bool:
    """Whether the C kernels take these tensors as they are: bf16, in host memory, contiguous
    (None, an absent bias, passes)."""
    return all(t is None or (t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous())
               for t in tensors)


def experts_bf16(tokens: torch.Tensor, out: torch.Tensor, start: np.ndarray, rows: np.ndarray, slot: np.ndarray,
                 gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
    """Rows ``start[e]:start[e] + rows[e]`` of ``tokens`` (bf16 ``[N, H]``) through the weights
    at ``slot[e]`` of the bf16 stacks, into the same rows of ``out``: one call for every expert."""
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU expert kernel could not be built on this machine")
    if not on_host_bf16(tokens, out, gate, up, down):
        raise RuntimeError("the CPU expert kernel takes contiguous bf16 tensors in host memory")
    (N, H), I = tokens.shape, gate.shape[1]
    xs = torch.empty((N, H), dtype=torch.float32)  # each token converted once; each weight row once per block
    scratch = torch.empty((N, I), dtype=torch.float32)
    start = np.ascontiguousarray(start, dtype=np.int64)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    slot = np.ascontiguousarray(slot, dtype=np.int64)
    lib.tide_experts_bf16(tokens.data_ptr(), out.data_ptr(), start.ctypes.data, rows.ctypes.data, slot.ctypes.data,
                          len(start), gate.data_ptr(), up.data_ptr(), down.data_ptr(), H, I, xs.data_ptr(),
                          scratch.data_ptr(), threads_for(3 * H * I * int(rows.sum())))


#: Below this many multiply-adds a call runs on one thread: waking the others costs more
#: (a 32x64 by 64x128 linear: 57 us on two threads of the 2-core VM, 16 us on one).
SMALL_CALL = 1 << 20


def threads_for(fmas: int) -> int:
    return 1 if fmas < SMALL_CALL else torch.get_num_threads()


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for bf16 tokens, weight and bias in host memory, through the
    C kernel: the sum in fp32, the bias added, rounded to bf16 once (as torch's bf16 linear)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU linear kernel could not be built on this machine")
    N, K = weight.shape
    xb = x.reshape(-1, K).contiguous()
    T = xb.shape[0]
    y = torch.empty((T, N), dtype=torch.bfloat16)
    xs = torch.empty((T, K), dtype=torch.float32)
    if not on_host_bf16(xb, weight, bias):
        raise RuntimeError("the CPU linear kernel takes contiguous bf16 tensors in host memory")
    lib.tide_linear_bf16(xb.data_ptr(), T, weight.data_ptr(), N, K, bias.data_ptr() if bias is not None else None,
                         y.data_ptr(), xs.data_ptr(), threads_for(T * N * K))
    return y.reshape(*x.shape[:-1], N)


def fma_peak_gflops(reps: int = 5) -> float | None:
    """The CPU's fp32 multiply-add rate on torch's threads (GFLOP/s, the best of ``reps``): the
    compute roof of a kernel, which a matmul library may sit well under. None without the
    C library."""
    from runtime.device import timed
    lib = library()
    if lib is None:
        return None
    threads = torch.get_num_threads()
    return max(flops / s / 1e9 for flops, s in (timed(torch.device("cpu"), lambda: lib.tide_fma_flops(threads, 2_000_000))
                                                  for _ in range(reps)))


@functools.lru_cache(maxsize=None)
def linear_is_faster(reps: int = 5) -> bool:
    """Whether :func:`linear_bf16` beats torch's bf16 linear on this CPU (8 tokens through a
    2048x2048 weight, medians): on the AVX2 VM 0.9 ms against 11 ms; where torch has AVX-512 BF16
    or AMX kernels (oneDNN) it may not, and torch's is kept."""
    from runtime.profile_tables import timer
    if library() is None:
        return False
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(2048, 2048, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(8, 2048, generator=g).to(torch.bfloat16)
    med = timer(torch.device("cpu"))
    return med(lambda: linear_bf16(x, w), reps) < med(lambda: torch.nn.functional.linear(x, w), reps)
