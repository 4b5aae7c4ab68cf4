"""The drive lane of a profile, measured on the checkpoint's own files.

What the host tier pays to read an expert (:mod:`runtime.drive`): expert-sized reads that
bypass the page cache, one at a time (``read_latency_s``: what a read costs beyond its bytes)
and ``queue_depth`` in flight (``read_gbps``), each expert read once, in a shuffled order
across layers, so neither the page cache nor read-ahead helps. The cost model prices ``n``
reads as ``ceil(n / queue_depth) x read_latency_s + n x bytes / read_gbps``
(:meth:`traces.formats.profile_file.Profile.drive_read_s`), the same formula the figures here
are solved from.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.checkpoint import checkpoint_files
from runtime.config import ModelConfig
from runtime.drive import ExpertFiles, bypasses_page_cache, expert_spans, stack_rows
from runtime.host_tier import expert_like
from runtime.profile_tables import measured
from traces.common.errors import TideError
from traces.formats.profile_file import Profile

QUEUE_DEPTH = 8  # reads the runtime keeps in flight (runtime.drive.ExpertFiles' threads)


def _timed_reads(files: ExpertFiles, keys: list[tuple[int, int]], stack, depth: int, budget_s: float) -> tuple[int, float]:
    """Read experts of ``keys`` in order, ``depth`` in flight, until ``budget_s`` has passed
    (at least ``depth`` reads); the reads made and their seconds."""
    t0 = time.perf_counter()
    n = 0
    while n < len(keys):
        batch = keys[n:n + depth]
        futures = [files.pool.submit(files.read_expert, l, e, stack, i % len(stack.gate)) for i, (l, e) in enumerate(batch)]
        for f in futures:
            f.result()
        n += len(batch)
        if time.perf_counter() - t0 >= budget_s and n >= depth:
            break
    return n, time.perf_counter() - t0


def measure_drive(folder: str | Path, cfg: ModelConfig, quick: bool = True, seed: int = 0) -> dict[str, Any]:
    """The ``drive`` section of a profile for the drive holding checkpoint ``folder``."""
    folder = Path(folder)
    s = cfg.shape
    spans = expert_spans(list(checkpoint_files(folder)), set(s.moe_layers))
    if not spans:
        raise TideError(f"{folder}: no routed experts to time the drive with")
    keys = sorted(spans)
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    files = ExpertFiles(spans, QUEUE_DEPTH)
    one = files.expert_bytes(*keys[0])
    dtype = next(iter(spans.values()))[0].dtype
    stack = stack_rows(2 * QUEUE_DEPTH, expert_like(s, dtype))
    budget = 0.5 if quick else 2.0
    try:
        n1, t1 = _timed_reads(files, order, stack, 1, budget / 2)  # one at a time: latency plus bytes
        rest = order[n1:] or order
        nq, tq = _timed_reads(files, rest, stack, QUEUE_DEPTH, budget)
    finally:
        files.close()
    per_read, per_read_q = t1 / n1, tq / nq
    # the cost model's two figures from its two equations: p1 = lat + b / bw and pq = lat / q + b / bw
    latency = max(0.0, (per_read - per_read_q) * QUEUE_DEPTH / (QUEUE_DEPTH - 1))
    gbps = one / max(per_read_q - latency / QUEUE_DEPTH, 1e-9) / 1e9
    direct = bypasses_page_cache(next(iter(spans.values()))[0].path)
    how = ("O_DIRECT" if direct else "buffered reads whose pages are dropped after (the file system refuses O_DIRECT)")
    note = (f"{nq} reads of {one / 1e6:.2f} MB experts at queue depth {QUEUE_DEPTH} and {n1} at depth 1 from "
            f"{folder}, {how}; read_gbps and read_latency_s solve the cost model's formula at both depths")
    disk = shutil.disk_usage(folder)
    return {
        "name": f"the drive holding {folder}",
        "read_gbps": {**measured(gbps), "note": note},
        "read_latency_s": measured(latency),
        "queue_depth": measured(QUEUE_DEPTH),
        "capacity_bytes": {**measured(float(disk.total)), "note": "the file system's size"},
        "reads_timed": int(n1 + nq),
        "expert_mb": one / 1e6,
        "direct": direct,
        "seconds_per_read_qd1": per_read,
        "seconds_per_read_qd": per_read_q,
    }


def with_drive(profile: Profile, folder: str | Path, cfg: ModelConfig, quick: bool = True) -> Profile:
    """``profile`` with the drive holding checkpoint ``folder`` measured into it."""
    return Profile(dict(profile.data, drive=measure_drive(folder, cfg, quick)), where=profile.where)


def drive_line(section: dict[str, Any]) -> str:
    """The drive figures as one line."""
    g, lat = section["read_gbps"]["value"], section["read_latency_s"]["value"]
    return (f"drive: {g:.2f} GB/s at queue depth {int(section['queue_depth']['value'])}, {lat * 1e6:.0f} us per read "
            f"beyond its bytes ({section['expert_mb']:.2f} MB experts, {section['reads_timed']} reads"
            f"{', O_DIRECT' if section['direct'] else ''})")

