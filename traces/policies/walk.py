"""Walking a trace under a policy: each forward's placement decision and counters, in order.

The policy counters (:func:`traces.costs.policy_run.replay_policy`), the simulator (``sim.simulate.simulate``) and
the planner's candidate table (``sim.candidates``) all walk a trace the same way: take a
forward's per-layer counts, let :class:`traces.policies.runner.PolicyRunner` decide, count what
the decision does (:func:`traces.policies.counters.forward_counters`). :func:`walk_trace` is that walk,
once; each consumer prices or records what it yields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from traces.common.errors import TideError
from traces.policies.counters import forward_counters
from traces.policies.decision import Decision
from traces.policies.host import HostRunner, demand
from traces.policies.runner import PolicyRunner
from traces.policies.spec import Policy

if TYPE_CHECKING:
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
    drive_reads: np.ndarray | None = None  # [rows] experts read from the drive on the forward's path (host tier)
    drive_fills: np.ndarray | None = None  # [rows] experts read into host memory after the layer's work


def walk_trace(trace: "Trace", policy: Policy, popularity: np.ndarray | None = None, with_act: bool = True,
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
    host = None
    if policy.host is not None:
        if group != 1:
            raise TideError("a host tier is walked one row per layer (the planner prices host budgets itself)")
        host = HostRunner(policy.host, shape.experts, setup_counts=popularity)
        hl = np.arange(policy.n_layers)
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
        reads = fills = None
        if host is not None:
            host.begin(kinds[r], int(steps[r]), more)
            read, fill, _ = host.step(hl, counts, demand(decision, counts))
            reads, fills = read.sum(axis=1), fill.sum(axis=1)
        ch = None
        if with_act:
            ch = np.concatenate([trace.choices_of(int(i))[:, sel] for i in rows]) if len(rows) > 1 \
                else trace.choices_of(r)[:, sel]
        c = forward_counters(decision, counts, exp_bytes, act, ch, run)
        rows = np.asarray(rows)
        yield Forward(f, str(kinds[r]), int(steps[r]), run, context, counts, decision, c, rows, runs[rows], ctx[rows],
                      segments, reads, fills)
