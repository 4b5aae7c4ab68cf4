"""The planner's command line: plan each MoE layer's kind, B and tau from traces and a profile.

``python -m sim.plan --trace FILE [--trace FILE ...] --profile NAME|FILE --gpu-mem-gb G
[--kinds cpu,static,swap,tide | --layer-kinds KIND,KIND,...] [--uniform] [--budget-step 8]
[--jobs N] --out PLAN.json [--json]``

Prices every candidate, solves the program, simulates the plan, the best uniform setting
and the baselines (:mod:`sim.planner`), writes the plan and prints its kind, tau and B per
layer and a table.
"""
from __future__ import annotations

from sim.planner import make_plan
from traces.cli import ArgumentParser, check_out_path, integer, number, print_json, run_cli
from traces.errors import TideError
from traces.policies import KINDS, check_kinds
from traces.profile import Profile
from traces.trace import read_trace


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m sim.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", action="append", required=True, help="a trace (Parquet); repeat for several")
    ap.add_argument("--profile", required=True, help="a bundled profile name (h200, a100-40gb, rtx4090) or a JSON file")
    ap.add_argument("--gpu-mem-gb", type=number, required=True, help="GPU memory the plan may use")
    ap.add_argument("--uniform", action="store_true",
                    help="one candidate for all layers (by default tide's one tau and B: the paper's program)")
    ap.add_argument("--kinds", default=None,
                    help=f"comma-separated kinds a layer may take (default: {','.join(KINDS)}; with --uniform: tide)")
    ap.add_argument("--layer-kinds", default=None,
                    help="comma-separated kind of each MoE layer, in order (a mix chosen by hand; budgets and taus planned)")
    ap.add_argument("--budget-step", type=integer, default=8, help="candidate budgets: multiples of this")
    ap.add_argument("--jobs", type=integer, default=None, help="processes pricing candidates (default: every core)")
    ap.add_argument("--out", required=True, help="plan JSON to write")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    a = ap.parse_args(argv)
    check_out_path(a.out)
    if a.jobs is not None and a.jobs < 1:
        raise TideError(f"--jobs must be at least 1, got {a.jobs}")
    if a.budget_step < 1:
        raise TideError(f"--budget-step must be at least 1, got {a.budget_step}")
    kinds, layer_kinds = (_kinds(v, f) for v, f in ((a.kinds, "--kinds"), (a.layer_kinds, "--layer-kinds")))
    traces = [read_trace(p) for p in a.trace]
    for p, t in zip(a.trace, traces):
        t.require_one_request_per_forward(p)
    profile = Profile.load(a.profile)
    plan, frame = make_plan(traces, profile, a.gpu_mem_gb, a.uniform, a.budget_step, a.jobs, names=a.trace,
                            kinds=kinds, layer_kinds=layer_kinds)
    plan.write(a.out)
    if a.json:
        print_json(plan.to_json())
        return 0
    p, s = plan.predicted, plan.provenance["solver"]
    print(f"{traces[0].shape.name} on {profile.name}, {a.gpu_mem_gb:g} GB, {p['tokens']} tokens in "
          f"{len(traces)} trace(s): {plan.provenance['mode']} plan; "
          f"solved in {s['solve_s']:.2f} s ({s['binaries']} binaries)")
    print("kind per layer:   " + " ".join(plan.kinds))
    print("tau per layer:    " + " ".join(str(t) if k == "tide" else "-" for k, t in zip(plan.kinds, plan.tau)))
    print("budget per layer: " + " ".join(map(str, plan.budget)))
    print(frame.to_string(index=False, formatters={"seconds": "{:.3f}".format, "tokens_per_s": "{:.1f}".format,
                                                   "plan_speedup": "{:.2f}x".format}))
    print(f"wrote {a.out}")
    return 0


def _kinds(text: str | None, flag: str) -> list[str] | None:
    if text is None:
        return None
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    check_kinds(kinds, flag)
    return kinds


if __name__ == "__main__":
    run_cli(main)
