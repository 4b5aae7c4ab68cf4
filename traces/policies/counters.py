"""The contract's counters, defined once (a replay over a whole trace: :mod:`traces.policies.walk`).

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

import numpy as np

from traces.policies.decision import Decision


def cpu_mask(decision: Decision, counts: np.ndarray) -> np.ndarray:
    """``[L, G, E]`` experts whose tokens this forward computes on the CPU (``G`` rows per layer)."""
    L, E = counts.shape
    miss = (counts > 0)[:, None, :] & ~decision.resident.reshape(L, -1, E)
    if decision.swap is not None:  # swap rows copy every chosen expert in: nothing on the CPU
        miss &= ~decision.swap.reshape(L, -1, 1)
    return miss


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
