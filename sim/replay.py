"""Replaying a trace on a simulated box under a placement policy.

``python -m sim.replay --trace FILE --profile FILE|NAME --policy P [--tau T]
[--gpu-experts B | --gpu-mem-gb G] [--plan FILE] [--popularity TRACE] [--timeline FILE]
[--batch-size N] [--arrival-rate R --seed S | --clients N | --arrivals FILE]
[--requests-out FILE] --json``

prints one JSON object: ``seconds``, ``tokens_per_s``, ``requests_per_s`` (and in steady
state, the first and last batches left out), latency percentiles (end to end, to the first
committed block, queueing), the batch size per forward (mean, max), the contract's
counters, ``gpu_busy_s``, ``cpu_busy_s``, ``pcie_busy_s`` (both copy engines) and each
lane's busy fraction, events and the simulator's own wall time. Without ``--batch-size``
and a stream it replays the forwards the trace recorded, every request there at 0 (today's
numbers for a batch-1 trace); :mod:`sim.serve` runs the stream. ``--timeline`` writes every resource use as a Parquet table;
:func:`sim.gantt.plot_forward` draws one forward from it.

In Python, :func:`simulate` returns a :class:`SimResult` whose ``summary()`` is that
object and whose DataFrames hold the per-forward times and the per-layer counters.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import simpy

from sim.box import Box
from sim.serve import Stream, serve
from traces.arrivals import Arrivals, check_clients, check_rate, closed_loop, poisson, read_arrivals
from traces.cli import ArgumentParser, atomic_write, check_out_path, integer, number, print_json, run_cli
from traces.costs import CostModel
from traces.counters import COUNTERS
from traces.errors import TideError
from traces.memory import MemoryBudget, kv_tokens
from traces.policies import Policy
from traces.profile import Profile
from traces.settings import parse_budget, resolve_policy
from traces.trace import Trace, load_popularity, read_trace
from traces.values import need_int


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
            **{f"{k}_busy_fraction": (v / s if s > 0 else 0.0) for k, v in self.busy.items()},
            "events": self.events, "sim_wall_s": self.wall_s, "extrapolated": self.extrapolated or [],
        }


def simulate(trace: Trace, profile: Profile, policy: Policy, popularity: np.ndarray | None = None,
             timeline: bool = False, cpu_dtype: str | None = None, batch_size: int | None = None,
             arrivals: Arrivals | None = None) -> SimResult:
    """Replay ``trace`` on ``profile``'s box under ``policy``; decisions from ``traces.policies``,
    counters from ``traces.counters``, times from ``traces.costs``. Without ``batch_size`` and
    ``arrivals``: the forwards the trace recorded, all requests there at 0; with them, its
    requests served at ``batch_size`` (default: the trace's) as they arrive (:mod:`sim.serve`)."""
    t_wall = time.perf_counter()
    shape = trace.shape
    cost = CostModel(profile, shape, trace.dtype, cpu_dtype)
    env = simpy.Environment()
    box = Box(env, profile, record=timeline)
    seats = batch_size or (trace.batch_size if arrivals is not None else None)
    mem = MemoryBudget.for_traces([trace], profile.capacity("gpu_mem_bytes"), seats or trace.batch_size,
                                  profile.capacity("host_mem_bytes"))
    mem.check(policy.budget, f"on {profile.name}'s GPU, the {policy.name} policy's budget")
    mem.check_host(policy.kinds, policy.budget, f"on {profile.name}, the {policy.name} policy")
    L = shape.n_moe_layers
    counters: list[dict[str, np.ndarray]] = []
    most = np.zeros(3)  # tokens per expert, tokens per forward, context: the largest priced

    def seen(fw) -> None:
        counters.append(fw.counters)
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
                     batch_size=seats, arrivals=(arrivals.label if arrivals is not None else "offline"),
                     extrapolated=cost.extrapolated(*most))


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


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m sim.replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--profile", required=True, help="a bundled profile name (h200, a100-40gb, rtx4090) or a JSON file")
    ap.add_argument("--policy", required=True, help="all, cpu, static, swap, tide or plan")
    ap.add_argument("--tau", type=integer, default=None)
    ap.add_argument("--gpu-experts", default=None, help="expert slots per MoE layer (one number or one per layer)")
    ap.add_argument("--gpu-mem-gb", type=number, default=None)
    ap.add_argument("--plan", default=None)
    ap.add_argument("--popularity", default=None, help="trace whose total counts fill the slots at setup")
    ap.add_argument("--cpu-dtype", default=None, help="weight dtype of CPU experts (default: the trace's)")
    ap.add_argument("--timeline", default=None, help="write every resource use here (Parquet)")
    ap.add_argument("--batch-size", type=integer, default=None,
                    help="requests per forward, composed from the trace's requests (default: the forwards it recorded)")
    ap.add_argument("--arrival-rate", type=number, default=None, help="Poisson arrivals, requests per second")
    ap.add_argument("--seed", type=integer, default=0, help="seed of --arrival-rate's stream")
    ap.add_argument("--clients", type=integer, default=None, help="a closed loop of this many clients")
    ap.add_argument("--arrivals", default=None, help="file of arrival offsets in seconds, one per line")
    ap.add_argument("--requests-out", default=None, help="write one row per request here (Parquet)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    for flag in ("timeline", "requests_out"):
        if getattr(a, flag):
            check_out_path(getattr(a, flag), f"--{flag.replace('_', '-')}")
    if a.batch_size is not None:
        need_int(a.batch_size, "--batch-size", lo=1)
    streams = [f for f in ("arrival_rate", "clients", "arrivals") if getattr(a, f) is not None]
    if len(streams) > 1:
        raise TideError("give at most one of --arrival-rate, --clients, --arrivals")
    if a.arrival_rate is not None:
        check_rate(a.arrival_rate)
    if a.clients is not None:
        check_clients(a.clients)
    trace = read_trace(a.trace)
    n = len(trace.requests)
    arrivals = (poisson(a.arrival_rate, n, a.seed) if a.arrival_rate is not None else closed_loop(a.clients)
                if a.clients is not None else read_arrivals(a.arrivals, n) if a.arrivals is not None else None)
    profile = Profile.load(a.profile)
    seats = a.batch_size or trace.batch_size
    policy = resolve_policy(a.policy, trace.shape, trace.dtype, tau=a.tau, gpu_experts=parse_budget(a.gpu_experts),
                            gpu_mem_gb=a.gpu_mem_gb, plan=a.plan, kv_tokens=kv_tokens([trace], seats),
                            mem_limit_bytes=profile.capacity("gpu_mem_bytes"))
    pop = load_popularity(a.popularity, trace.shape) if a.popularity else None
    res = simulate(trace, profile, policy, pop, timeline=a.timeline is not None, cpu_dtype=a.cpu_dtype,
                   batch_size=a.batch_size, arrivals=arrivals)
    if a.timeline:
        atomic_write(a.timeline, lambda tmp: res.timeline.to_parquet(tmp, index=False))
    if a.requests_out:
        atomic_write(a.requests_out, lambda tmp: res.requests.to_parquet(tmp, index=False))
    s = res.summary()
    if a.json:
        print_json(s)
    else:
        print(f"{trace.shape.name} on {profile.name}, {s['policy']['name']}: {s['seconds']:.3f} s, "
              f"{s['tokens_per_s']:.1f} tokens/s; GPU busy {s['gpu_busy_s']:.3f} s, CPU {s['cpu_busy_s']:.3f} s, "
              f"PCIe {s['pcie_busy_s']:.3f} s; {s['events']} events in {s['sim_wall_s']:.2f} s")
        print(f"{s['requests']} requests ({s['arrivals']}, batch {s['batch_size'] or 'as recorded'}, "
              f"mean {s['mean_batch']:.1f} per forward): {s['requests_per_s']:.3f} requests/s; latency p50 "
              f"{s['latency_s_p50']:.2f} s, p99 {s['latency_s_p99']:.2f} s; first block p50 {s['first_block_s_p50']:.2f} s; "
              f"queueing p50 {s['queue_s_p50']:.2f} s")
    if s["extrapolated"]:
        print(f"note: priced past {profile.name}'s measured range (its tables' last slope extended): "
              + "; ".join(s["extrapolated"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
