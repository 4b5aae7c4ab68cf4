"""The planner: the policy kind, GPU expert budget B and (tide) refresh interval tau of
every MoE layer (the library; ``python -m sim.plan`` is its command line).

1. Prices every candidate of every layer on the traces (:mod:`sim.candidates`): ``cpu``;
   ``static``, ``swap`` and ``tide`` at B in 8, 16, ..., experts plus the largest uniform
   budget that fits; tide at every distinct tau in 1..steps.
2. Picks one candidate per layer under the memory limits with the Pyomo/HiGHS program of
   :mod:`sim.plan_program` (``kinds`` restricts the kinds; ``uniform``: one candidate for all
   layers, by default tide's: the paper's program).
3. Simulates the plan, the best uniform setting of any kind and the baselines (``cpu``,
   ``static``, ``swap``, ``tide`` tau=1 at the largest uniform budget that fits).
4. Returns the plan (``tide-plan``: per-layer kind, tau and B, predicted seconds, tokens/s
   and speedups, provenance) and a DataFrame of the policies compared (:func:`make_plan`).
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from sim.candidates import Candidates, HostGrid, Priced, budget_grid, distinct_taus, price_table
from sim.plan_program import CandidateTable, Solution, check_plan_kinds, solve
from sim.simulate import simulate
from traces.common.checks import check_batch_size
from traces.common.cli import span
from traces.common.errors import TideError
from traces.common.files import data_sha256, file_sha256
from traces.common.values import need_float
from traces.costs.memory import MemoryBudget, kv_tokens
from traces.formats.plan_file import Plan
from traces.formats.profile_file import Profile
from traces.formats.trace_file import Trace
from traces.formats.vocabulary import KINDS
from traces.policies.labels import baselines, kinds_label, tau_label
from traces.policies.spec import Policy
from traces.policies.walk import walk_trace
from traces.serving.admission import compose_trace


def check_traces(traces: Sequence[Trace], names: Sequence[str]) -> None:
    """All traces must be of one model and dtype."""
    first = traces[0]
    for tr, name in zip(traces[1:], names[1:]):
        if tr.shape.model_key != first.shape.model_key or tr.shape.experts != first.shape.experts \
                or tr.shape.moe_layers != first.shape.moe_layers:
            raise TideError(f"--trace {name}: a trace of {tr.shape.name}, the first is of {first.shape.name}")
        if tr.dtype != first.dtype:
            raise TideError(f"--trace {name}: dtype {tr.dtype}, the first trace's is {first.dtype}")


def memory(traces: Sequence[Trace], profile: Profile, gpu_mem_gb: float, batch_size: int = 1,
           host_mem_gb: float | None = None, drive: bool = True) -> MemoryBudget:
    """The memory the plan may use: ``gpu_mem_gb`` of the GPU (the batch's KV cache counted),
    ``host_mem_gb`` of host memory (default: the box's) and the box's drive where it has one,
    after one clear error if the limit is impossible (above the box's memory, or short of
    weights, KV cache and one expert per layer, or a tier too small to hold the model).
    ``drive=False``: the box as if it had no drive (GPU and host memory must hold every expert)."""
    need_float(gpu_mem_gb, "--gpu-mem-gb", positive=True)
    host = MemoryBudget.host_limit(host_mem_gb, profile.capacity("host_mem_bytes"), f"{profile.name}'s host")
    mem = MemoryBudget.on_device(traces[0].shape, traces[0].dtype, gpu_mem_gb, profile.capacity("gpu_mem_bytes"),
                                 kv_tokens(traces, batch_size), host, device=f"{profile.name}'s GPU",
                                 drive_bytes=profile.drive("capacity_bytes") if drive and profile.has_drive else None)
    what = f"--gpu-mem-gb {gpu_mem_gb:g}" + (f" at batch {batch_size}" if batch_size > 1 else "")
    mem.check_one_each(what)
    mem.check_holds(f"{what} on {profile.name}")
    return mem


def plan_budgets(mem: MemoryBudget, step: int = 8, extra: Sequence[int] = ()) -> list[int]:
    """The program's candidate budgets at a memory limit: multiples of ``step``, the largest
    uniform budget that fits and ``extra``, each that fits some layer alone."""
    if step < 1:
        raise TideError(f"--budget-step must be at least 1, got {step}")
    return [b for b in budget_grid(mem.shape.experts, step, [mem.largest_uniform(), *extra]) if mem.fits_alone(b)]


def table_at(priced: Priced, box: int, mem: MemoryBudget, profile: Profile, budgets: Sequence[int]) -> CandidateTable:
    """The program's table for one box (``priced``'s ``box``-th profile, ``profile``) and memory
    limit, from candidates priced for more budgets: those of ``budgets`` only. Priced with a
    host tier, each candidate comes at every host budget, at its layer's best host tau."""
    keep = np.isin(priced.cands.budget, list(budgets))
    cands = priced.cands.take(keep)
    if priced.host is None:
        return CandidateTable.of(mem.shape.moe_layers, cands, priced.seconds[box][:, keep], mem)
    hs = priced.host_seconds[box][:, keep]  # [L, C, T, H]
    best = hs.argmin(axis=2)  # [L, C, H]: each layer's best host option per candidate and host budget
    L, C, H = best.shape
    seconds = np.take_along_axis(hs, best[:, :, None, :], axis=2)[:, :, 0, :].reshape(L, C * H)
    return CandidateTable.of(mem.shape.moe_layers, cands.with_host(priced.host.budgets), seconds, mem,
                             best.reshape(L, C * H), priced.host)


def needs_drive(mem: MemoryBudget, profile: Profile) -> bool:
    """Whether to plan a host tier: the box has a drive and host memory cannot hold every
    expert (when it can, keeping them all there is never slower)."""
    s = mem.shape
    return profile.has_drive and s.n_moe_layers * s.experts * mem.expert_bytes > mem.host_limit_bytes


def candidate_table(traces: Sequence[Trace], profile: Profile, mem: MemoryBudget, budget_step: int = 8,
                    jobs: int | None = None, progress: bool = True) -> tuple[CandidateTable, Priced]:
    """Every candidate of every layer priced on the traces (taus that refresh at the same
    forwards, and budgets that cannot fit even alone, left out), and the priced table; with a
    host tier (:func:`needs_drive`), at every host budget and host tau too."""
    budgets = plan_budgets(mem, budget_step)
    taus = distinct_taus(traces, range(1, max(t.decoding.steps for t in traces) + 1))
    host = HostGrid.for_traces(traces) if needs_drive(mem, profile) else None
    priced = price_table(traces, [profile], Candidates.grid(taus, budgets), jobs=jobs, progress=progress, host=host)
    return table_at(priced, 0, mem, profile, budgets), priced


def simulated_seconds(traces: Sequence[Trace], profile: Profile, policy: Policy) -> float:
    """The simulator's time for the traces, each run from an empty placement."""
    return float(sum(simulate(tr, profile, policy).seconds for tr in traces))


def _blocks(traces: Sequence[Trace]) -> int:
    return int(sum(t.forwards[["request", "block"]].drop_duplicates().shape[0] for t in traces))


def make_plan(traces: Sequence[Trace], profile: Profile, gpu_mem_gb: float, uniform: bool = False,
              budget_step: int = 8, jobs: int | None = 1, names: Sequence[str] | None = None,
              progress: bool = True, kinds: Sequence[str] | None = None,
              layer_kinds: Sequence[str] | None = None, batch_size: int = 1,
              host_mem_gb: float | None = None) -> tuple[Plan, pd.DataFrame]:
    """Plan, simulate the plan, the best uniform setting of any kind and the baselines, and
    fill the plan's predictions and provenance.

    ``batch_size`` above 1 plans for the traces' requests run that many per forward: the
    batched forwards :func:`traces.serving.admission.compose_trace` makes (what the runtime runs),
    with the batch's KV cache on the GPU. A static layer's residents are fixed in the plan
    (those of its setup on the first trace, as priced), so the runtime can load them
    straight onto the GPU.

    ``host_mem_gb`` caps host memory (default: the box's). Where it cannot hold every expert
    and the box has a drive, each layer also gets a host budget and host tau (a host tier:
    the rest of its experts are read from the drive), and the baselines run with a cache
    that evicts the least recently used expert (``lru``: what mapping the file gives).

    ``jobs``: processes pricing candidates; the default 1 works from any script, ``None``
    takes every core (spawned workers: the calling script needs an ``if __name__ ==
    "__main__":`` guard, as multiprocessing requires)."""
    names = list(names) if names is not None else [f"trace {i}" for i in range(len(traces))]
    check_traces(traces, names)
    for name, tr in zip(names, traces):
        tr.require_one_request_per_forward(name)
    check_batch_size(batch_size, "--batch-sizes")
    shape, dtype = traces[0].shape, traces[0].dtype
    L, E = shape.n_moe_layers, shape.experts
    check_plan_kinds(L, uniform, kinds, layer_kinds)
    mem = memory(traces, profile, gpu_mem_gb, batch_size, host_mem_gb)
    traces = [compose_trace(t, batch_size) if batch_size > 1 else t for t in traces]  # the forwards that run
    t0 = time.perf_counter()
    table, priced = candidate_table(traces, profile, mem, budget_step, jobs, progress)
    table_s = time.perf_counter() - t0
    fixed_s = float(priced.fixed_s[0])
    best_uniform = solve(table, uniform=True, kinds=KINDS)  # the best uniform setting of any kind
    sol: Solution = solve(table, uniform, kinds, layer_kinds)
    resident = static_residents(traces[0], sol.policy(E))
    plan_policy = Policy.make("plan", L, E, budget=sol.budget, tau=sol.tau, kind=sol.kind,
                              resident=resident or None).with_host(sol.host_policy(E))
    plan_runs = [simulate(tr, profile, plan_policy) for tr in traces]
    plan_s = float(sum(r.seconds for r in plan_runs))
    # the per-layer optimum over every kind holds the best uniform setting: never slower (tested;
    # a hand-chosen mix of kinds, --layer-kinds, may be)
    uni_s = simulated_seconds(traces, profile, best_uniform.policy(E))
    tokens, blocks = sum(t.tokens_generated for t in traces), _blocks(traces)
    u_kind = best_uniform.kind[0]
    rows = [{"policy": "plan", "kinds": kinds_label(sol.kind), "tau": tau_label(sol.kind, sol.tau),
             "budget": span(sol.budget), "seconds": plan_s},
            {"policy": "uniform best", "kinds": u_kind, "tau": tau_label(best_uniform.kind, best_uniform.tau),
             "budget": str(best_uniform.budget[0]), "seconds": uni_s}]
    base_policies = host_baselines(mem, profile, baselines(L, E, mem.largest_uniform()))
    for name, pol in base_policies.items():
        rows.append({"policy": name, "kinds": pol.kinds[0], "tau": "1" if name == "tide_tau1" else "-",
                     "budget": str(int(pol.budget[0])), "seconds": simulated_seconds(traces, profile, pol)})
    frame = pd.DataFrame(rows)
    frame["tokens_per_s"] = tokens / frame["seconds"]
    frame["plan_speedup"] = frame["seconds"] / plan_s
    base = frame.set_index("policy")
    predicted: dict[str, Any] = {
        "seconds": plan_s, "tokens_per_s": tokens / plan_s, "seconds_per_block": plan_s / blocks,
        "program_seconds": sol.seconds + fixed_s, "tokens": tokens, "blocks": blocks,
        "speedup": {n: float(base.loc[n, "plan_speedup"]) for n in base_policies},
        "baselines": {n: {"seconds": float(base.loc[n, "seconds"]), "budget": int(pol.budget[0]),
                          "tau": 1 if n == "tide_tau1" else None} for n, pol in base_policies.items()},
        "uniform_best": {"kind": u_kind, "tau": best_uniform.tau[0], "budget": best_uniform.budget[0], "seconds": uni_s},
    }
    provenance = _provenance(names, traces, profile, table, sol, table_s, uniform, kinds, layer_kinds)
    predicted["host_gb"] = mem.host_need_bytes(sol.kind, sol.budget, sol.host_budget) / 1e9
    predicted["gpu_gb"] = mem.need_bytes(sol.budget) / 1e9
    host = None
    if sol.host_budget is not None:
        hk = sol.host_kind
        host = {"kind": hk[0] if len(set(hk)) == 1 else hk, "budget": sol.host_budget, "tau": sol.host_tau,
                "host_mem_bytes": mem.host_limit_bytes}
        drive = sum(r.drive_reads + r.drive_fills for r in plan_runs) * mem.expert_bytes / 1e9
        predicted["drive_gb_per_forward"] = drive / max(sum(len(r.per_forward) for r in plan_runs), 1)
    plan = Plan.for_shape(shape, sol.tau, sol.budget, kind=sol.kind, dtype=dtype, gpu_mem_bytes=mem.limit_bytes,
                          batch_size=batch_size, resident=resident, host=host, predicted=predicted, provenance=provenance)
    return plan, frame


def host_baselines(mem: MemoryBudget, profile: Profile, policies: dict[str, Policy]) -> dict[str, Policy]:
    """The baselines the box can run: each as it is where host memory holds what it needs;
    where it cannot and the box has a drive, with a host cache evicting the least recently
    used expert at the largest host budget that fits (``lru``: what mapping the checkpoint
    file gives people today)."""
    out = {}
    for name, p in policies.items():
        if mem.host_need_bytes(p.kinds, p.budget) <= mem.host_limit_bytes:
            out[name] = p
        elif needs_drive(mem, profile) and (lru := mem.lru_host(p)) is not None:
            out[f"{name}+lru"] = lru
    return out


def _provenance(names: Sequence[str], traces: Sequence[Trace], profile: Profile, table: CandidateTable, sol: Solution,
                table_s: float, uniform: bool, kinds: Sequence[str] | None,
                layer_kinds: Sequence[str] | None) -> dict[str, Any]:
    """Where a plan came from: when, which TIDE, traces and profile (hashed), solver and candidates."""
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tide": _version("tide"), "mode": "uniform" if uniform else "per-layer",
        "kinds": list(kinds) if kinds is not None else (["tide"] if uniform else list(KINDS)),
        "layer_kinds": list(layer_kinds) if layer_kinds is not None else None,
        "traces": [{"name": n, "sha256": file_sha256(n) if _is_file(n) else None, "forwards": t.n_forwards,
                    "tokens": t.tokens_generated} for n, t in zip(names, traces)],
        "profile": {"name": profile.name, "where": profile.where, "sha256": data_sha256(profile.data),
                    "origin": profile.origin()},
        "solver": {"name": "HiGHS via Pyomo (appsi_highs)", "highspy": _version("highspy"), "pyomo": _version("pyomo"),
                   "build_s": sol.build_s, "solve_s": sol.solve_s, "binaries": sol.variables},
        "candidates": {"taus": sorted(set(table.cands.tau.tolist()) - {0}),
                       "budgets": sorted(set(table.cands.budget.tolist())), "per_layer": len(table.cands),
                       "pricing_s": table_s},
    }


def static_residents(trace: Trace, policy: Policy) -> dict[int, list[int]]:
    """Each static layer's resident experts (``0 < B < E``) as its setup fills them on
    ``trace`` (the first forward's counts, as the planner priced them)."""
    static = [l for l, (k, b) in enumerate(zip(policy.kinds, policy.budget)) if k == "static" and 0 < b < trace.shape.experts]
    if not static:
        return {}
    first = next(walk_trace(trace, policy, with_act=False))
    return {l: np.flatnonzero(first.decision.resident[l]).tolist() for l in static}


def _is_file(name: str) -> bool:
    return Path(name).is_file()


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
