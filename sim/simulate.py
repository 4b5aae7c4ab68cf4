"""Simulating a run: a trace's requests served on a simulated box under a placement policy.

:func:`simulate` returns a :class:`SimResult` whose ``summary()`` is what ``python -m sim.replay``
prints and whose DataFrames hold the per-forward times, the per-layer counters and the
per-request times.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import simpy

from sim.box import Box
from sim.serve import Stream, serve
from traces.common.checks import resolve_batch_size
from traces.costs.cost_model import CostModel
from traces.costs.memory import MemoryBudget
from traces.formats.profile_file import Profile
from traces.formats.trace_file import Trace
from traces.formats.vocabulary import COUNTERS
from traces.policies.spec import Policy
from traces.serving.arrivals import Arrivals


@dataclass
class SimResult:
    trace: Trace
    policy: Policy
    profile: str
    per_forward: pd.DataFrame
    counters: dict[str, np.ndarray]
    busy: dict[str, float]
    events: int
    wall_s: float
    timeline: pd.DataFrame | None = None
    requests: pd.DataFrame | None = None  # one row per request: arrival, start, first block, end, latencies
    batch_size: int | None = None
    arrivals: str = "offline"
    extrapolated: list[str] | None = None  # where prices went past the profile's measured range
    drive_reads: int = 0  # experts read from the drive on the forwards' path (a host tier's)
    drive_fills: int = 0  # experts read into host memory after their layers
    expert_bytes: int = 0

    @property
    def seconds(self) -> float:
        return float(self.per_forward["end_s"].max()) if len(self.per_forward) else 0.0

    def totals(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.counters.items()}

    def steady(self) -> dict[str, float | None]:
        """Tokens/s and requests/s in steady state: from the first request's end (the first
        batch leaves) to the last request's start (the last batch fills); None when the
        stream has no such window (every request in the first batch)."""
        rq = self.requests
        a, b = float(rq["end_s"].min()), float(rq["start_s"].max())
        if b <= a:
            return {"steady_tokens_per_s": None, "steady_requests_per_s": None}
        pf = self.per_forward
        inside = (pf["start_s"] >= a) & (pf["end_s"] <= b)
        done = ((rq["end_s"] > a) & (rq["end_s"] <= b)).sum()
        return {"steady_tokens_per_s": float(pf.loc[inside, "tokens_committed"].sum() / (b - a)),
                "steady_requests_per_s": float(done / (b - a))}

    def summary(self) -> dict[str, Any]:
        s = self.seconds
        rq = self.requests
        pct = lambda col: {f"{col}_p{q}": float(np.percentile(rq[col], q)) for q in (50, 90, 99)}  # noqa: E731
        return {
            "seconds": s, "tokens_per_s": self.trace.tokens_generated / s if s > 0 else 0.0,
            "forwards": len(self.per_forward), "tokens": self.trace.tokens_generated,
            "requests": len(rq), "requests_per_s": len(rq) / s if s > 0 else 0.0, **self.steady(),
            "batch_size": self.batch_size, "arrivals": self.arrivals,
            "mean_batch": float(self.per_forward["members"].mean()) if len(self.per_forward) else 0.0,
            "max_batch": int(self.per_forward["members"].max()) if len(self.per_forward) else 0,
            **pct("latency_s"), **pct("first_block_s"), **pct("queue_s"),
            "policy": self.policy.to_json(),
            "profile": self.profile, **self.totals(),
            "host_busy_s": self.busy["host"], "gpu_busy_s": self.busy["gpu"], "cpu_busy_s": self.busy["cpu"],
            "h2d_busy_s": self.busy["h2d"], "d2h_busy_s": self.busy["d2h"], "pcie_busy_s": self.busy["h2d"] + self.busy["d2h"],
            "drive_busy_s": self.busy["drive"], "drive_reads": self.drive_reads, "drive_fills": self.drive_fills,
            "drive_gb_per_forward": (self.drive_reads + self.drive_fills) * self.expert_bytes / 1e9
            / max(len(self.per_forward), 1),
            **{f"{k}_busy_fraction": (v / s if s > 0 else 0.0) for k, v in self.busy.items()},
            "events": self.events, "sim_wall_s": self.wall_s, "extrapolated": self.extrapolated or [],
        }


def simulate(trace: Trace, profile: Profile, policy: Policy, popularity: np.ndarray | None = None,
             timeline: bool = False, cpu_dtype: str | None = None, batch_size: int | None = None,
             arrivals: Arrivals | None = None) -> SimResult:
    """Replay ``trace`` on ``profile``'s box under ``policy``; decisions from ``traces.policies``,
    counters from ``traces.policies.counters``, times from ``traces.costs.cost_model``. Without ``batch_size`` and
    ``arrivals``: the forwards the trace recorded, all requests there at 0; with them, its
    requests served at ``batch_size`` (default: the trace's) as they arrive (:mod:`sim.serve`)."""
    t_wall = time.perf_counter()
    shape = trace.shape
    cost = CostModel(profile, shape, trace.dtype, cpu_dtype)
    env = simpy.Environment()
    box = Box(env, profile, record=timeline)
    runs_at = resolve_batch_size(batch_size, trace=trace.batch_size)
    mem = MemoryBudget.for_traces([trace], profile.capacity("gpu_mem_bytes"), runs_at,
                                  profile.capacity("host_mem_bytes"))
    mem.check(policy.budget, f"on {profile.name}'s GPU, the {policy.name} policy's budget")
    host_budget = None if policy.host is None else policy.host.budget
    mem.check_host(policy.kinds, policy.budget, f"on {profile.name}, the {policy.name} policy", host_budget)
    if policy.drive_layers(shape.experts).any() and not profile.has_drive:
        profile.drive("read_gbps")  # one line: the profile has no drive to read the rest from
    L = shape.n_moe_layers
    counters: list[dict[str, np.ndarray]] = []
    most = np.zeros(3)  # tokens per expert, tokens per forward, context: the largest priced

    drive = np.zeros(2, np.int64)  # experts read on the forwards' path, and filled after layers

    def seen(fw) -> None:
        counters.append(fw.counters)
        if fw.drive_reads is not None:
            drive[:] += [int(fw.drive_reads.sum()), int(fw.drive_fills.sum())]
        np.maximum(most, [fw.counts.max(initial=0), fw.tokens_run, fw.context], out=most)
    stream, process = serve(env, box, trace, policy, cost, popularity, batch_size, arrivals, on_forward=seen)
    env.process(process)
    env.run()
    F = len(stream.forwards)
    counters_out = {k: (np.stack([c[k] for c in counters]) if counters else np.zeros((0, L), np.int64)) for k in COUNTERS}
    fw = trace.forwards
    starts = np.array([f[0] for f in stream.forwards])
    ends = np.array([f[1] for f in stream.forwards])
    rows = [f[3] for f in stream.forwards]
    if all(len(r) == 1 for r in rows) and F == len(fw) and all(int(r[0]) == i for i, r in enumerate(rows)):
        per_forward = fw.copy()  # one request per forward, in the trace's order: its own rows
    else:
        per_forward = pd.DataFrame({
            "forward": np.arange(F), "requests": [fw["request"].to_numpy()[r].tolist() for r in rows],
            "kind": [fw["kind"].iat[int(r[0])] for r in rows],
            "tokens_run": [int(fw["tokens_run"].to_numpy()[r].sum()) for r in rows],
            "tokens_committed": [int(fw["tokens_committed"].to_numpy()[r].sum()) for r in rows]})
    per_forward["members"] = [len(r) for r in rows]
    per_forward["start_s"], per_forward["end_s"] = starts, ends
    per_forward["seconds"] = ends - starts
    return SimResult(trace=trace, policy=policy, profile=profile.name, per_forward=per_forward, counters=counters_out,
                     busy=dict(box.busy), events=box.events, wall_s=time.perf_counter() - t_wall,
                     timeline=box.timeline() if timeline else None, requests=request_table(trace, stream),
                     batch_size=None if batch_size is None and arrivals is None else runs_at, arrivals=(arrivals.label if arrivals is not None else "offline"),
                     extrapolated=cost.extrapolated(*most), drive_reads=int(drive[0]), drive_fills=int(drive[1]),
                     expert_bytes=cost.expert_bytes)


def request_table(trace: Trace, stream: Stream) -> pd.DataFrame:
    """One row per request (arrival order): its times, latencies and tokens."""
    committed = trace.forwards.groupby("request")["tokens_committed"].sum()
    gen = {r["request"]: r for r in trace.requests}
    rows = []
    for r in stream.order:
        a, st, e = stream.arrival[r], stream.start[r], stream.end[r]
        fb = stream.first_block.get(r, e)
        rows.append({"request": r, "prompt_length": gen[r]["prompt_length"], "gen_length": gen[r]["gen_length"],
                     "tokens": min(gen[r]["gen_length"], int(committed.get(r, 0))),
                     "arrival_s": a, "start_s": st, "first_block_end_s": fb, "end_s": e,
                     "queue_s": st - a, "first_block_s": fb - a, "latency_s": e - a})
    return pd.DataFrame(rows)


