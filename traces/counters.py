"""The contract's counters, defined once, and a replay of a policy over a whole trace.

Per forward and MoE layer:

* ``gpu_tokens`` / ``cpu_tokens``: routed token-expert assignments computed on the fast
  device / on the CPU (shared experts not counted).
* ``migrations``: expert copies into slots after setup; ``setup_migrations``: the copies
  that fill the slots at the run's first forward.
* ``bytes_h2d``: expert weight bytes of ``migrations`` in the run's dtype.
* ``bytes_act``: for every token with at least one CPU assignment, its hidden vector to
  the CPU and one combined result back: ``2 x hidden x dtype bytes``.

They are logical quantities, the same whether or not the fast device is the CPU.
``bytes_act`` is exact when the per-token choices of every token run are known (KV-cache
traces, and the runtime). A trace recorded without the KV cache keeps the choices of the
current block only; for the prefix tokens it counts ``min(prefix tokens, prefix CPU
assignments)``, an upper bound.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from traces.policies import Decision, Policy, PolicyRunner

if TYPE_CHECKING:
    from traces.costs import CostModel
    from traces.trace import Trace

COUNTERS: tuple[str, ...] = ("gpu_tokens", "cpu_tokens", "migrations", "setup_migrations", "bytes_h2d", "bytes_act")


def cpu_mask(decision: Decision, counts: np.ndarray) -> np.ndarray:
    """``[L, G, E]`` experts whose tokens this forward computes on the CPU (``G`` rows per layer)."""
    L, E = counts.shape
    if decision.waves is not None:
        return np.zeros((L, decision.n_rows // L, E), dtype=bool)
    return (counts > 0)[:, None, :] & ~decision.resident.reshape(L, -1, E)


def forward_counters(decision: Decision, counts: np.ndarray, expert_bytes: int, act_bytes_per_token: int,
                     choices: np.ndarray | None = None, tokens_run: int | None = None) -> dict[str, np.ndarray]:
    """Counters of one forward, each ``[rows]`` int64 (``rows`` = the decision's: the MoE
    layers, or ``L x G`` candidate rows for the planner, all seeing ``counts`` ``[L, E]``).

    ``choices`` is ``[n, L, k]`` expert ids of the tokens whose choices are known; when
    ``n < tokens_run`` the other tokens' activation traffic is bounded as the module says.
    """
    counts = np.asarray(counts, dtype=np.int64)
    L = counts.shape[0]
    V = decision.n_rows
    miss = cpu_mask(decision, counts)  # [L, G, E]
    cpu_tokens = np.rint(miss @ counts[:, :, None].astype(np.float64)).astype(np.int64).reshape(V)
    total = np.repeat(counts.sum(axis=1), V // L)
    migrations = decision.migrations
    if choices is None or len(choices) == 0:
        known_miss_tokens = np.zeros(V, dtype=np.int64)
        known_cpu = np.zeros(V, dtype=np.int64)
        n_known = 0
    else:
        ch = np.asarray(choices)
        hit_miss = miss[np.arange(L)[None, :, None], :, ch]  # [n, L, k, G]
        known_miss_tokens = hit_miss.any(axis=2).sum(axis=0).reshape(V).astype(np.int64)
        known_cpu = hit_miss.sum(axis=(0, 2)).reshape(V).astype(np.int64)
        n_known = len(ch)
    rest_tokens = max(0, (tokens_run if tokens_run is not None else n_known) - n_known)
    rest = np.minimum(rest_tokens, np.maximum(cpu_tokens - known_cpu, 0))
    return {
        "gpu_tokens": total - cpu_tokens,
        "cpu_tokens": cpu_tokens,
        "migrations": migrations,
        "setup_migrations": decision.setup_migrations,
        "bytes_h2d": migrations * expert_bytes,
        "bytes_act": (known_miss_tokens + rest) * act_bytes_per_token,
    }


@dataclass
class PolicyReplay:
    """Counters of one policy over a trace: ``[F, L]`` arrays, plus totals and a table."""

    policy: Policy
    counters: dict[str, np.ndarray]
    times: dict[str, np.ndarray] | None = None  # per resource [F, L] seconds, "layer_s" and "bound_s" [F, L], "fixed_s" [F]

    def seconds(self) -> float:
        """The run's time as the runtime orders its work: the simulator's figure, without events."""
        if self.times is None:
            raise ValueError("replay_policy ran without a cost model")
        return float(self.times["layer_s"].sum() + self.times["fixed_s"].sum())

    def bound_seconds(self) -> float:
        """The run's time when all overlap that the runtime allows happens (needs a cost model)."""
        if self.times is None:
            raise ValueError("replay_policy ran without a cost model")
        return float(self.times["bound_s"].sum() + self.times["fixed_s"].sum())

    def totals(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.counters.items()}

    def hit_ratio(self) -> float:
        g, c = self.counters["gpu_tokens"].sum(), self.counters["cpu_tokens"].sum()
        return float(g / (g + c)) if g + c else 1.0

    def frame(self, trace: "Trace") -> pd.DataFrame:
        """One row per forward and MoE layer, beside the trace's forward columns."""
        F, L = self.counters["gpu_tokens"].shape
        df = pd.DataFrame({"forward": np.repeat(np.arange(F), L), "layer": np.tile(trace.shape.moe_layers, F)})
        for k, v in self.counters.items():
            df[k] = v.reshape(-1)
        return df


def replay_policy(trace: "Trace", policy: Policy, popularity: np.ndarray | None = None,
                  with_act: bool = True, cost: "CostModel | None" = None) -> PolicyReplay:
    """Run ``policy`` over every forward of ``trace`` in order; counters per forward and layer.

    Resident sets carry over between the requests of one trace. ``popularity`` (``[L, E]``
    counts) replaces the first forward's counts for setup. ``with_act=False`` skips the
    per-token ``bytes_act`` work (hit ratios do not need it). With a ``cost`` model the
    replay also prices every forward and layer (``PolicyReplay.times``).
    """
    shape = trace.shape
    runner = PolicyRunner(policy, shape.experts, setup_counts=popularity)
    F, L = trace.n_forwards, shape.n_moe_layers
    out = {k: np.zeros((F, L), dtype=np.int64) for k in COUNTERS}
    exp_bytes = shape.expert_bytes(trace.dtype)
    act = trace.act_bytes_per_token
    kinds = trace.forwards["kind"].to_numpy()
    steps = trace.forwards["step"].to_numpy()
    runs = trace.forwards["tokens_run"].to_numpy()
    ctx = trace.forwards["context"].to_numpy()
    times = None
    if cost is not None:
        from traces.costs import RESOURCES
        times = {k: np.zeros((F, L)) for k in (*RESOURCES, "layer_s", "bound_s")}
        times["fixed_s"] = np.zeros(F)
    for f in range(F):
        decision = runner.step(trace.counts[f], kinds[f], int(steps[f]))
        ch = trace.choices_of(f) if with_act else None
        c = forward_counters(decision, trace.counts[f], exp_bytes, act, ch, int(runs[f]))
        for k in COUNTERS:
            out[k][f] = c[k]
        if times is not None:
            parts = cost.layer_parts(decision, trace.counts[f], c, int(runs[f]), int(ctx[f]))
            lc = cost.layer_costs(parts)
            times["layer_s"][f] = cost.layer_seconds(parts)
            for k, v in lc.items():
                times[k][f] = v
            times["bound_s"][f] = cost.layer_bound(lc, serial_copies=decision.waves is not None)
            times["fixed_s"][f] = cost.fixed_s(int(runs[f]), int(ctx[f]))
    return PolicyReplay(policy=policy, counters=out, times=times)
