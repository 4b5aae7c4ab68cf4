"""The planner's mathematical program: one (tau, B) per MoE layer under one memory limit.

Built by small functions on a table of candidate costs (``seconds[l, t, b]``: layer ``l``'s
predicted time under refresh interval ``taus[t]`` and budget ``budgets[b]``, overlap already
priced the way the simulator prices it), then solved by HiGHS through Pyomo:

    minimise    sum_l sum_{t,b} seconds[l,t,b] x[l,t,b]
    subject to  sum_{t,b} x[l,t,b] = 1                                   for every layer l
                fixed_bytes + expert_bytes sum_{l,t,b} budgets[b] x[l,t,b] <= mem_limit
                x binary
    uniform (the paper's single tau): every layer takes the same candidate, x[l,t,b] = y[t,b],
                substituted: binaries y[t,b] only, each priced at sum_l seconds[l,t,b]

Layers run one after another, so their times add. Memory depends on B alone, so for the
per-layer program only each layer's Pareto candidates can be optimal: for each B its best
tau, and only if it is faster than every smaller B. The program holds those binaries only
(an exact reduction; tens per layer instead of taus x budgets). Turning a trace and a
profile into the table (by replaying the policy functions) is the planner's other half.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pyomo.environ as pyo

from traces.errors import TideError
from traces.memory import MemoryBudget
from traces.policies import Policy


_SOLVING = threading.Lock()


@dataclass(frozen=True)
class CandidateTable:
    layers: list[int]  # model layer ids of the MoE layers
    taus: list[int]
    budgets: list[int]
    seconds: np.ndarray  # [L, len(taus), len(budgets)]
    expert_bytes: float  # bytes of one expert slot
    fixed_bytes: float  # non-expert weights and KV cache on the GPU
    mem_limit: float  # bytes of GPU memory the plan may use

    @classmethod
    def of(cls, layers: list[int], taus: list[int], budgets: list[int], seconds: np.ndarray,
           mem: MemoryBudget) -> "CandidateTable":
        """The program's data from priced candidates and the run's memory budget."""
        return cls(layers=layers, taus=taus, budgets=budgets, seconds=seconds, expert_bytes=mem.expert_bytes,
                   fixed_bytes=mem.fixed_bytes, mem_limit=mem.limit_bytes)

    def check(self) -> None:
        L, T, B = len(self.layers), len(self.taus), len(self.budgets)
        if self.seconds.shape != (L, T, B):
            raise TideError(f"candidate table has shape {self.seconds.shape}, expected {(L, T, B)}")
        if not np.isfinite(self.seconds).all():
            raise TideError("candidate table holds non-finite times")
        if self.fixed_bytes + L * min(self.budgets) * self.expert_bytes > self.mem_limit:
            raise TideError(f"no plan fits: every layer at its smallest candidate budget ({min(self.budgets)}) "
                            f"needs more than {self.mem_limit / 1e9:.2f} GB")


@dataclass(frozen=True)
class Solution:
    tau: list[int]
    budget: list[int]
    seconds: float  # the objective: predicted seconds summed over layers
    build_s: float  # building the Pyomo model
    solve_s: float  # HiGHS, through Pyomo
    variables: int  # binaries

    def policy(self, experts: int) -> Policy:
        """The solution as the ``plan`` policy the runtime and the simulator run."""
        return Policy.make("plan", len(self.tau), experts, budget=self.budget, tau=self.tau)


def pareto(table: CandidateTable) -> list[tuple[int, int, int]]:
    """(layer, tau index, budget index) of each layer's Pareto candidates (see module doc)."""
    s = table.seconds
    order = np.argsort(table.budgets, kind="stable")
    keep = []
    for l in range(s.shape[0]):
        best = np.inf
        for b in order:
            t = int(np.argmin(s[l, :, b]))  # ties: the smallest tau
            if s[l, t, b] < best:
                best = s[l, t, b]
                keep.append((l, t, int(b)))
    return keep


def add_choice(m: pyo.ConcreteModel, table: CandidateTable, uniform: bool) -> None:
    """Binaries: exactly one candidate per layer (``x[l, t, b]``, Pareto candidates only), or
    one for all layers (``y[t, b]``)."""
    m.T = pyo.RangeSet(0, len(table.taus) - 1)
    m.B = pyo.RangeSet(0, len(table.budgets) - 1)
    if uniform:
        m.y = pyo.Var(m.T, m.B, domain=pyo.Binary)
        m.one = pyo.Constraint(expr=sum(m.y[t, b] for t in m.T for b in m.B) == 1)
    else:
        m.L = pyo.RangeSet(0, len(table.layers) - 1)
        m.C = pyo.Set(initialize=pareto(table), dimen=3)
        m.x = pyo.Var(m.C, domain=pyo.Binary)
        m.one = pyo.Constraint(m.L, rule=lambda m, l: sum(m.x[c] for c in m.C if c[0] == l) == 1)


def add_memory(m: pyo.ConcreteModel, table: CandidateTable, uniform: bool) -> None:
    """Non-expert weights, KV cache and every layer's expert slots fit in the limit."""
    if uniform:
        slots = len(table.layers) * sum(table.budgets[b] * m.y[t, b] for t in m.T for b in m.B)
    else:
        slots = sum(table.budgets[b] * m.x[l, t, b] for l, t, b in m.C)
    m.memory = pyo.Constraint(expr=table.fixed_bytes + table.expert_bytes * slots <= table.mem_limit)


def add_objective(m: pyo.ConcreteModel, table: CandidateTable, uniform: bool) -> None:
    """Layers run one after another: the predicted time is the sum of the chosen candidates'."""
    s = table.seconds
    if uniform:
        per = s.sum(axis=0)
        expr = sum(float(per[t, b]) * m.y[t, b] for t in m.T for b in m.B)
    else:
        expr = sum(float(s[l, t, b]) * m.x[l, t, b] for l, t, b in m.C)
    m.time = pyo.Objective(expr=expr, sense=pyo.minimize)


def build(table: CandidateTable, uniform: bool = False) -> pyo.ConcreteModel:
    table.check()
    m = pyo.ConcreteModel(name="tide-plan")
    add_choice(m, table, uniform)
    add_memory(m, table, uniform)
    add_objective(m, table, uniform)
    return m


def solve(table: CandidateTable, uniform: bool = False) -> Solution:
    """Build and solve with HiGHS; the chosen tau and budget per layer."""
    t0 = time.perf_counter()
    m = build(table, uniform)
    t1 = time.perf_counter()
    with _SOLVING:  # Pyomo's solver plumbing is not thread-safe (threaded Dask workers)
        res = pyo.SolverFactory("appsi_highs").solve(m)
    t2 = time.perf_counter()
    if res.solver.termination_condition != pyo.TerminationCondition.optimal:
        raise TideError(f"the planner found no feasible plan ({res.solver.termination_condition})")
    L = len(table.layers)
    if uniform:
        t, b = next((t, b) for t in m.T for b in m.B if pyo.value(m.y[t, b]) > 0.5)
        picks = [(t, b)] * L
    else:
        chosen = {l: (t, b) for l, t, b in m.C if pyo.value(m.x[l, t, b]) > 0.5}
        picks = [chosen[l] for l in m.L]
    return Solution(tau=[table.taus[t] for t, _ in picks], budget=[table.budgets[b] for _, b in picks],
                    seconds=float(pyo.value(m.time)), build_s=t1 - t0, solve_s=t2 - t1,
                    variables=len(table.taus) * len(table.budgets) if uniform else len(m.C))
