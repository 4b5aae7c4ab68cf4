"""Walking a trace under a policy: each forward's placement decision and counters, in order.

The policy counters (:func:`replay_policy`), the simulator (``sim.simulate.simulate``) and
the planner's candidate table (``sim.candidates``) all walk a trace the same way: take a
forward's per-layer counts, let :class:`traces.policies.runner.PolicyRunner` decide, count what
the decision does (:func:`traces.policies.counters.forward_counters`). :func:`replay` is that walk,
once; each consumer prices or records what it yields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from traces.formats.vocabulary import COUNTERS
from traces.policies.counters import forward_counters
from traces.policies.decision import Decision
from traces.policies.runner import PolicyRunner
from traces.policies.spec import Policy

if TYPE_CHECKING:
    from traces.costs.cost_model import CostModel
    from traces.formats.trace_file import Trace


@dataclass(frozen=True)
class Forward:
    """One replayed forward: what ran, what the policy decided, what that cost in counters."""

    f: int
    kind: str
    step: int
    tokens_run: int
    context: int
    counts: np.ndarray  # [L, E] of the replayed layers
    decision: Decision
    counters: dict[str, np.ndarray]  # each [rows] (the decision's rows: layers x group)
    rows: np.ndarray  # its members: rows of ``trace.forwards`` (one in a batch-1 trace)
    member_tokens: np.ndarray  # [members] tokens each runs
    member_context: np.ndarray  # [members] each one's context
    segments: np.ndarray | None = None  # [L, E] members with tokens on each expert, when batched


def replay(trace: "Trace", policy: Policy, popularity: np.ndarray | None = None, with_act: bool = True,
           layers: Sequence[int] | None = None, group: int = 1,
           schedule: Sequence[np.ndarray] | None = None) -> Iterator[Forward]:
    """Every forward of ``trace`` in order under ``policy`` (resident sets carry over between
    its requests). ``popularity`` (``[L, E]``) replaces the first forward's counts for setup;
    ``with_act=False`` skips the per-token ``bytes_act`` work; ``layers`` (MoE layer indices)
    replays only those; ``group`` rows per layer decide on that layer's counts (the planner's
    candidates, see :class:`~traces.policies.runner.PolicyRunner`). ``schedule`` lists each
    forward's members (rows of ``trace.forwards``; default: the forwards the trace recorded):
    a batched forward routes its members' tokens together (their counts added) and refreshes
    where any member would, as the runtime's engine does. A batched forward's ``context`` is
    its longest member's."""
    shape = trace.shape
    runner = PolicyRunner(policy, shape.experts, setup_counts=popularity, group=group)
    fw = trace.forwards
    kinds, steps = fw["kind"].to_numpy(), fw["step"].to_numpy()
    runs, ctx = fw["tokens_run"].to_numpy(), fw["context"].to_numpy()
    exp_bytes, act = shape.expert_bytes(trace.dtype), trace.act_bytes_per_token
    sel = slice(None) if layers is None else np.asarray(layers)
    for f, rows in enumerate(trace.schedule() if schedule is None else schedule):
        r = int(rows[0])
        segments = None
        if len(rows) == 1:  # the common case, kept cheap
            counts, more, run, context = trace.counts[r][sel], (), int(runs[r]), int(ctx[r])
        else:
            own = trace.counts[rows][:, sel]
            counts, segments = own.sum(axis=0), (own > 0).sum(axis=0)
            more = [(kinds[i], int(steps[i])) for i in rows[1:]]
            run, context = int(runs[rows].sum()), int(ctx[rows].max())
        decision = runner.step(counts, kinds[r], int(steps[r]), more)
        ch = None
        if with_act:
            ch = np.concatenate([trace.choices_of(int(i))[:, sel] for i in rows]) if len(rows) > 1 \
                else trace.choices_of(r)[:, sel]
        c = forward_counters(decision, counts, exp_bytes, act, ch, run)
        rows = np.asarray(rows)
        yield Forward(f, str(kinds[r]), int(steps[r]), run, context, counts, decision, c, rows, runs[rows], ctx[rows],
                      segments)


@dataclass
class PolicyReplay:
    """Counters of one policy over a trace: ``[F, L]`` arrays, plus totals and, with a cost
    model, seconds per resource and forward."""

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


def replay_policy(trace: "Trace", policy: Policy, popularity: np.ndarray | None = None,
                  with_act: bool = True, cost: "CostModel | None" = None) -> PolicyReplay:
    """:func:`replay` collected into ``[F, L]`` counters (``F``: the forwards run); with a
    ``cost`` model each forward and layer is also priced (``PolicyReplay.times``)."""
    F, L = trace.n_batched, trace.shape.n_moe_layers
    out = {k: np.zeros((F, L), dtype=np.int64) for k in COUNTERS}
    times = None
    if cost is not None:
        from traces.costs.cost_model import RESOURCE_SECONDS
        times = {k: np.zeros((F, L)) for k in (*RESOURCE_SECONDS, "layer_s", "bound_s")}
        times["fixed_s"] = np.zeros(F)
    for fw in replay(trace, policy, popularity, with_act):
        for k in COUNTERS:
            out[k][fw.f] = fw.counters[k]
        if times is not None:
            parts = cost.layer_parts(fw.decision, fw.counts, fw.counters, fw.member_tokens, fw.member_context,
                                     fw.segments)
            lc = cost.layer_costs(parts)
            times["layer_s"][fw.f] = cost.layer_seconds(parts)
            for k, v in lc.items():
                times[k][fw.f] = v
            times["bound_s"][fw.f] = cost.layer_bound(lc, serial_copies=parts["swap"])
            times["fixed_s"][fw.f] = cost.fixed_s(fw.member_tokens, fw.member_context)
    return PolicyReplay(policy=policy, counters=out, times=times)
