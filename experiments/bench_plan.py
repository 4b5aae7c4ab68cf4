"""The planner's speed and regret on synthetic LLaDA2.0 traces.

``python -m experiments.bench_plan [--gen-length 1024] [--jobs N] [--out FILE]``

For LLaDA2.0-mini on the bundled h200, a100-40gb and rtx4090 profiles and LLaDA2.0-flash on
a100-40gb (flash's experts do not fit the h200 box's host memory), at three memory limits
each: prices the candidates once per model and box, then per limit solves the per-layer
and the uniform program, simulates both plans and ``tide`` tau=1 at the largest uniform
budget that fits, and prints the build and solve times and the regret: the per-layer plan's
simulated time over the best uniform (tau, B) point's (negative: the per-layer plan is
faster). Every uniform grid point's time is its row sum in the table, which equals its
simulated time (``tests/test_planner.py``), so the best uniform plan is the grid's best.
"""
from __future__ import annotations

import time

import pandas as pd

from sim.candidates import budget_grid, candidate_table_seconds, distinct_taus, fixed_seconds
from sim.planner import memory, simulated_seconds
from sim.plan_model import CandidateTable, solve
from traces.cli import ArgumentParser, atomic_write, check_out_path, integer, run_cli, span
from traces.policies import Policy
from traces.memory import MemoryBudget
from traces.profile import Profile
from traces.shapes import ModelShape
from traces.synth import synthesize

CASES = [("llada2-mini", "h200", (8, 16, 24)), ("llada2-mini", "a100-40gb", (8, 16, 32)),
         ("llada2-mini", "rtx4090", (8, 16, 24)), ("llada2-flash", "a100-40gb", (12, 24, 40))]


def bench_case(model: str, box: str, limits: tuple[float, ...], gen_length: int, jobs: int | None) -> list[dict]:
    shape = ModelShape.named(model)
    profile = Profile.load(box)
    trace = synthesize(shape, gen_length, 64, seed=0)
    L, E = shape.n_moe_layers, shape.experts
    fits = {g: MemoryBudget.for_traces([trace], g * 1e9).largest_uniform() for g in limits}
    taus = distinct_taus([trace], range(1, trace.decoding.steps + 1))
    budgets = budget_grid(E, 8, list(fits.values()))
    t0 = time.perf_counter()
    seconds = candidate_table_seconds([trace], profile, taus, budgets, jobs=jobs, progress=True)
    pricing_s = time.perf_counter() - t0
    fixed_s = fixed_seconds(trace, profile)
    rows = []
    for g in limits:
        mem = memory([trace], profile, g)
        keep = [i for i, b in enumerate(budgets) if mem.fits_alone(b)]
        table = CandidateTable.of(shape.moe_layers, taus, [budgets[i] for i in keep], seconds[:, :, keep], mem)
        per_layer, uniform = solve(table), solve(table, uniform=True)
        plan_s = simulated_seconds([trace], profile, per_layer.policy(E))
        uni_s = simulated_seconds([trace], profile, uniform.policy(E))
        tide_s = simulated_seconds([trace], profile, Policy.make("tide", L, E, budget=fits[g], tau=1))
        rows.append({
            "model": model, "profile": box, "gpu_mem_gb": g, "layers": L, "taus": len(taus),
            "candidates_per_layer": len(taus) * len(table.budgets), "pricing_s": pricing_s,
            "build_s": per_layer.build_s, "solve_s": per_layer.solve_s, "uniform_solve_s": uniform.solve_s,
            "plan_tau": span(per_layer.tau), "plan_budget": span(per_layer.budget),
            "uniform": f"tau {uniform.tau[0]}, B {uniform.budget[0]}",
            "plan_s": plan_s, "uniform_s": uni_s, "tide_tau1_s": tide_s,
            "program_error": (per_layer.seconds + fixed_s) / plan_s - 1,
            "regret": plan_s / uni_s - 1, "speedup_vs_tide_tau1": tide_s / plan_s,
            "tokens_per_s": trace.tokens_generated / plan_s,
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
    cols = ["model", "profile", "gpu_mem_gb", "candidates_per_layer", "pricing_s", "build_s", "solve_s",
            "uniform_solve_s", "plan_tau", "plan_budget", "uniform", "plan_s", "uniform_s", "tide_tau1_s",
            "regret", "speedup_vs_tide_tau1", "tokens_per_s"]
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


if __name__ == "__main__":
    run_cli(main)
