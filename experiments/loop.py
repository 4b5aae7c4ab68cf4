"""The whole loop on a tiny random model, end to end on this box: capture, profile, plan, validate.

``python -m experiments.loop [--out out/loop] [--rounds 5]`` runs, in order, what the
README's quick start shows as five commands (about 35 seconds on 2 cores):

1. ``runtime.make_checkpoint --preset tiny`` (``DIR/tiny``, fp32, router skew 0.25);
2. ``runtime.generate ... --trace-out DIR/t.parquet`` (48 tokens after a 40-token prompt);
3. ``runtime.profile --checkpoint DIR/tiny --quick --out DIR/box.json`` (this box, the CPU
   as the fast device);
4. ``sim.plan --trace DIR/t.parquet --profile DIR/box.json --gpu-mem-gb 0.0012`` (1.2 MB:
   the tiny model's 0.66 MB of non-expert weights and KV cache leave room for 6 of its 32
   experts per layer, so the plan has to choose);
5. ``experiments.validate --checkpoint DIR/tiny --plan DIR/plan.json --out
   DIR/validation.json`` (the plan, its baselines and ``all`` run for real; predicted
   against measured; tokens checked identical).

Each step is the command's own ``main``; a step whose output exists is reused, so a
rerun only redoes what is missing. ``notebooks/validation.ipynb`` reads the result.
"""
from __future__ import annotations

import time
from pathlib import Path

from traces.common.cli import ArgumentParser, integer, run_cli
from traces.common.errors import TideError
from traces.common.files import check_out_path

PROMPT = ",".join(str(i) for i in range(1, 41))
GPU_MEM_GB = "0.0012"


def run(out: str | Path = "out/loop", rounds: int = 5, echo: bool = True) -> dict[str, Path]:
    """Run the five steps into ``out``; the paths of what they wrote."""
    from experiments import validate
    from runtime import generate, make_checkpoint, profile
    from sim import plan

    out = check_out_path(out, "--out", folder=True)
    if rounds < 1:
        raise TideError(f"--rounds must be at least 1, got {rounds}")
    out.mkdir(parents=True, exist_ok=True)
    ckpt, trace, box, plan_file, result = (out / "tiny", out / "t.parquet", out / "box.json", out / "plan.json",
                                           out / "validation.json")
    steps = [
        (ckpt / "config.json", make_checkpoint.main, ["--preset", "tiny", "--out", str(ckpt), "--router-skew", "0.25"]),
        (trace, generate.main, ["--checkpoint", str(ckpt), "--prompt-ids", PROMPT, "--gen-length", "48",
                                "--trace-out", str(trace)]),
        (box, profile.main, ["--checkpoint", str(ckpt), "--quick", "--device", "cpu", "--out", str(box)]),
        (plan_file, plan.main, ["--trace", str(trace), "--profile", str(box), "--gpu-mem-gb", GPU_MEM_GB,
                                "--jobs", "1", "--out", str(plan_file)]),
        (result, validate.main, ["--checkpoint", str(ckpt), "--plan", str(plan_file), "--rounds", str(rounds),
                                 "--out", str(result)]),
    ]
    for target, main, argv in steps:
        name = main.__module__
        if target.exists():
            if echo:
                print(f"== {name}: {target} exists, reused")
            continue
        if echo:
            print(f"== python -m {name} {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        code = main(argv)
        if code:
            raise TideError(f"{name} exited with {code}")
        if echo:
            print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
    return {"checkpoint": ckpt, "trace": trace, "profile": box, "plan": plan_file, "result": result}


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.loop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/loop", help="folder for every step's output (reused when present)")
    ap.add_argument("--rounds", "--repeats", dest="rounds", type=integer, default=5,
                    help="rounds of the validation (profile re-timed, every policy once); errors are medians")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = run(a.out, a.rounds)
    print(f"loop done in {time.perf_counter() - t0:.0f} s; result: {paths['result']} "
          "(notebooks/validation.ipynb reads it)")
    return 0


if __name__ == "__main__":
    run_cli(main)
