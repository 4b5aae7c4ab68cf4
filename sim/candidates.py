"""The planner's candidate table: every (tau, B) of every MoE layer, priced on traces.

A candidate's cost is its layer's predicted seconds over the whole trace, summed forward
by forward with :meth:`traces.costs.CostModel.layer_seconds` (exactly what the simulator's
events add up to, since a layer starts when the previous one ends). The placements come
from the policy functions of ``traces.policies``, not from an assumed drift rate: one
``plan`` policy with a row per candidate (``G = taus x budgets`` rows per layer) replays
the trace once, every row deciding independently on its own layer's counts.

Layers are independent and run one after another, so a plan's predicted time is the sum
of its layers' candidate costs plus the work outside the MoE layers (dense layers, head),
which no candidate changes.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from traces.costs import CostModel
from traces.policies import Policy
from traces.pool import worker_pool
from traces.profile import Profile
from traces.replay import replay
from traces.trace import Trace


def refresh_steps(trace: Trace, tau: int) -> frozenset[int]:
    """The denoising steps (after a block's first) at which ``tau`` refreshes in ``trace``."""
    fw = trace.forwards
    steps = np.unique(fw.loc[fw["kind"] == "step", "step"].to_numpy())
    return frozenset(int(s) for s in steps if s > 0 and s % tau == 0)


def distinct_taus(traces: Sequence[Trace], taus: Sequence[int]) -> list[int]:
    """``taus`` less those that refresh at exactly the same forwards as a smaller one
    (every tau past the longest block's steps behaves the same): same decisions, same cost."""
    seen: set[tuple[frozenset[int], ...]] = set()
    out = []
    for tau in sorted(set(int(t) for t in taus)):
        key = tuple(refresh_steps(tr, tau) for tr in traces)
        if key not in seen:
            seen.add(key)
            out.append(tau)
    return out


def budget_grid(experts: int, step: int = 8, extra: Sequence[int] = ()) -> list[int]:
    """``0, step, 2 step, ..., experts`` plus ``extra`` (e.g. the largest uniform budget that fits)."""
    grid = set(range(0, experts + 1, step)) | {experts} | {int(b) for b in extra if 0 <= b <= experts}
    return sorted(grid)


def candidate_policy(n_layers: int, experts: int, taus: Sequence[int], budgets: Sequence[int]) -> Policy:
    """One ``plan`` row per (layer, tau, budget), layer-major then tau then budget."""
    T, B = len(taus), len(budgets)
    tau = np.tile(np.repeat(np.asarray(taus), B), n_layers)
    budget = np.tile(np.tile(np.asarray(budgets), T), n_layers)
    return Policy.make("plan", n_layers * T * B, experts, budget=budget, tau=tau)


def candidate_seconds(trace: Trace, profile: Profile, taus: Sequence[int], budgets: Sequence[int],
                      layers: Sequence[int] | None = None, cpu_dtype: str | None = None,
                      progress: bool = False) -> np.ndarray:
    """``[len(layers), len(taus), len(budgets)]``: predicted seconds over ``trace`` of each of
    ``layers`` (MoE layer indices, default all) under each candidate, setup copies included."""
    shape = trace.shape
    E = shape.experts
    layers = np.arange(shape.n_moe_layers) if layers is None else np.asarray(layers)
    L, G = len(layers), len(taus) * len(budgets)
    cost = CostModel(profile, shape, trace.dtype, cpu_dtype)
    total = np.zeros(L * G)
    walk = replay(trace, candidate_policy(L, E, taus, budgets), layers=layers, group=G)
    for fw in tqdm(walk, total=trace.n_forwards, desc=f"pricing {L * G} candidates", unit="forward",
                   disable=not progress, leave=False):
        total += cost.layer_seconds(cost.layer_parts(fw.decision, fw.counts, fw.counters, fw.tokens_run, fw.context))
    return total.reshape(L, len(taus), len(budgets))


def _some_layers(args: tuple) -> np.ndarray:
    traces, profile, taus, budgets, layers, cpu_dtype = args
    return sum(candidate_seconds(tr, profile, taus, budgets, layers, cpu_dtype) for tr in traces)


def candidate_table_seconds(traces: Sequence[Trace], profile: Profile, taus: Sequence[int], budgets: Sequence[int],
                            cpu_dtype: str | None = None, jobs: int | None = None,
                            progress: bool = True) -> np.ndarray:
    """:func:`candidate_seconds` of every MoE layer summed over ``traces`` (each replayed from
    an empty placement), layers spread over ``jobs`` processes (default: every core)."""
    L = traces[0].shape.n_moe_layers
    jobs = max(1, min(jobs or os.cpu_count() or 1, L))
    chunks = np.array_split(np.arange(L), min(L, 4 * jobs))  # a few layers at once: fewer Python steps per row
    tasks = [(list(traces), profile, list(taus), list(budgets), c, cpu_dtype) for c in chunks]
    bar = dict(total=len(tasks), desc=f"pricing {len(taus) * len(budgets)} candidates x {L} layers", unit="chunk",
               disable=not progress)
    if jobs == 1:
        parts = [_some_layers(t) for t in tqdm(tasks, **bar)]
    else:
        with worker_pool(jobs) as pool:
            parts = list(tqdm(pool.imap(_some_layers, tasks), **bar))
    return np.concatenate(parts)


def fixed_seconds(trace: Trace, profile: Profile, cpu_dtype: str | None = None) -> float:
    """Seconds of the work outside the MoE layers over ``trace`` (the same for every plan)."""
    cost = CostModel(profile, trace.shape, trace.dtype, cpu_dtype)
    fw = trace.forwards
    return float(sum(cost.fixed_s(int(t), int(c)) for t, c in zip(fw["tokens_run"], fw["context"])))
