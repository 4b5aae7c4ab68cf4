"""Benchmark of the offload engine: tokens/s per policy.

``python -m experiments.bench_offload [--device cpu|cuda] [--budgets 8,16] [--gen-length 96]``

On the CPU (the fast device is the CPU itself) it runs the tiny preset; on a GPU a random
LLaDA2.0-mini-shape model built in memory (router skew 0.25) with ``--budgets 64,128``.
Each policy runs with the model's own router and replaying a synthetic trace of the same
shape (realistic expert traffic, ``--replay-trace``). Prints one table (``--json``: rows).
"""
from __future__ import annotations


import pandas as pd
import torch

from runtime.decoding import Generator, warm_up
from runtime.device import check_device, timed
from runtime.make_checkpoint import preset_config, random_model
from runtime.offload import OffloadEngine
from traces.cli import ArgumentParser, integer, print_json, run_cli
from traces.errors import TideError
from traces.memory import DEVICE_HEADROOM
from traces.policies import Policy
from traces.synth import synthesize
from traces.trace import Decoding


def policies(L: int, E: int, budgets: list[int]) -> list[Policy]:
    out = [Policy.make("all", L, E), Policy.make("cpu", L, E)]
    for b in budgets:
        out += [Policy.make("static", L, E, budget=b), Policy.make("swap", L, E, budget=b),
                Policy.make("tide", L, E, budget=b, tau=1), Policy.make("tide", L, E, budget=b, tau=4)]
    return out


def run_one(model, policy: Policy, device, prompt, gen_length, trace=None) -> dict:
    with OffloadEngine(model, policy, device) as eng:
        gen = Generator(model, trace.decoding if trace is not None else Decoding(32, 32, 0.95, True), engine=eng)
        r, s = timed(device, lambda: gen.replay(trace, 0) if trace is not None else gen.generate(prompt, gen_length))
    t = eng.totals()
    return {"policy": policy.name, "budget": int(policy.budget[0]),
            "tau": int(policy.tau[0]) if policy.tau is not None else None,
            "routing": "replay" if trace is not None else "router", "forwards": r.forwards,
            "ms_per_forward": 1e3 * s / r.forwards, "tokens_per_s": len(r.tokens) / s,
            "hit_ratio": t["gpu_tokens"] / max(t["gpu_tokens"] + t["cpu_tokens"], 1), "migrations": t["migrations"],
            **{k: round(v, 3) for k, v in eng.timers.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.bench_offload", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budgets", default=None, help="comma-separated GPU experts per layer")
    ap.add_argument("--gen-length", type=integer, default=None)
    ap.add_argument("--prompt-length", type=integer, default=32)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    device = check_device(a.device)
    gpu = device.type == "cuda"
    preset = "mini" if gpu else "tiny"
    config = preset_config(preset)
    dtype = "bfloat16" if gpu else "float32"
    try:
        budgets = [int(b) for b in (a.budgets or ("64,128" if gpu else "8,16")).split(",")]
    except ValueError:
        raise TideError("--budgets: comma-separated integers") from None
    gen_length = a.gen_length or (64 if gpu else 96)
    model = random_model(config, seed=0, dtype=dtype, router_skew=0.25, device=device, experts_device="cpu")
    shape = model.cfg.shape
    trace = synthesize(shape, gen_length, a.prompt_length, seed=0, dtype=dtype)
    prompt = list(range(1, a.prompt_length + 1))
    with OffloadEngine(model, Policy.make("cpu", shape.n_moe_layers, shape.experts), device) as warm:
        warm_up(model, Decoding(32, 32, 0.95, True), prompt, engine=warm)
    rows = []
    for pol in policies(shape.n_moe_layers, shape.experts, budgets):
        free = torch.cuda.mem_get_info(device)[0] if gpu else 0
        if pol.name == "all" and gpu and shape.routed_expert_bytes(dtype) > free * DEVICE_HEADROOM:
            continue
        for tr in (None, trace):
            rows.append(run_one(model, pol, device, prompt, gen_length, tr))
    df = pd.DataFrame(rows)
    if a.json:
        print_json(rows)
    else:
        print(f"{shape.name} on {device} ({dtype}), prompt {a.prompt_length}, {gen_length} tokens, KV cache")
        print(df.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
