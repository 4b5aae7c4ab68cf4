"""The planner's candidate table: every kind, tau and B of every MoE layer, priced on traces.

A candidate is what one layer may run: ``cpu``; ``static``, ``swap`` or ``tide`` at a budget
of the grid; ``tide`` at every distinct tau. Its cost is its layer's predicted seconds over
the whole trace, summed forward by forward with :meth:`traces.costs.cost_model.CostModel.layer_seconds`
(exactly what the simulator's events add up to, since a layer starts when the previous one
ends). The placements come from the policy functions of ``traces.policies``, not from an
assumed drift rate: one ``plan`` policy with a row per candidate (``C`` rows per layer)
replays the trace once, every row deciding independently on its own layer's counts.

The replay yields each row's work in counts (:mod:`traces.costs.work`), which no box changes, so
one replay is priced on every profile asked for at once: a sweep's points that differ only
in the box or its memory share it.

Layers are independent and run one after another, so a plan's predicted time is the sum
of its layers' candidate costs plus the work outside the MoE layers (dense layers, head),
which no candidate changes. The table also sums each candidate's counters, so a uniform
setting's counters are a column sum too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from traces.common.errors import TideError
from traces.common.pool import worker_pool
from traces.costs.cost_model import CostModel
from traces.costs.work import Work, knots_for, layer_work
from traces.formats.profile_file import Profile
from traces.formats.trace_file import Trace
from traces.formats.vocabulary import COUNTERS, KINDS
from traces.policies.host import HostPolicy, HostRunner, demand, reads_at
from traces.policies.spec import CPU, STATIC, SWAP, TIDE, Policy, check_kinds
from traces.policies.walk import walk_trace

#: Forwards priced at once: fewer numpy calls per forward, bounded memory.
CHUNK = 16


@dataclass(frozen=True)
class Candidates:
    """What a layer may run, the same list for every layer: kind (index into
    :data:`~traces.formats.vocabulary.KINDS`), tau (0 unless tide) and budget, ``[C]`` each."""

    kind: np.ndarray
    tau: np.ndarray
    budget: np.ndarray
    host_budget: np.ndarray | None = None  # [C] experts kept in host memory (None: every expert; a host tier's)

    @classmethod
    def grid(cls, taus: Sequence[int], budgets: Sequence[int], kinds: Sequence[str] = KINDS) -> "Candidates":
        """``cpu`` once; ``static`` and ``swap`` at every budget of at least 1; ``tide`` at every
        tau and budget of at least 1 (at budget 0 every kind is ``cpu``)."""
        check_kinds(kinds, "--kinds")
        pos = sorted({int(b) for b in budgets if b > 0})
        rows: list[tuple[int, int, int]] = []
        if "cpu" in kinds:
            rows.append((CPU, 0, 0))
        for name, k in (("static", STATIC), ("swap", SWAP)):
            if name in kinds:
                rows += [(k, 0, b) for b in pos]
        if "tide" in kinds:
            rows += [(TIDE, int(t), b) for t in taus for b in pos]
        a = np.array(rows, dtype=np.int64).reshape(-1, 3)
        return cls(kind=a[:, 0].astype(np.int8), tau=a[:, 1], budget=a[:, 2])

    def __len__(self) -> int:
        return len(self.kind)

    def take(self, keep: np.ndarray) -> "Candidates":
        """The candidates where ``keep`` (``[C]`` bool) holds."""
        return Candidates(self.kind[keep], self.tau[keep], self.budget[keep],
                          None if self.host_budget is None else self.host_budget[keep])

    def with_host(self, budgets: np.ndarray) -> "Candidates":
        """Every candidate at every host budget of ``budgets`` ([H]), candidate-major."""
        H = len(budgets)
        rep = lambda a: np.repeat(a, H)  # noqa: E731
        return Candidates(rep(self.kind), rep(self.tau), rep(self.budget), np.tile(np.asarray(budgets, np.int64), len(self)))

    def find(self, kind: str, budget: int, tau: int = 0) -> int:
        """The index of a candidate (budget 0 of any kind is ``cpu``); a TideError if absent."""
        k = KINDS.index(kind) if budget else CPU
        hit = np.flatnonzero((self.kind == k) & (self.budget == (budget if k != CPU else 0))
                             & (self.tau == (tau if k == TIDE else 0)))
        if not len(hit):
            raise TideError(f"no candidate {kind} B={budget}" + (f" tau={tau}" if kind == "tide" else ""))
        return int(hit[0])

    def policy(self, n_layers: int, experts: int) -> Policy:
        """One ``plan`` row per (layer, candidate), layer-major."""
        t = lambda a: np.tile(a, n_layers)  # noqa: E731
        return Policy.make("plan", n_layers * len(self), experts, budget=t(self.budget), tau=t(self.tau),
                           kind=[KINDS[k] for k in t(self.kind)])


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


def same_tau(traces: Sequence[Trace], taus: Sequence[int], tau: int) -> int:
    """The tau of ``taus`` that refreshes at the same forwards as ``tau``."""
    key = tuple(refresh_steps(tr, tau) for tr in traces)
    for t in taus:
        if tuple(refresh_steps(tr, t) for tr in traces) == key:
            return int(t)
    raise TideError(f"tau {tau} behaves as none of the candidate taus {list(taus)}")


def budget_grid(experts: int, step: int = 8, extra: Sequence[int] = ()) -> list[int]:
    """``0, step, 2 step, ..., experts`` plus ``extra`` (e.g. the largest uniform budget that fits)."""
    grid = set(range(0, experts + 1, step)) | {experts} | {int(b) for b in extra if 0 <= b <= experts}
    return sorted(grid)


@dataclass(frozen=True)
class HostGrid:
    """The host tier's options the planner prices: host budgets (experts a layer keeps in host
    memory, the rest on the drive), and how the held set changes: ``tide`` at each refresh
    interval of ``taus``, then ``lru`` (options ``[T + 1]``, in that order)."""

    budgets: np.ndarray  # [H] increasing, the last every expert
    taus: np.ndarray  # [T]

    def option(self, i: int) -> tuple[str, int]:
        """The host kind and tau of option ``i``."""
        return ("tide", int(self.taus[i])) if i < len(self.taus) else ("lru", 1)

    @property
    def n_options(self) -> int:
        return len(self.taus) + 1

    @classmethod
    def for_traces(cls, traces: Sequence[Trace], step: int = 32) -> "HostGrid":
        """Host budgets every ``step`` experts (and every expert); taus 1, 2, 4, ... up to a
        block's steps, less those refreshing at the same forwards."""
        E = traces[0].shape.experts
        steps = max(t.decoding.steps for t in traces)
        taus = distinct_taus(traces, [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= max(steps, 1)] or [1])
        return cls(np.array(budget_grid(E, step), np.int64), np.array(taus, np.int64))


@dataclass
class Priced:
    """Candidates priced over traces: seconds ``[P, L, C]`` on each of ``P`` profiles, the
    counters ``[L, C]`` (the same on every box) and the work outside the MoE layers ``[P]``;
    when asked for (one trace), the same per forward: ``forward_s`` ``[P, F, L, C]`` and
    ``forward_fixed_s`` ``[P, F]`` (a request's end offline is a running sum of them)."""

    cands: Candidates
    seconds: np.ndarray
    counters: dict[str, np.ndarray]
    fixed_s: np.ndarray
    forward_s: np.ndarray | None = None
    forward_fixed_s: np.ndarray | None = None
    host: HostGrid | None = None
    host_seconds: np.ndarray | None = None  # [P, L, C, T, H] with a host tier: each host tau and budget
    host_reads: np.ndarray | None = None  # [L, C, T, H] experts read from the drive (fills included)

    def __add__(self, other: "Priced") -> "Priced":
        add = lambda a, b: None if a is None else a + b  # noqa: E731
        return Priced(self.cands, self.seconds + other.seconds,
                      {k: v + other.counters[k] for k, v in self.counters.items()}, self.fixed_s + other.fixed_s,
                      host=self.host, host_seconds=add(self.host_seconds, other.host_seconds),
                      host_reads=add(self.host_reads, other.host_reads))

    @classmethod
    def concat(cls, parts: Sequence["Priced"]) -> "Priced":
        """Layer chunks' prices (in layer order) as one table."""
        per_forward = all(p.forward_s is not None for p in parts)
        host = parts[0].host_seconds is not None
        return cls(parts[0].cands, np.concatenate([p.seconds for p in parts], axis=1),
                   {k: np.concatenate([p.counters[k] for p in parts]) for k in COUNTERS}, parts[0].fixed_s,
                   np.concatenate([p.forward_s for p in parts], axis=2) if per_forward else None,
                   parts[0].forward_fixed_s if per_forward else None, parts[0].host,
                   np.concatenate([p.host_seconds for p in parts], axis=1) if host else None,
                   np.concatenate([p.host_reads for p in parts], axis=0) if host else None)


def price_candidates(trace: Trace, profiles: Sequence[Profile], cands: Candidates,
                     layers: Sequence[int] | None = None, cpu_dtype: str | None = None,
                     progress: bool = False, forwards: bool = False, host: HostGrid | None = None) -> Priced:
    """Replay ``cands`` on ``layers`` (MoE layer indices, default all) of ``trace`` once, from an
    empty placement, and price the work on every profile; setup copies included. A batched
    trace (e.g. :func:`traces.serving.admission.compose_trace`'s) is priced forward by forward as its
    members run together. With ``host``, every candidate is also priced at each host tau and
    budget (a tide host tier, :mod:`traces.policies.host`): the layer's ranking is the same for
    all its candidates, so one pass counts every budget's reads (``host_seconds``)."""
    shape = trace.shape
    layers = np.arange(shape.n_moe_layers) if layers is None else np.asarray(layers)
    L, C = len(layers), len(cands)
    costs = [CostModel(p, shape, trace.dtype, cpu_dtype) for p in profiles]
    knots = knots_for(*[c.knots for c in costs])  # every box's CPU table, exactly
    seconds = np.zeros((len(costs), L * C))
    per_forward = np.zeros((len(costs), trace.n_batched, L * C), np.float32) if forwards else None
    fixed_f = np.zeros((len(costs), trace.n_batched)) if forwards else None
    done = [0]  # forwards flushed so far
    counters = {k: np.zeros(L * C, np.int64) for k in COUNTERS}
    swap = np.tile(cands.kind == SWAP, L)
    parts = [np.flatnonzero(~swap), np.flatnonzero(swap)]  # priced apart: only swap rows have waves
    T, H = (host.n_options, len(host.budgets)) if host is not None else (0, 0)
    host_seconds = np.zeros((len(costs), L * C, T, H)) if host is not None else None
    host_reads = np.zeros((L * C, T, H), np.int64) if host is not None else None
    # tide ranks by a layer's counts: one state per layer serves its candidates; lru by each row's own demand
    runners = [HostRunner(HostPolicy.make("tide", L, shape.experts, shape.experts, int(t)), shape.experts)
               for t in (host.taus if host is not None else [])]
    lru = HostRunner(HostPolicy.make("lru", L * C, shape.experts, shape.experts), shape.experts) if host else None
    drives: list[tuple[np.ndarray, np.ndarray]] = []  # per forward: reads, fills [L * C, T, H]

    def flush(works: list[Work]) -> None:
        if not works:
            return
        w = Work.concat(works)
        n = len(works)
        if host is not None:
            reads = np.concatenate([r for r, _ in drives])  # [n * L * C, T, H]
            fills = np.concatenate([f for _, f in drives])
        for rows in parts:
            if not len(rows):
                continue
            pick = (np.arange(n)[:, None] * L * C + rows[None, :]).reshape(-1)
            sub = w.take(pick)
            for p, cost in enumerate(costs):
                priced = cost.price(sub)
                each = cost.layer_seconds(priced).reshape(n, len(rows))
                seconds[p, rows] += each.sum(axis=0)
                if per_forward is not None:
                    per_forward[p, done[0]:done[0] + n][:, rows] = each  # a view: assigned in place
                if T:
                    tiled = _tiled(priced, H)  # every host budget at once: the rows repeated, budget-major
                for t in range(T):
                    more = {**tiled, "drive": cost.drive_s(reads[pick, t, :].T.reshape(-1)),
                            "fill": cost.drive_s(fills[pick, t, :].T.reshape(-1))}
                    each_h = cost.layer_seconds(more).reshape(H, n, len(rows)).sum(axis=1)  # [H, rows]
                    host_seconds[p, rows, t, :] += each_h.T
        done[0] += n
        works.clear()
        drives.clear()

    walk = walk_trace(trace, cands.policy(L, shape.experts), layers=layers, group=C)
    works: list[Work] = []
    fixed = np.zeros(len(costs))
    for fw in tqdm(walk, total=trace.n_batched, desc=f"pricing {L * C} candidates", unit="forward",
                   disable=not progress, leave=False):
        for k in COUNTERS:
            counters[k] += fw.counters[k]
        works.append(layer_work(fw.decision, fw.counts, fw.counters, costs[0].act_bytes, knots, fw.member_tokens,
                                fw.member_context, fw.segments))
        if host is not None:
            need = demand(fw.decision, fw.counts)  # [L * C, E]
            more = [(trace.forwards["kind"].iat[int(i)], int(trace.forwards["step"].iat[int(i)])) for i in fw.rows[1:]]
            per = []
            for hr in runners:
                hr.begin(fw.kind, fw.step, more)
                before = hr.advance(np.arange(L), fw.counts, need.reshape(L, C, -1).any(axis=1))
                per.append(reads_at(before, hr.state, need, host.budgets, group=C))
            lru.begin(fw.kind, fw.step, more)
            before = lru.advance(np.arange(L * C), np.repeat(fw.counts, C, axis=0), need)
            per.append(reads_at(before, lru.state, need, host.budgets))
            r, f = (np.stack([x[i] for x in per], axis=1) for i in (0, 1))  # [L * C, T, H]
            host_reads += r + f
            drives.append((r, f))
        one = [c.fixed_s(fw.member_tokens, fw.member_context) for c in costs]
        fixed += one
        if fixed_f is not None:
            fixed_f[:, fw.f] = one
        if len(works) == CHUNK:
            flush(works)
    flush(works)
    return Priced(cands, seconds.reshape(len(costs), L, C), {k: v.reshape(L, C) for k, v in counters.items()}, fixed,
                  None if per_forward is None else per_forward.reshape(len(costs), trace.n_batched, L, C), fixed_f,
                  host, None if host is None else host_seconds.reshape(len(costs), L, C, T, H),
                  None if host is None else host_reads.reshape(L, C, T, H))


def _tiled(parts: dict[str, object], times: int) -> dict[str, object]:
    """Priced parts (each ``[R]`` per row, waves as tuples of those) with every row repeated
    ``times`` times, block after block."""
    out: dict[str, object] = {}
    for k, v in parts.items():
        if k == "waves":
            out[k] = [tuple(np.tile(a, times) for a in w) for w in v]
        else:
            out[k] = np.tile(np.asarray(v), times)
    return out


def _some_layers(args: tuple) -> Priced:
    traces, profiles, cands, layers, cpu_dtype, host = args
    out = None
    for tr in traces:
        p = price_candidates(tr, profiles, cands, layers, cpu_dtype, host=host)
        out = p if out is None else out + p
    return out


def price_table(traces: Sequence[Trace], profiles: Sequence[Profile], cands: Candidates,
                cpu_dtype: str | None = None, jobs: int | None = None, progress: bool = True,
                host: HostGrid | None = None) -> Priced:
    """:func:`price_candidates` of every MoE layer summed over ``traces`` (each replayed from
    an empty placement), layers spread over ``jobs`` processes (default: every core)."""
    L = traces[0].shape.n_moe_layers
    jobs = max(1, min(jobs or os.cpu_count() or 1, L))
    chunks = np.array_split(np.arange(L), min(L, 4 * jobs)) if jobs > 1 else [np.arange(L)]
    tasks = [(list(traces), list(profiles), cands, c, cpu_dtype, host) for c in chunks]
    bar = dict(total=len(tasks), desc=f"pricing {len(cands)} candidates x {L} layers", unit="chunk",
               disable=not progress)
    if jobs == 1:
        parts = [_some_layers(t) for t in tqdm(tasks, **bar)]
    else:
        with worker_pool(jobs) as pool:
            parts = list(tqdm(pool.imap(_some_layers, tasks), **bar))
    return Priced.concat(parts)
