"""The planner's speed and regret on synthetic LLaDA2.0 traces.

``python -m experiments.bench_plan [--gen-length 1024] [--jobs N] [--only MODEL] [--out FILE]``

For LLaDA2.0-mini on the bundled h200, a100-40gb and rtx4090 profiles and LLaDA2.0-flash on
a100-40gb (flash's experts do not fit the h200 box's host memory), at three memory limits
each: prices every candidate of every kind once per model and box, then per limit solves
the per-layer program over every kind, the same with tide layers only (the planner before
kinds mixed) and the uniform program over every kind, simulates the plans and ``tide``
tau=1 at the largest uniform budget that fits, and prints the build and solve times and
the regret: the per-layer plan's simulated time over the best uniform setting of any kind
(negative: the plan is faster; never positive). Every uniform setting's time is its
column sum in the table, which equals its simulated time (``tests/test_planner.py``), so
the best uniform setting is the table's best.
"""
from __future__ import annotations

import time

import pandas as pd

from sim.candidates import Candidates, budget_grid, distinct_taus, price_table
from sim.plan_program import solve
from sim.planner import memory, plan_budgets, simulated_seconds, table_at
from traces.common.cli import ArgumentParser, integer, run_cli, span
from traces.common.files import atomic_write, check_out_path
from traces.costs.memory import MemoryBudget
from traces.formats.profile_file import Profile
from traces.formats.shapes import ModelShape
from traces.formats.vocabulary import KINDS
from traces.policies.labels import kinds_label, tau_label
from traces.policies.spec import Policy
from traces.workloads.synthetic import synthesize

CASES = [("llada2-mini", "h200", (8, 16, 24)), ("llada2-mini", "a100-40gb", (8, 16, 32)),
         ("llada2-mini", "rtx4090", (8, 16, 24)), ("llada2-flash", "a100-40gb", (12, 24, 40))]


def bench_case(model: str, box: str, limits: tuple[float, ...], gen_length: int, jobs: int | None) -> list[dict]:
    shape = ModelShape.named(model)
    profile = Profile.load(box)
    trace = synthesize(shape, gen_length, 64, seed=0)
    L, E = shape.n_moe_layers, shape.experts
    fits = {g: MemoryBudget.for_traces([trace], g * 1e9).largest_uniform() for g in limits}
    taus = distinct_taus([trace], range(1, trace.decoding.steps + 1))
    cands = Candidates.grid(taus, budget_grid(E, 8, list(fits.values())))
    t0 = time.perf_counter()
    priced = price_table([trace], [profile], cands, jobs=jobs, progress=True)
    pricing_s = time.perf_counter() - t0
    fixed_s = float(priced.fixed_s[0])
    rows = []
    for g in limits:
        mem = memory([trace], profile, g)
        table = table_at(priced, 0, mem, profile, plan_budgets(mem))
        per_layer, tide_only = solve(table), solve(table, kinds=["tide"])
        uniform = solve(table, uniform=True, kinds=KINDS)
        plan_s = simulated_seconds([trace], profile, per_layer.policy(E))
        uni_s = simulated_seconds([trace], profile, uniform.policy(E))
        tide_s = simulated_seconds([trace], profile, Policy.make("tide", L, E, budget=fits[g], tau=1))
        u = uniform.kind[0] + (f" tau {uniform.tau[0]}" if uniform.kind[0] == "tide" else "")
        rows.append({
            "model": model, "profile": box, "gpu_mem_gb": g, "layers": L, "taus": len(taus),
            "candidates_per_layer": len(table.cands), "pricing_s": pricing_s,
            "build_s": per_layer.build_s, "solve_s": per_layer.solve_s, "binaries": per_layer.variables,
            "uniform_solve_s": uniform.solve_s, "plan_kinds": kinds_label(per_layer.kind),
            "plan_tau": tau_label(per_layer.kind, per_layer.tau), "plan_budget": span(per_layer.budget),
            "uniform": f"{u}, B {uniform.budget[0]}",
            "plan_s": plan_s, "uniform_s": uni_s, "tide_tau1_s": tide_s,
            "program_error": (per_layer.seconds + fixed_s) / plan_s - 1,
            "regret": plan_s / uni_s - 1, "mixing_gain": (tide_only.seconds + fixed_s) / plan_s,
            "speedup_vs_tide_tau1": tide_s / plan_s, "tokens_per_s": trace.tokens_generated / plan_s,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.bench_plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gen-length", type=integer, default=1024)
    ap.add_argument("--jobs", type=integer, default=None, help="processes pricing candidates (default: every core)")
    ap.add_argument("--only", default=None, help="run only this model (llada2-mini or llada2-flash)")
    ap.add_argument("--out", default=None, help="write the table here (Parquet)")
    a = ap.parse_args(argv)
    if a.out:
        check_out_path(a.out)
    rows = []
    for model, box, limits in CASES:
        if a.only and model != a.only:
            continue
        rows += bench_case(model, box, limits, a.gen_length, a.jobs)
    df = pd.DataFrame(rows)
    if a.out:
        atomic_write(a.out, lambda tmp: df.to_parquet(tmp, index=False))
    cols = ["model", "profile", "gpu_mem_gb", "candidates_per_layer", "pricing_s", "build_s", "solve_s", "binaries",
            "plan_kinds", "plan_tau", "plan_budget", "uniform", "plan_s", "uniform_s", "tide_tau1_s",
            "regret", "mixing_gain", "speedup_vs_tide_tau1", "tokens_per_s"]
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


if __name__ == "__main__":
    run_cli(main)
