"""A served run's figures, computed in one place: latency percentiles and whether a rate is sustained.

The planner's batch-size choice (:mod:`sim.frontier`) and the sweep's rows
(:mod:`experiments.sweep_points`) both report p50 and p99 latency and whether the box sustains
an arrival rate; both ask here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def latency_figures(latency_s: Sequence[float] | np.ndarray, prefix: str = "latency") -> dict[str, float]:
    """``{prefix}_p50_s`` and ``{prefix}_p99_s`` of per-request latencies (linear interpolation)."""
    lat = np.asarray(latency_s, dtype=np.float64)
    return {f"{prefix}_p50_s": float(np.percentile(lat, 50)), f"{prefix}_p99_s": float(np.percentile(lat, 99))}


def sustains(requests_per_s: float, arrival_rate: float) -> bool:
    """Whether a box serving ``requests_per_s`` offline (back to back: the most it serves) keeps
    up with ``arrival_rate``; below it, the queue grows without bound."""
    return bool(requests_per_s >= arrival_rate)
