"""The planner's command line: plan each MoE layer's kind, B and tau from traces and a profile.

``python -m sim.plan --trace FILE [--trace FILE ...] --profile NAME|FILE --gpu-mem-gb G
[--kinds cpu,static,swap,tide | --layer-kinds KIND,KIND,...] [--uniform] [--budget-step 8]
[--batch-sizes 1,2,4,8 [--latency-p99-s S | --arrival-rate R [--seed N]]] [--jobs N]
--out PLAN.json [--json]``

Prices every candidate, solves the program, simulates the plan, the best uniform setting
and the baselines (:mod:`sim.planner`), writes the plan and prints its kind, tau and B per
layer and a table. With several ``--batch-sizes`` (or a latency bound or an arrival rate)
it plans at each batch size and chooses one with the plan (:mod:`sim.frontier`), printing
the frontier.
"""
from __future__ import annotations

import sys

from sim.frontier import plan_frontier
from traces.common import checks
from traces.common.checks import check_batch_sizes
from traces.common.cli import ArgumentParser, integer, number, print_json, run_cli
from traces.common.errors import TideError
from traces.common.files import check_out_path
from traces.formats.profile_file import Profile
from traces.formats.trace_read import read_trace
from traces.formats.profile_file import BUNDLED
from traces.formats.vocabulary import KINDS
from traces.policies.labels import display_name
from traces.policies.spec import check_kinds


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m sim.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", action="append", required=True, help="a trace (Parquet); repeat for several")
    ap.add_argument("--profile", required=True, help=f"a bundled profile name ({', '.join(BUNDLED)}) or a JSON file")
    ap.add_argument("--gpu-mem-gb", type=number, required=True, help="GPU memory the plan may use")
    ap.add_argument("--host-mem-gb", type=number, default=None,
                    help="host memory the plan may use (default: the box's); where it cannot hold every expert and "
                         "the box has a drive, each layer gets a host budget, the rest read from the drive")
    ap.add_argument("--uniform", action="store_true",
                    help="one candidate for all layers (by default tide's one tau and B: the paper's program)")
    ap.add_argument("--kinds", default=None,
                    help=f"comma-separated kinds a layer may take (default: {','.join(KINDS)}; with --uniform: tide)")
    ap.add_argument("--layer-kinds", default=None,
                    help="comma-separated kind of each MoE layer, in order (a mix chosen by hand; budgets and taus planned)")
    ap.add_argument("--budget-step", type=integer, default=8, help="candidate budgets: multiples of this")
    ap.add_argument("--jobs", type=integer, default=None, help="processes pricing candidates (default: every core)")
    ap.add_argument("--batch-sizes", default="1",
                    help="comma-separated requests per forward to plan at; the plan takes the best (default 1)")
    ap.add_argument("--latency-p99-s", type=number, default=None,
                    help="offline: the most tokens/s whose p99 latency (a request's end) is at most this")
    ap.add_argument("--arrival-rate", type=checks.rate, default=None,
                    help="requests/s arriving (Poisson): the batch size and plan with the lowest p99 latency")
    ap.add_argument("--seed", type=checks.seed, default=0, help="seed of the Poisson arrivals")
    ap.add_argument("--out", required=True, help="plan JSON to write")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    a = ap.parse_args(argv)
    check_out_path(a.out)
    if a.jobs is not None and a.jobs < 1:
        raise TideError(f"--jobs must be at least 1, got {a.jobs}")
    if a.budget_step < 1:
        raise TideError(f"--budget-step must be at least 1, got {a.budget_step}")
    kinds, layer_kinds = (_kinds(v, f) for v, f in ((a.kinds, "--kinds"), (a.layer_kinds, "--layer-kinds")))
    sizes = check_batch_sizes(_integers(a.batch_sizes, "--batch-sizes"))
    if a.latency_p99_s is not None and a.arrival_rate is not None:
        raise TideError("give --latency-p99-s (offline) or --arrival-rate, not both")
    traces = [read_trace(p) for p in a.trace]
    for p, t in zip(a.trace, traces):
        t.require_one_request_per_forward(p)
    profile = Profile.load(a.profile)
    most = max(len(t.requests) for t in traces)
    if sizes[-1] > most:
        print(f"note: batch sizes above the traces' requests ({most}) run them all at once", file=sys.stderr)
    front = plan_frontier(traces, profile, a.gpu_mem_gb, sizes, a.latency_p99_s, a.arrival_rate, a.seed,
                          names=a.trace, uniform=a.uniform, budget_step=a.budget_step, jobs=a.jobs, kinds=kinds,
                          layer_kinds=layer_kinds, host_mem_gb=a.host_mem_gb)
    plan, frame = front.plan, front.frames[front.plan.batch_size]
    plan.write(a.out)
    if a.json:
        print_json(plan.to_json())
        return 0
    p, s = plan.predicted, plan.provenance["solver"]
    if len(sizes) > 1 or a.latency_p99_s is not None or a.arrival_rate is not None:
        served = f"arriving at {a.arrival_rate:g}/s" if a.arrival_rate is not None else "offline"
        print(f"frontier ({served}; latency: a request's arrival to its end):")
        t = front.table.assign(chosen=front.table["chosen"].map({True: "<-", False: ""}))
        print(t.drop(columns=[c for c in ("sustains",) if t[c].isna().all()]).to_string(
            index=False, formatters={"tokens_per_s": "{:.1f}".format, "requests_per_s": "{:.3f}".format,
                                     "latency_p50_s": "{:.2f}".format, "latency_p99_s": "{:.2f}".format,
                                     "gpu_gb": "{:.1f}".format, "host_gb": "{:.1f}".format}))
    print(f"{traces[0].shape.name} on {profile.name}, {a.gpu_mem_gb:g} GB, batch {plan.batch_size}, {p['tokens']} "
          f"tokens in {len(traces)} trace(s): {plan.provenance['mode']} plan; "
          f"solved in {s['solve_s']:.2f} s ({s['binaries']} binaries); GPU {p['gpu_gb']:.1f} GB, host {p['host_gb']:.1f} GB")
    print("kind per layer:   " + " ".join(plan.kinds))
    print("tau per layer:    " + " ".join(str(t) if k == "tide" else "-" for k, t in zip(plan.kinds, plan.tau)))
    print("budget per layer: " + " ".join(map(str, plan.budget)))
    if plan.host is not None:
        hk = plan.host["kind"]
        print("host kind:        " + " ".join(hk if isinstance(hk, list) else [hk] * len(plan.layers)))
        print("host budget:      " + " ".join(map(str, plan.host["budget"])))
        print("host tau:         " + " ".join(map(str, plan.host["tau"])))
        print(f"read from the drive: {p['drive_gb_per_forward']:.2f} GB per forward")
    print(frame.assign(policy=frame["policy"].map(display_name)).to_string(index=False, formatters={"seconds": "{:.3f}".format, "tokens_per_s": "{:.1f}".format,
                                                   "plan_speedup": "{:.2f}x".format}))
    print(f"wrote {a.out}")
    return 0


def _integers(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise TideError(f"{flag}: comma-separated integers, got {text!r}") from None


def _kinds(text: str | None, flag: str) -> list[str] | None:
    if text is None:
        return None
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    check_kinds(kinds, flag)
    return kinds


if __name__ == "__main__":
    run_cli(main)
