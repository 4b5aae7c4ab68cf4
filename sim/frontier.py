"""Choosing the batch size with the plan: a plan per batch size, its serving figures, one chosen.

A batch's KV cache and the expert slots share the GPU, and a larger batch shares each
expert read among more tokens but keeps every request waiting for the others' blocks. So
for each batch size the per-layer program plans on the batched forwards the runtime would
run (:func:`sim.planner.make_plan`), and the serving simulator (:mod:`sim.serve`) runs the
plan on the traces' requests: offline (all at 0; a request's latency is its end time), or
arriving as a Poisson stream at ``arrival_rate``. The choice:

* offline: the most tokens/s, among the batch sizes whose p99 latency meets
  ``latency_p99_s`` when a bound is given (none meets it: an error naming the closest);
* with ``arrival_rate``: the lowest p99 latency among the batch sizes that sustain the rate
  (whose offline throughput in requests/s is at least the rate); none sustains it: an error
  naming the most the box serves, rather than a latency from an unbounded queue.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from sim.planner import make_plan
from sim.simulate import simulate
from traces.common.checks import check_batch_sizes, check_rate
from traces.common.cli import span
from traces.common.errors import TideError
from traces.common.values import need_float
from traces.formats.plan_file import Plan
from traces.formats.profile_file import Profile
from traces.formats.trace_file import Trace
from traces.policies.labels import kinds_label, tau_label
from traces.policies.spec import Policy
from traces.serving.arrivals import poisson
from traces.serving.figures import latency_figures, sustains


@dataclass
class Frontier:
    """Each batch size's plan and figures (``table``: one row per batch size, ``chosen`` marks
    the pick) and the chosen plan, its predictions holding the frontier."""

    table: pd.DataFrame
    plan: Plan
    frames: dict[int, pd.DataFrame]  # each batch size's comparison of the plan and baselines


def check_bounds(latency_p99_s: float | None, arrival_rate: float | None) -> tuple[float | None, float | None]:
    """The latency bound and the arrival rate, each a positive finite number where given."""
    return (None if latency_p99_s is None else need_float(latency_p99_s, "--latency-p99-s", positive=True),
            None if arrival_rate is None else check_rate(arrival_rate))


def serve_figures(traces: Sequence[Trace], profile: Profile, plan: Plan, batch_size: int,
                  arrival_rate: float | None = None, seed: int = 0) -> dict[str, float]:
    """The plan served on the traces' requests at ``batch_size``: tokens/s and requests/s
    (offline), and p50/p99 latency offline or, with ``arrival_rate``, arriving so (each
    trace's requests a stream of its own; the percentiles over every request)."""
    policy = Policy.from_plan(plan, traces[0].shape)
    seconds = tokens = requests = 0.0
    latency = []
    for tr in traces:
        res = simulate(tr, profile, policy, batch_size=batch_size)
        seconds, tokens, requests = seconds + res.seconds, tokens + tr.tokens_generated, requests + len(tr.requests)
        if arrival_rate is not None:
            res = simulate(tr, profile, policy, batch_size=batch_size,
                           arrivals=poisson(arrival_rate, len(tr.requests), seed))
        latency.append(res.requests["latency_s"].to_numpy())
    return {"tokens_per_s": tokens / seconds, "requests_per_s": requests / seconds,
            **latency_figures(np.concatenate(latency))}


def plans_by_batch(traces: Sequence[Trace], profile: Profile, gpu_mem_gb: float, batch_sizes: Sequence[int],
                   names: Sequence[str] | None = None, progress: bool = True,
                   **plan_kw) -> dict[int, tuple[Plan, pd.DataFrame]]:
    """The per-layer plan (and its comparison table) at every batch size: the expensive half.
    ``plan_kw`` goes to :func:`sim.planner.make_plan` (kinds, budget_step, jobs, ...)."""
    sizes = check_batch_sizes(batch_sizes)
    return {b: make_plan(traces, profile, gpu_mem_gb, names=names, progress=False, batch_size=b, **plan_kw)
            for b in tqdm(sizes, desc="planning each batch size", unit="batch size",
                          disable=not progress or len(sizes) == 1)}


def choose(plans: dict[int, tuple[Plan, pd.DataFrame]], traces: Sequence[Trace], profile: Profile,
           latency_p99_s: float | None = None, arrival_rate: float | None = None, seed: int = 0) -> Frontier:
    """Serve each batch size's plan and choose one (module doc); the chosen plan's
    predictions hold the frontier and the rule that chose it."""
    latency_p99_s, arrival_rate = check_bounds(latency_p99_s, arrival_rate)
    rows = []
    for b, (plan, _) in sorted(plans.items()):
        fig = serve_figures(traces, profile, plan, b, arrival_rate, seed)
        rows.append({"batch_size": b, **fig, "kinds": kinds_label(plan.kinds), "tau": tau_label(plan.kinds, plan.tau),
                     "budget": span(plan.budget), "gpu_gb": plan.predicted["gpu_gb"],
                     "host_gb": plan.predicted["host_gb"],
                     # offline requests/s is the most the plan serves: below the rate, the queue grows without bound
                     "sustains": None if arrival_rate is None else sustains(fig["requests_per_s"], arrival_rate)})
    table = pd.DataFrame(rows)
    pick = _choose(table, latency_p99_s, arrival_rate)
    table["chosen"] = table["batch_size"] == pick
    plan = copy.deepcopy(plans[pick][0])
    plan.predicted["frontier"] = table.drop(columns=["chosen"]).to_dict(orient="records")
    plan.predicted["choice"] = {"batch_size": pick, "latency_p99_bound_s": latency_p99_s, "arrival_rate": arrival_rate,
                                "seed": seed if arrival_rate is not None else None}
    return Frontier(table, plan, {b: frame for b, (_, frame) in plans.items()})


def plan_frontier(traces: Sequence[Trace], profile: Profile, gpu_mem_gb: float, batch_sizes: Sequence[int],
                  latency_p99_s: float | None = None, arrival_rate: float | None = None, seed: int = 0,
                  names: Sequence[str] | None = None, progress: bool = True, **plan_kw) -> Frontier:
    """Plan at every batch size, serve each plan, choose (module doc)."""
    check_bounds(latency_p99_s, arrival_rate)  # before the planning, not after it
    plans = plans_by_batch(traces, profile, gpu_mem_gb, batch_sizes, names, progress, **plan_kw)
    return choose(plans, traces, profile, latency_p99_s, arrival_rate, seed)


def _choose(table: pd.DataFrame, latency_p99_s: float | None, arrival_rate: float | None) -> int:
    if arrival_rate is not None:
        ok = table[table["sustains"]]
        if not len(ok):
            best = table.loc[table["requests_per_s"].idxmax()]
            raise TideError(f"--arrival-rate {arrival_rate:g}: the box cannot sustain it at any batch size; at most "
                            f"{best['requests_per_s']:.3g} requests/s (batch {int(best['batch_size'])})")
        return int(ok.loc[ok["latency_p99_s"].idxmin(), "batch_size"])
    if latency_p99_s is not None:
        ok = table[table["latency_p99_s"] <= latency_p99_s]
        if not len(ok):
            near = table.loc[table["latency_p99_s"].idxmin()]
            raise TideError(f"--latency-p99-s {latency_p99_s:g}: no batch size meets it; the closest is batch "
                            f"{int(near['batch_size'])} at p99 {near['latency_p99_s']:.3g} s")
        return int(ok.loc[ok["tokens_per_s"].idxmax(), "batch_size"])
    return int(table.loc[table["tokens_per_s"].idxmax(), "batch_size"])
