"""Reading experts from the checkpoint's own safetensors files, past the page cache.

A host tier (:mod:`traces.policies.host`) keeps only some of a layer's experts in host memory;
the rest are read from the drive when a forward needs them. :class:`ExpertFiles` knows where
each expert's three matrices lie in which file (from the files' headers, nothing read but
them) and reads experts into rows of a host stack, ``queue_depth`` reads in flight (a thread
pool: the reads release the GIL). Reads bypass the page cache (``O_DIRECT``; where the file
system refuses it, buffered reads whose pages are dropped right after), so what a run
measures is the drive, and host memory is only what the run holds itself.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from runtime.experts import ExpertWeights
from traces.common.errors import TideError

ALIGN = 4096  # O_DIRECT: offsets, lengths and buffers aligned to the logical block (4 KiB covers every drive)
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Span:
    """One tensor's bytes in a file."""

    path: str
    offset: int  # absolute, in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and where its data starts; a TideError naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its header")
            n = struct.unpack("<Q", raw)[0]
            if n > 100 << 20:
                raise ValueError("header length past 100 MB")
            head = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise TideError(f"{path}: not a readable safetensors file ({exc})") from None
    if not isinstance(head, dict):
        raise TideError(f"{path}: not a readable safetensors file (its header is not an object)")
    return head, 8 + n


def expert_spans(files: Sequence[Path], layers: set[int]) -> dict[tuple[int, int], list[Span]]:
    """Where each routed expert of ``layers`` (model layer ids) lies: ``(layer, expert)`` ->
    its gate, up and down matrices, from the files' headers."""
    out: dict[tuple[int, int], dict[str, Span]] = {}
    for path in files:
        head, start = header(path)
        size = path.stat().st_size
        for name, meta in head.items():
            m = _EXPERT.match(name)
            if not m or int(m.group(1)) not in layers:
                continue
            try:
                lo, hi = (int(v) for v in meta["data_offsets"])
                dtype = _DTYPES[meta["dtype"]]
                shape = tuple(int(v) for v in meta["shape"])
            except (KeyError, TypeError, ValueError):
                raise TideError(f"{path}: {name}: an entry safetensors would not read "
                                f"(dtype {meta.get('dtype') if isinstance(meta, dict) else meta!r})") from None
            if start + hi > size:
                raise TideError(f"{path}: {name} lies past the end of the file (truncated?)")
            out.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = Span(
                str(path), start + lo, hi - lo, dtype, shape)
    return {k: [v[p] for p in PROJ] for k, v in out.items() if len(v) == 3}


class _Reader(threading.local):
    """Each read thread's aligned bounce buffer (grown as needed) and open files."""

    def __init__(self) -> None:
        self.buf: mmap.mmap | None = None
        self.fds: dict[str, tuple[int, bool]] = {}


class ExpertFiles:
    """Reads experts from the checkpoint into host-stack rows (module doc)."""

    def __init__(self, spans: dict[tuple[int, int], list[Span]], queue_depth: int = 8):
        self.spans = spans
        self.queue_depth = queue_depth
        self.pool = ThreadPoolExecutor(max_workers=queue_depth, thread_name_prefix="tide-drive")
        self._local = _Reader()
        self._lock = threading.Lock()
        self.reads = 0
        self.bytes = 0

    def expert_bytes(self, layer: int, expert: int) -> int:
        return sum(s.nbytes for s in self.spans[(layer, expert)])

    def _fd(self, path: str) -> tuple[int, bool]:
        fds = self._local.fds
        if path not in fds:
            try:
                fds[path] = (os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)), True)
            except OSError:
                try:
                    fds[path] = (os.open(path, os.O_RDONLY), False)  # a file system without O_DIRECT
                except OSError as exc:
                    raise TideError(f"{path}: the checkpoint file cannot be opened mid-run ({exc.strerror})") from None
        return fds[path]

    def _read(self, path: str, lo: int, hi: int) -> memoryview:
        """Bytes ``[lo, hi)`` of a file, read in whole aligned blocks into this thread's buffer."""
        a, b = lo - lo % ALIGN, -(-hi // ALIGN) * ALIGN
        loc = self._local
        if loc.buf is None or len(loc.buf) < b - a:
            loc.buf = mmap.mmap(-1, b - a)  # page-aligned: O_DIRECT's buffer rule
        fd, direct = self._fd(path)
        view = memoryview(loc.buf)[:b - a]
        try:
            got = os.preadv(fd, [view], a)
        except OSError as exc:
            raise TideError(f"{path}: reading an expert failed mid-run ({exc.strerror}); was the file removed or "
                            "replaced?") from None
        if got < hi - a:
            raise TideError(f"{path}: the checkpoint file ends at byte {a + got}, before the expert it should hold "
                            f"(bytes {lo}..{hi}): truncated mid-run?")
        if not direct:
            os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_DONTNEED)  # not left in the page cache
        return view[lo - a:hi - a]

    def read_expert(self, layer: int, expert: int, dst: ExpertWeights, row: int) -> None:
        """One expert's three matrices into ``dst``'s ``row``: one read where they lie together
        in one file (as safetensors writes an expert's), else one read each."""
        spans = self.spans[(layer, expert)]
        order = sorted(zip(spans, (dst.gate, dst.up, dst.down)), key=lambda p: p[0].offset)
        together = len({s.path for s in spans}) == 1 and all(
            x.offset + x.nbytes == y.offset for (x, _), (y, _) in zip(order, order[1:]))
        for group in ([order] if together else [[p] for p in order]):
            lo, hi = group[0][0].offset, group[-1][0].offset + group[-1][0].nbytes
            raw = self._read(group[0][0].path, lo, hi)
            for s, stack in group:
                stack[row].copy_(torch.frombuffer(raw[s.offset - lo:s.offset - lo + s.nbytes], dtype=s.dtype).view(s.shape))
        with self._lock:
            self.reads += 1
            self.bytes += sum(s.nbytes for s in spans)

    def submit(self, layer: int, experts: Sequence[int], dst: ExpertWeights, rows: Sequence[int]) -> list[Future]:
        """Start reading ``experts`` of ``layer`` (model layer id) into ``dst``'s ``rows``."""
        return [self.pool.submit(self.read_expert, layer, int(e), dst, int(r)) for e, r in zip(experts, rows)]

    def read(self, layer: int, experts: Sequence[int], dst: ExpertWeights, rows: Sequence[int]) -> None:
        """Read and wait (the first error raised here, as a TideError)."""
        wait(self.submit(layer, experts, dst, rows))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def wait(futures: Sequence[Future]) -> None:
    """Wait for every read (none is left writing when this returns); the first that failed
    raises its error."""
    futures_wait(futures)
    for f in futures:
        f.result()


def bypasses_page_cache(path: str | Path) -> bool:
    """Whether ``path``'s file system takes O_DIRECT reads (else reads drop their pages after)."""
    try:
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    return hasattr(os, "O_DIRECT")


def stack_rows(n: int, like: Sequence[tuple[tuple[int, ...], torch.dtype]], pin: bool = False,
               maps: list | None = None) -> ExpertWeights:
    """A host stack of ``n`` experts (gate, up, down shapes and dtype), pinned for a GPU's
    asynchronous copies; otherwise in private anonymous memory of its own, appended to
    ``maps``, which :func:`free_maps` hands back to the OS whatever still refers to it (the
    heap keeps what it frees: :func:`runtime.device.keep_freed_memory`). Touched now, so the
    first reads do not fault its pages in."""
    if pin:
        return ExpertWeights(*(torch.zeros((n, *shape), dtype=dt, pin_memory=True) for shape, dt in like))
    out = []
    for shape, dt in like:
        nbytes = n * int(np.prod(shape)) * torch.tensor([], dtype=dt).element_size()
        if not nbytes:
            out.append(torch.empty((0, *shape), dtype=dt))
            continue
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if maps is not None:
            maps.append(buf)
        t = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dt).view(n, *shape)
        t.zero_()
        out.append(t)
    return ExpertWeights(*out)


def free_maps(maps: list) -> None:
    """Give the pages of :func:`stack_rows`' maps back to the OS now (their contents are gone)."""
    for m in maps:
        m.madvise(mmap.MADV_DONTNEED)
    maps.clear()
