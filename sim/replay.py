"""Replaying a trace on a simulated box under a placement policy.

``python -m sim.replay --trace FILE --profile FILE|NAME --policy P [--tau T]
[--gpu-experts B | --gpu-mem-gb G] [--plan FILE] [--popularity TRACE] [--timeline FILE] --json``

prints one JSON object: ``seconds``, ``tokens_per_s``, the contract's counters,
``gpu_busy_s``, ``cpu_busy_s``, ``pcie_busy_s`` (both copy engines), events and the
simulator's own wall time. ``--timeline`` writes every resource use as a Parquet table;
:func:`sim.gantt.plot_forward` draws one forward from it.

In Python, :func:`simulate` returns a :class:`SimResult` whose ``summary()`` is that
object and whose DataFrames hold the per-forward times and the per-layer counters.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import simpy

from sim.box import Box
from sim.forward import forward
from traces.cli import ArgumentParser, atomic_write, check_out_path, integer, number, print_json, run_cli
from traces.costs import CostModel, check_fits
from traces.counters import COUNTERS
from traces.memory import MemoryBudget, kv_tokens
from traces.policies import Policy
from traces.profile import Profile
from traces.replay import replay
from traces.settings import parse_budget, resolve_policy
from traces.trace import Trace, load_popularity, read_trace


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

    @property
    def seconds(self) -> float:
        return float(self.per_forward["end_s"].iloc[-1]) if len(self.per_forward) else 0.0

    def totals(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.counters.items()}

    def summary(self) -> dict[str, Any]:
        s = self.seconds
        return {
            "seconds": s, "tokens_per_s": self.trace.tokens_generated / s if s > 0 else 0.0,
            "forwards": self.trace.n_forwards, "tokens": self.trace.tokens_generated,
            "policy": self.policy.to_json(),
            "profile": self.profile, **self.totals(),
            "host_busy_s": self.busy["host"], "gpu_busy_s": self.busy["gpu"], "cpu_busy_s": self.busy["cpu"],
            "h2d_busy_s": self.busy["h2d"], "d2h_busy_s": self.busy["d2h"], "pcie_busy_s": self.busy["h2d"] + self.busy["d2h"],
            "events": self.events, "sim_wall_s": self.wall_s,
        }


def simulate(trace: Trace, profile: Profile, policy: Policy, popularity: np.ndarray | None = None,
             timeline: bool = False, cpu_dtype: str | None = None) -> SimResult:
    """Replay ``trace`` on ``profile``'s box under ``policy``; decisions from ``traces.policies``,
    counters from ``traces.counters``, times from ``traces.costs``."""
    t_wall = time.perf_counter()
    trace.require_one_request_per_forward("sim.replay")
    shape = trace.shape
    check_fits(shape, profile, trace.dtype)
    cost = CostModel(profile, shape, trace.dtype, cpu_dtype)
    env = simpy.Environment()
    box = Box(env, profile, record=timeline)
    fw = trace.forwards
    MemoryBudget.for_traces([trace], profile.capacity("gpu_mem_bytes")).check(
        policy.budget, f"on {profile.name}'s GPU, the {policy.name} policy's budget")
    F, L = trace.n_forwards, shape.n_moe_layers
    counters = {k: np.zeros((F, L), dtype=np.int64) for k in COUNTERS}
    starts, ends = np.zeros(F), np.zeros(F)

    def run():
        for fw in replay(trace, policy, popularity):
            for k in COUNTERS:
                counters[k][fw.f] = fw.counters[k]
            parts = cost.layer_parts(fw.decision, fw.counts, fw.counters, fw.tokens_run, fw.context)
            dense = cost.non_expert_s("dense_layer", fw.tokens_run, fw.context) if shape.first_k_dense else 0.0
            starts[fw.f] = env.now
            yield from forward(box, fw.f, shape.moe_layers, shape.first_k_dense, dense,
                               cost.non_expert_s("head", fw.tokens_run), profile.host("forward_s"), parts)
            ends[fw.f] = env.now

    env.process(run())
    env.run()
    per_forward = fw.copy()
    per_forward["start_s"], per_forward["end_s"] = starts, ends
    per_forward["seconds"] = ends - starts
    return SimResult(trace=trace, policy=policy, profile=profile.name, per_forward=per_forward, counters=counters,
                     busy=dict(box.busy), events=box.events, wall_s=time.perf_counter() - t_wall,
                     timeline=box.timeline() if timeline else None)


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
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.timeline:
        check_out_path(a.timeline, "--timeline")
    trace = read_trace(a.trace)
    trace.require_one_request_per_forward(a.trace)
    profile = Profile.load(a.profile)
    policy = resolve_policy(a.policy, trace.shape, trace.dtype, tau=a.tau, gpu_experts=parse_budget(a.gpu_experts),
                            gpu_mem_gb=a.gpu_mem_gb, plan=a.plan, kv_tokens=kv_tokens([trace]),
                            mem_limit_bytes=profile.capacity("gpu_mem_bytes"))
    pop = load_popularity(a.popularity, trace.shape) if a.popularity else None
    res = simulate(trace, profile, policy, pop, timeline=a.timeline is not None, cpu_dtype=a.cpu_dtype)
    if a.timeline:
        atomic_write(a.timeline, lambda tmp: res.timeline.to_parquet(tmp, index=False))
    s = res.summary()
    if a.json:
        print_json(s)
    else:
        print(f"{trace.shape.name} on {profile.name}, {s['policy']['name']}: {s['seconds']:.3f} s, "
              f"{s['tokens_per_s']:.1f} tokens/s; GPU busy {s['gpu_busy_s']:.3f} s, CPU {s['cpu_busy_s']:.3f} s, "
              f"PCIe {s['pcie_busy_s']:.3f} s; {s['events']} events in {s['sim_wall_s']:.2f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
