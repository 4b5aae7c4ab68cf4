"""The planner's mathematical program: one candidate per MoE layer under the memory limits.

Built by small functions on a table of candidate costs (``seconds[l, c]``: layer ``l``'s
predicted time under candidate ``c``, a kind with its budget and, for tide, its tau:
:class:`sim.candidates.Candidates`; overlap already priced the way the simulator prices
it), then solved by HiGHS through Pyomo:

    minimise    sum_l sum_c seconds[l,c] x[l,c]
    subject to  sum_c x[l,c] = 1                                          for every layer l
                fixed_bytes + expert_bytes sum_{l,c} budget[c] x[l,c] <= mem_limit       (GPU)
                expert_bytes sum_{l,c} host_experts[c] x[l,c] <= host_limit              (host)
                x binary
    uniform: every layer takes the same candidate, x[l,c] = y[c], substituted: binaries
             y[c] only, each priced at sum_l seconds[l,c] (by default over tide's
             candidates: the paper's one-tau program)

Layers run one after another, so their times add. The host holds only the experts a layer
can miss (:func:`traces.costs.memory.host_experts`: none at a budget of every expert, a static
layer's non-resident ones, every expert for tide, swap and cpu), so a large model fits a
box whose GPU and host hold it between them. Memory depends on the budget and the host
experts alone, so for the per-layer program only each layer's Pareto candidates can be
optimal: those no candidate beats with no more slots and no more host experts. The program
holds those binaries only (an exact reduction; tens per layer instead of hundreds). Turning a trace and
a profile into the table (by replaying the policy functions) is the planner's other half.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyomo.environ as pyo

from sim.candidates import Candidates, HostGrid
from traces.common.cli import span
from traces.common.errors import TideError
from traces.costs.memory import MemoryBudget, host_experts
from traces.formats.vocabulary import KINDS
from traces.policies.host import HostPolicy
from traces.policies.spec import Policy, check_kinds

_SOLVING = threading.Lock()


@dataclass(frozen=True)
class CandidateTable:
    layers: list[int]  # model layer ids of the MoE layers
    cands: Candidates
    seconds: np.ndarray  # [L, C]
    expert_bytes: float  # bytes of one expert slot
    fixed_bytes: float  # non-expert weights and KV cache on the GPU
    mem_limit: float  # bytes of GPU memory the plan may use
    host_experts: np.ndarray | None = None  # [C] experts a layer keeps in host memory under each candidate
    host_limit: float = float("inf")  # bytes of host memory for experts
    host_option: np.ndarray | None = None  # [L, C] with a host tier: each layer's best host option per candidate
    host_grid: "HostGrid | None" = None  # what the options are

    @classmethod
    def of(cls, layers: list[int], cands: Candidates, seconds: np.ndarray, mem: MemoryBudget,
           host_option: np.ndarray | None = None, host_grid: "HostGrid | None" = None) -> "CandidateTable":
        """The program's data from priced candidates and the run's memory budget; candidates with
        host budgets (a host tier) keep at most those in host memory, beside the staging for
        reads from the drive, which the host limit sets apart."""
        held = host_experts(mem.shape, [KINDS[k] for k in cands.kind], cands.budget)
        limit = mem.host_limit_bytes
        if cands.host_budget is not None:
            held = np.minimum(held, cands.host_budget)
            limit -= mem.staging_experts() * mem.expert_bytes
        return cls(layers=layers, cands=cands, seconds=seconds, expert_bytes=mem.expert_bytes,
                   fixed_bytes=mem.fixed_bytes, mem_limit=mem.limit_bytes, host_experts=held, host_limit=limit,
                   host_option=host_option, host_grid=host_grid)

    @property
    def host(self) -> np.ndarray:
        """``[C]`` experts kept in host memory per candidate (none given: none)."""
        return np.zeros(len(self.cands), np.int64) if self.host_experts is None else np.asarray(self.host_experts)

    def check(self, allowed: np.ndarray) -> None:
        """``allowed`` ``[L, C]``: what each layer may take."""
        L, C = len(self.layers), len(self.cands)
        if self.seconds.shape != (L, C):
            raise TideError(f"candidate table has shape {self.seconds.shape}, expected {(L, C)}")
        if not np.isfinite(self.seconds).all():
            raise TideError("candidate table holds non-finite times")
        if not allowed.any(axis=1).all():
            raise TideError("--kinds: no candidate of these kinds")
        big = np.iinfo(np.int64).max
        least = np.where(allowed, self.cands.budget[None, :], big).min(axis=1)
        if self.fixed_bytes + least.sum() * self.expert_bytes > self.mem_limit:
            raise TideError(f"no plan fits: every layer at its smallest candidate budget ({span(least.tolist())}) "
                            f"needs more than {self.mem_limit / 1e9:.2f} GB")
        host = np.where(allowed, self.host[None, :], big).min(axis=1)
        if host.sum() * self.expert_bytes > self.host_limit:
            raise TideError(f"no plan fits in host memory: every layer keeping its fewest experts there "
                            f"({span(host.tolist())}) needs {host.sum() * self.expert_bytes / 1e9:.1f} GB, "
                            f"{self.host_limit / 1e9:.1f} GB available (only static layers and layers wholly "
                            "on the GPU keep fewer than every expert there)")


@dataclass(frozen=True)
class Solution:
    kind: list[str]
    tau: list[int]  # 0 where the kind is not tide
    budget: list[int]
    seconds: float  # the objective: predicted seconds summed over layers
    build_s: float  # building the Pyomo model
    solve_s: float  # HiGHS, through Pyomo
    variables: int  # binaries
    host_budget: list[int] | None = None  # with a host tier: experts each layer keeps in host memory
    host_tau: list[int] | None = None  # and its held set's refresh interval
    host_kind: list[str] | None = None  # and how that set changes (tide or lru)

    def policy(self, experts: int) -> Policy:
        """The solution as the ``plan`` policy the runtime and the simulator run."""
        p = Policy.make("plan", len(self.tau), experts, budget=self.budget, tau=self.tau, kind=self.kind)
        return p.with_host(self.host_policy(experts))

    def host_policy(self, experts: int) -> HostPolicy | None:
        """The host tier chosen (None: host memory holds every expert)."""
        if self.host_budget is None:
            return None
        return HostPolicy.make(self.host_kind, len(self.tau), experts, self.host_budget, self.host_tau)


def allowed_candidates(cands: Candidates, kinds: Sequence[str] | None, uniform: bool) -> np.ndarray:
    """``[C]`` bool: the candidates of ``kinds`` (default: every kind; the uniform program:
    tide, whose budget 0 is cpu). ``cpu`` comes with ``tide``: tide at budget 0 is cpu."""
    kinds = list(kinds) if kinds is not None else (["tide"] if uniform else list(KINDS))
    check_kinds(kinds, "--kinds")
    names = set(kinds) | ({"cpu"} if "tide" in kinds else set())
    return np.isin(cands.kind, [KINDS.index(k) for k in names])


def check_plan_kinds(n_layers: int, uniform: bool, kinds: Sequence[str] | None, layer_kinds: Sequence[str] | None) -> None:
    """The kinds asked for, before any work: names among :data:`KINDS`; ``layer_kinds`` one
    per MoE layer, and neither with ``uniform`` nor with ``kinds``."""
    if kinds is not None:
        check_kinds(kinds, "--kinds")
    if layer_kinds is None:
        return
    if uniform or kinds is not None:
        raise TideError("--layer-kinds: a kind per layer, so neither --uniform nor --kinds")
    if len(layer_kinds) != n_layers:
        raise TideError(f"--layer-kinds: expected one kind for each of the {n_layers} MoE layers, got {len(layer_kinds)}")
    check_kinds(layer_kinds, "--layer-kinds")


def allowed_per_layer(table: CandidateTable, kinds: Sequence[str] | None, uniform: bool,
                      layer_kinds: Sequence[str] | None) -> np.ndarray:
    """``[L, C]`` bool: what each layer may take: ``kinds`` for every layer, or exactly the
    kind ``layer_kinds`` names for each (a mix chosen by hand, its budgets and taus planned)."""
    L = len(table.layers)
    check_plan_kinds(L, uniform, kinds, layer_kinds)
    if layer_kinds is None:
        return np.broadcast_to(allowed_candidates(table.cands, kinds, uniform), (L, len(table.cands)))
    return table.cands.kind[None, :] == np.array([KINDS.index(k) for k in layer_kinds])[:, None]


def pareto(table: CandidateTable, allowed: np.ndarray) -> list[tuple[int, int]]:
    """(layer, candidate) of each layer's Pareto candidates among ``allowed`` ``[L, C]``: a
    candidate is dropped when another is faster with no more slots and no more host experts,
    or as fast, no larger on both, and first in (budget, host, candidate) order."""
    s, b, h = table.seconds, table.cands.budget, table.host
    keep = []
    for l in range(s.shape[0]):
        idx = np.flatnonzero(allowed[l])
        order = idx[np.lexsort((idx, h[idx], b[idx]))]  # by budget, host experts, candidate order
        sl, bl, hl = s[l, order], b[order], h[order]
        rank = np.arange(len(order))
        no_more = (bl[:, None] <= bl[None, :]) & (hl[:, None] <= hl[None, :])  # [d, c]: d needs no more than c
        beats = no_more & ((sl[:, None] < sl[None, :]) | ((sl[:, None] == sl[None, :]) & (rank[:, None] < rank[None, :])))
        keep += [(l, int(c)) for c, dominated in zip(order, beats.any(axis=0)) if not dominated]
    return keep


def add_choice(m: pyo.ConcreteModel, table: CandidateTable, allowed: np.ndarray, uniform: bool) -> None:
    """Binaries: exactly one candidate per layer (``x[l, c]``, Pareto candidates only), or
    one for all layers (``y[c]``)."""
    if uniform:
        m.C = pyo.Set(initialize=np.flatnonzero(allowed.all(axis=0)).tolist())
        m.y = pyo.Var(m.C, domain=pyo.Binary)
        m.one = pyo.Constraint(expr=sum(m.y[c] for c in m.C) == 1)
    else:
        m.L = pyo.RangeSet(0, len(table.layers) - 1)
        m.X = pyo.Set(initialize=pareto(table, allowed), dimen=2)
        m.x = pyo.Var(m.X, domain=pyo.Binary)
        by_layer: dict[int, list] = {}
        for l, c in m.X:
            by_layer.setdefault(l, []).append(m.x[l, c])
        m.one = pyo.Constraint(m.L, rule=lambda m, l: sum(by_layer[l]) == 1)


def add_memory(m: pyo.ConcreteModel, table: CandidateTable, uniform: bool) -> None:
    """Non-expert weights, KV cache and every layer's expert slots fit in the GPU limit, and
    the experts layers keep in host memory fit the host's."""
    b, h = table.cands.budget, table.host

    def total(per: np.ndarray):
        if uniform:
            return len(table.layers) * sum(int(per[c]) * m.y[c] for c in m.C)
        return sum(int(per[c]) * m.x[l, c] for l, c in m.X)
    m.memory = pyo.Constraint(expr=table.fixed_bytes + table.expert_bytes * total(b) <= table.mem_limit)
    if np.isfinite(table.host_limit) and h.any():
        m.host_memory = pyo.Constraint(expr=table.expert_bytes * total(h) <= table.host_limit)


def add_objective(m: pyo.ConcreteModel, table: CandidateTable, uniform: bool) -> None:
    """Layers run one after another: the predicted time is the sum of the chosen candidates'."""
    s = table.seconds
    if uniform:
        per = s.sum(axis=0)
        expr = sum(float(per[c]) * m.y[c] for c in m.C)
    else:
        expr = sum(float(s[l, c]) * m.x[l, c] for l, c in m.X)
    m.time = pyo.Objective(expr=expr, sense=pyo.minimize)


def build(table: CandidateTable, uniform: bool = False, kinds: Sequence[str] | None = None,
          layer_kinds: Sequence[str] | None = None) -> pyo.ConcreteModel:
    allowed = allowed_per_layer(table, kinds, uniform, layer_kinds)
    table.check(allowed)
    m = pyo.ConcreteModel(name="tide-plan")
    add_choice(m, table, allowed, uniform)
    add_memory(m, table, uniform)
    add_objective(m, table, uniform)
    return m


def solve(table: CandidateTable, uniform: bool = False, kinds: Sequence[str] | None = None,
          layer_kinds: Sequence[str] | None = None) -> Solution:
    """Build and solve with HiGHS; the chosen kind, tau and budget per layer."""
    t0 = time.perf_counter()
    m = build(table, uniform, kinds, layer_kinds)
    t1 = time.perf_counter()
    with _SOLVING:  # Pyomo's solver plumbing is not thread-safe (threaded Dask workers)
        res = pyo.SolverFactory("appsi_highs").solve(m, load_solutions=False)
        if res.solver.termination_condition == pyo.TerminationCondition.optimal:
            m.solutions.load_from(res)
    t2 = time.perf_counter()
    if res.solver.termination_condition != pyo.TerminationCondition.optimal:
        raise TideError(f"the planner found no plan that fits both the GPU and the host memory "
                        f"({res.solver.termination_condition})")
    L = len(table.layers)
    if uniform:
        picks = [next(c for c in m.C if pyo.value(m.y[c]) > 0.5)] * L
    else:
        chosen = {l: c for l, c in m.X if pyo.value(m.x[l, c]) > 0.5}
        picks = [chosen[l] for l in m.L]
    cd = table.cands
    hb = ht = hk = None
    if cd.host_budget is not None:
        hb = [int(cd.host_budget[c]) for c in picks]
        opts = [table.host_grid.option(int(table.host_option[l, c])) for l, c in enumerate(picks)]
        hk, ht = [k for k, _ in opts], [t for _, t in opts]
    return Solution(kind=[KINDS[cd.kind[c]] for c in picks], tau=[int(cd.tau[c]) for c in picks],
                    budget=[int(cd.budget[c]) for c in picks], seconds=float(pyo.value(m.time)),
                    build_s=t1 - t0, solve_s=t2 - t1, variables=len(m.C) if uniform else len(m.X),
                    host_budget=hb, host_tau=ht, host_kind=hk)
