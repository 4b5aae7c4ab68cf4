"""Speed of the simulator: events per second and seconds per trace.

``python -m experiments.bench_sim [--model llada2-flash] [--profile a100-40gb] [--gen-length 1024]``

Generates a synthetic KV-cache trace (prompt 64) and replays it under ``tide`` (tau 4,
the largest budget that fits), ``static`` and ``swap``, printing the simulated seconds,
events, wall seconds and events per second of each replay.
"""
from __future__ import annotations

import pandas as pd

from sim.simulate import simulate
from traces.common.cli import ArgumentParser, integer, run_cli
from traces.costs.memory import MemoryBudget, kv_tokens
from traces.formats.profile_file import Profile
from traces.formats.shapes import ModelShape
from traces.settings import resolve_policy
from traces.workloads.synthetic import synthesize


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.bench_sim", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llada2-flash")
    ap.add_argument("--profile", default="a100-40gb")
    ap.add_argument("--gen-length", type=integer, default=1024)
    a = ap.parse_args(argv)
    shape = ModelShape.named(a.model)
    profile = Profile.load(a.profile)
    trace = synthesize(shape, a.gen_length, 64, seed=0)
    kv = kv_tokens([trace])
    budget = MemoryBudget(shape, trace.dtype, profile.capacity("gpu_mem_bytes") - 2e9, kv).largest_uniform()
    rows = []
    for name, tau in (("tide", 4), ("static", None), ("swap", None)):
        pol = resolve_policy(name, shape, trace.dtype, tau=tau, gpu_experts=max(budget, 1), kv_tokens=kv)
        res = simulate(trace, profile, pol)
        rows.append({"policy": name, "budget": budget, "forwards": trace.n_forwards, "layers": shape.n_moe_layers,
                     "simulated_s": res.seconds, "events": res.events, "wall_s": res.wall_s,
                     "events_per_s": res.events / res.wall_s})
    print(f"{shape.name}, {a.gen_length} tokens, profile {profile.name}")
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
