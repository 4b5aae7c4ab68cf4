"""The planner's mathematical program: one (tau, B) per MoE layer under one memory limit.

Built by small functions on a table of candidate costs (``seconds[l, t, b]``: layer ``l``'s
predicted time under refresh interval ``taus[t]`` and budget ``budgets[b]``, overlap already
priced the way the simulator prices it), then solved by HiGHS through Pyomo:

    minimise    sum_l sum_{t,b} seconds[l,t,b] x[l,t,b]
    subject to  sum_{t,b} x[l,t,b] = 1                                   for every layer l
                fixed_bytes + expert_bytes sum_{l,t,b} budgets[b] x[l,t,b] <= mem_limit
                x binary;  with ``uniform``: x[l,t,b] = y[t,b], sum y = 1  (the paper's single tau)

Layers run one after another, so their times add. Turning a trace and a profile into the
table (by replaying the policy functions) is the planner's other half.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyomo.environ as pyo

from traces.errors import TideError


@dataclass(frozen=True)
class CandidateTable:
    layers: list[int]  # model layer ids of the MoE layers
    taus: list[int]
    budgets: list[int]
    seconds: np.ndarray  # [L, len(taus), len(budgets)]
    expert_bytes: float  # bytes of one expert slot
    fixed_bytes: float  # non-expert weights and KV cache on the GPU
    mem_limit: float  # bytes of GPU memory the plan may use

    def check(self) -> None:
        L, T, B = len(self.layers), len(self.taus), len(self.budgets)
        if self.seconds.shape != (L, T, B):
            raise TideError(f"candidate table has shape {self.seconds.shape}, expected {(L, T, B)}")
        if not np.isfinite(self.seconds).all():
            raise TideError("candidate table holds non-finite times")
        if self.fixed_bytes + L * self.expert_bytes > self.mem_limit:
            raise TideError(f"--gpu-mem-gb: {self.mem_limit / 1e9:.2f} GB cannot hold the non-expert weights and KV cache "
                            f"({self.fixed_bytes / 1e9:.2f} GB) plus one expert per layer "
                            f"({L * self.expert_bytes / 1e9:.2f} GB)")


@dataclass(frozen=True)
class Solution:
    tau: list[int]
    budget: list[int]
    seconds: float  # the objective: predicted seconds summed over layers
    solve_s: float


def add_choice(m: pyo.ConcreteModel, table: CandidateTable) -> None:
    """Binaries x[l, t, b]: exactly one candidate per layer."""
    m.L = pyo.RangeSet(0, len(table.layers) - 1)
    m.T = pyo.RangeSet(0, len(table.taus) - 1)
    m.B = pyo.RangeSet(0, len(table.budgets) - 1)
    m.x = pyo.Var(m.L, m.T, m.B, domain=pyo.Binary)
    m.one = pyo.Constraint(m.L, rule=lambda m, l: sum(m.x[l, t, b] for t in m.T for b in m.B) == 1)


def add_memory(m: pyo.ConcreteModel, table: CandidateTable) -> None:
    """Non-expert weights, KV cache and every layer's expert slots fit in the limit."""
    slots = sum(table.budgets[b] * m.x[l, t, b] for l in m.L for t in m.T for b in m.B)
    m.memory = pyo.Constraint(expr=table.fixed_bytes + table.expert_bytes * slots <= table.mem_limit)


def add_uniform(m: pyo.ConcreteModel) -> None:
    """All layers take the same (tau, B): the paper's single-interval program."""
    m.y = pyo.Var(m.T, m.B, domain=pyo.Binary)
    m.y_one = pyo.Constraint(expr=sum(m.y[t, b] for t in m.T for b in m.B) == 1)
    m.tied = pyo.Constraint(m.L, m.T, m.B, rule=lambda m, l, t, b: m.x[l, t, b] == m.y[t, b])


def add_objective(m: pyo.ConcreteModel, table: CandidateTable) -> None:
    s = table.seconds
    m.time = pyo.Objective(expr=sum(float(s[l, t, b]) * m.x[l, t, b] for l in m.L for t in m.T for b in m.B),
                           sense=pyo.minimize)


def build(table: CandidateTable, uniform: bool = False) -> pyo.ConcreteModel:
    table.check()
    m = pyo.ConcreteModel(name="tide-plan")
    add_choice(m, table)
    add_memory(m, table)
    if uniform:
        add_uniform(m)
    add_objective(m, table)
    return m


def solve(table: CandidateTable, uniform: bool = False) -> Solution:
    """Build and solve with HiGHS; the chosen tau and budget per layer."""
    m = build(table, uniform)
    t0 = time.perf_counter()
    res = pyo.SolverFactory("appsi_highs").solve(m)
    solve_s = time.perf_counter() - t0
    if res.solver.termination_condition != pyo.TerminationCondition.optimal:
        raise TideError(f"the planner found no feasible plan ({res.solver.termination_condition})")
    tau, budget = [], []
    for l in m.L:
        t, b = next((t, b) for t in m.T for b in m.B if pyo.value(m.x[l, t, b]) > 0.5)
        tau.append(table.taus[t])
        budget.append(table.budgets[b])
    return Solution(tau=tau, budget=budget, seconds=float(pyo.value(m.time)), solve_s=solve_s)
