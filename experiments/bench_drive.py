"""A checkpoint larger than host memory, run from the drive: figures against the simulator.

``python -m experiments.bench_drive --checkpoint DIR --trace T.parquet --profile BOX.json
--plan PLAN.json [--host-mem-gb 9,6] [--dtype bfloat16]``

Runs ``runtime.generate --replay-trace T --policy plan --plan PLAN`` (the plan's own host tier)
and then the same placement with each ``--host-mem-gb`` (a uniform tide host tier that fits),
each in a process of its own, and prints per run: tokens/s, seconds against the simulator's
prediction on ``BOX`` (:func:`sim.simulate.simulate` of the same trace and policy), the
process's peak resident memory, GB read from the drive per forward, the host cache's hit
rate and where the engine's time went. The tokens of every run must be identical (the host
tier never changes what is computed); a difference is an error.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

from sim.simulate import simulate
from traces.common.cli import ArgumentParser, comma_list, number, run_cli
from traces.common.errors import TideError
from traces.formats.plan_file import Plan
from traces.formats.profile_file import Profile
from traces.formats.trace_read import read_trace
from traces.policies.spec import Policy
from traces.settings import resolve_policy


def run_one(args: list[str]) -> dict:
    """``runtime.generate ... --json`` in a process of its own (its own peak memory)."""
    proc = subprocess.run([sys.executable, "-m", "runtime.generate", *args, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise TideError(f"runtime.generate failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.bench_drive", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--trace", required=True, help="a KV-cache trace to replay (traces.synth's)")
    ap.add_argument("--profile", required=True, help="this box's profile (runtime.profile --checkpoint DIR)")
    ap.add_argument("--plan", required=True, help="a plan for this box (sim.plan --host-mem-gb ...)")
    ap.add_argument("--host-mem-gb", default=None,
                    help="comma-separated: further runs, the plan's placement with a uniform host tier in this much "
                         "host memory (GB)")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args(argv)
    more = comma_list(a.host_mem_gb, "--host-mem-gb", number, "numbers") if a.host_mem_gb else []
    trace, profile, plan = read_trace(a.trace), Profile.load(a.profile), Plan.read(a.plan)
    shape = trace.shape
    base = ["--checkpoint", a.checkpoint, "--replay-trace", a.trace, "--policy", "plan", "--plan", a.plan,
            "--dtype", a.dtype]
    rows, tokens = [], None
    for gb in [None, *more]:
        if gb is None:
            policy = Policy.from_plan(plan, shape)
        else:
            policy = resolve_policy("plan", shape, trace.dtype, plan=a.plan, host_mem_gb=gb,
                                    host_bytes=profile.capacity("host_mem_bytes"))
        predicted = simulate(trace, profile, policy)
        out = run_one(base + ([] if gb is None else ["--host-mem-gb", str(gb)]))
        if tokens is None:
            tokens = out["tokens"]
        elif out["tokens"] != tokens:
            raise TideError(f"--host-mem-gb {gb}: the tokens differ from the plan's own run (lossless broken)")
        demand = out.get("drive_demand", 0) or 0
        engine = {k: out.get(k, 0.0) for k in ("fast_s", "cpu_s", "copy_s", "decide_s", "drive_wait_s", "layer_s")}
        rows.append({
            "host": "plan's" if gb is None else f"{gb:g} GB uniform",
            "host_budget": "-".join(str(f(policy.host.budget)) for f in (min, max)) if policy.host is not None else "all",
            "tokens_per_s": out["tokens_per_s"], "seconds": out["seconds"], "predicted_s": predicted.seconds,
            "error": predicted.seconds / out["seconds"] - 1, "peak_rss_gb": out["peak_rss_gb"],
            "drive_gb_per_forward": out.get("drive_bytes", 0.0) / 1e9 / max(out["forwards"], 1),
            "predicted_drive_gb_per_forward": predicted.summary()["drive_gb_per_forward"],
            "host_hit_rate": 1 - out.get("drive_reads", 0) / demand if demand else 1.0,
            **{f"engine_{k}": v for k, v in engine.items()},
            "rest_s": out["seconds"] - engine["layer_s"],
        })
    df = pd.DataFrame(rows)
    print(f"{shape.name} from {a.checkpoint}, {trace.tokens_generated} tokens, {trace.n_forwards} forwards, "
          f"{a.dtype}; predicted on {profile.name}")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("tokens: identical in every run")
    return 0


if __name__ == "__main__":
    run_cli(main)
