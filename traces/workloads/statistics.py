"""Workload statistics: how stable and how concentrated a trace's expert routing is.

``python -m traces.stats TRACE --json`` prints one JSON object:

* ``forwards``, ``layers`` (MoE layers), ``experts``, ``top_k``, ``tokens_generated``,
  ``tokens_per_forward`` (generated tokens per denoising step);
* ``cosine_gap``: for gaps 1..8, the mean cosine similarity of a layer's per-expert count
  vectors over the current block's tokens, between denoising steps ``g`` apart in the same
  block (the paper's temporal-stability measure);
* ``distinct_experts_per_forward``: per MoE layer, the mean number of experts with at
  least one token in a forward (and ``mean`` over layers);
* ``tide_hit_ratio``: for budgets 32, 64, 128 and tau 1..8, the fraction of all routed
  assignments that land on resident experts under ``tide``, replayed with the policy
  functions.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from traces.costs.policy_run import replay_policy
from traces.formats.trace_file import Trace
from traces.policies.spec import Policy

GAPS = tuple(range(1, 9))
BUDGETS = (32, 64, 128)
TAUS = tuple(range(1, 9))


def cosine_gap(trace: Trace, gaps: Iterable[int] = GAPS, per_layer: bool = False,
               within_block: bool = True) -> pd.Series | pd.DataFrame:
    """Mean cosine similarity of block-token expert counts between steps ``g`` apart in a block
    (``within_block=False``: between denoising forwards ``g`` apart in a request, across
    block boundaries too)."""
    fw = trace.forwards
    steps = fw.index[fw["kind"] == "step"].to_numpy()
    order = np.lexsort((fw["step"].to_numpy()[steps], fw["block"].to_numpy()[steps], fw["request"].to_numpy()[steps]))
    steps = steps[order]
    cc = trace.choice_counts()[steps].astype(np.float64)  # [S, L, E]
    norm = np.linalg.norm(cc, axis=2)
    key = fw[["request", "block"]].to_numpy()[steps]
    st = fw["step"].to_numpy()[steps]
    out = {}
    for g in gaps:
        if g >= len(steps):
            out[g] = np.full(trace.shape.n_moe_layers, np.nan)
            continue
        i, j = np.arange(len(steps) - g), np.arange(g, len(steps))
        ok = (key[i] == key[j]).all(axis=1) & (st[j] - st[i] == g) if within_block else key[i, 0] == key[j, 0]
        i, j = i[ok], j[ok]
        den = norm[i] * norm[j]
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where(den > 0, (cc[i] * cc[j]).sum(axis=2) / den, np.nan)
        out[g] = np.nanmean(cos, axis=0) if len(i) else np.full(trace.shape.n_moe_layers, np.nan)
    df = pd.DataFrame(out, index=pd.Index(trace.shape.moe_layers, name="layer"))
    df.columns.name = "gap"
    return df if per_layer else df.mean(axis=0)


def distinct_experts_per_forward(trace: Trace) -> pd.Series:
    """Per MoE layer, the mean number of experts a forward routes at least one token to."""
    d = (trace.counts > 0).sum(axis=2).mean(axis=0)
    return pd.Series(d, index=pd.Index(trace.shape.moe_layers, name="layer"), name="distinct_experts")


def tide_hit_ratio(trace: Trace, budgets: Iterable[int] = BUDGETS, taus: Iterable[int] = TAUS,
                   progress: bool = False) -> pd.DataFrame:
    """Fraction of routed assignments on resident experts under ``tide`` (rows: budget, columns: tau)."""
    L, E = trace.shape.n_moe_layers, trace.shape.experts
    budgets, taus = list(budgets), list(taus)
    grid = [(b, t) for b in budgets for t in taus]
    res = {}
    for b, t in tqdm(grid, desc="tide hit ratio", disable=not progress):
        pol = Policy.make("tide", L, E, budget=min(b, E), tau=t)
        res[(b, t)] = replay_policy(trace, pol, with_act=False).hit_ratio()
    df = pd.Series(res).unstack()
    df.index.name, df.columns.name = "budget", "tau"
    return df


def summarize(trace: Trace, progress: bool = False) -> dict[str, Any]:
    """All statistics as one JSON-ready dict."""
    fw = trace.forwards
    n_steps = int((fw["kind"] == "step").sum())
    cos = cosine_gap(trace)
    distinct = distinct_experts_per_forward(trace)
    hit = tide_hit_ratio(trace, progress=progress)
    return {
        "model": trace.shape.name,
        "kv_cache": trace.decoding.kv_cache,
        "forwards": trace.n_forwards,
        "layers": trace.shape.n_moe_layers,
        "experts": trace.shape.experts,
        "top_k": trace.shape.top_k,
        "requests": len(trace.requests),
        "tokens_generated": trace.tokens_generated,
        "tokens_per_forward": trace.tokens_generated / max(n_steps, 1),
        "cosine_gap": {str(g): _num(v) for g, v in cos.items()},
        "distinct_experts_per_forward": {"mean": float(distinct.mean()),
                                         **{str(l): float(v) for l, v in distinct.items()}},
        "tide_hit_ratio": {str(b): {str(t): float(hit.at[b, t]) for t in hit.columns} for b in hit.index},
    }


def _num(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['model']}  kv_cache={s['kv_cache']}  forwards={s['forwards']}  layers={s['layers']}  "
             f"experts={s['experts']}  tokens={s['tokens_generated']}  tokens/forward={s['tokens_per_forward']:.2f}",
             "cosine by gap:  " + "  ".join(f"{g}:{v:.3f}" for g, v in s["cosine_gap"].items() if v is not None),
             f"distinct experts per layer per forward: {s['distinct_experts_per_forward']['mean']:.1f}",
             "tide hit ratio (rows budget, columns tau 1..8):"]
    for b, row in s["tide_hit_ratio"].items():
        lines.append(f"  B={b:>4}  " + "  ".join(f"{v:.3f}" for v in row.values()))
    return "\n".join(lines)


