"""Benchmark of the offload engine: tokens/s per policy and where its host time goes.

``python -m experiments.bench_engine [--device cpu|cuda] [--budgets 8,16] [--gen-length 96]
[--repeats 3] [--json]``

On the CPU (the fast device is the CPU itself) it runs the tiny preset; on a GPU a random
LLaDA2.0-mini-shape model built in memory (router skew 0.25) with ``--budgets 64,128``.
First the plain model (no engine) and ``all`` through the engine, with the model's own
router: the engine's own cost when it moves nothing. Then every policy, with the model's
own router and replaying a synthetic trace of the same shape (realistic expert traffic).
Per run: tokens/s and host microseconds per MoE layer-forward, split into ``decide`` (the
policy), ``copies`` (issuing expert copies), ``cpu`` and ``fast`` (expert math), ``wait``
(routing to the host, copies, activations), ``book`` (per-forward counters) and ``issue``
(the rest of the engine's layer: sorting tokens, gathers, combining). Each figure is the
median of ``--repeats`` runs. Prints the tables (``--json``: rows).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from runtime.decoding import Generator, warm_up
from runtime.device import check_device, timed
from runtime.make_checkpoint import preset_config, random_model
from runtime.offload import OffloadEngine
from traces.common.cli import ArgumentParser, integer, print_json, run_cli
from traces.common.errors import TideError
from traces.costs.memory import DEVICE_HEADROOM
from traces.formats.trace_file import Decoding
from traces.policies.spec import Policy
from traces.workloads.synthetic import synthesize


def policies(L: int, E: int, budgets: list[int]) -> list[Policy]:
    out = [Policy.make("all", L, E), Policy.make("cpu", L, E)]
    for b in budgets:
        out += [Policy.make("static", L, E, budget=b), Policy.make("swap", L, E, budget=b),
                Policy.make("tide", L, E, budget=b, tau=1), Policy.make("tide", L, E, budget=b, tau=4)]
    return out


PARTS = ("decide", "copies", "cpu", "fast", "wait", "book", "issue")


def run_one(model, policy: Policy | None, device, prompt, gen_length, trace=None) -> dict:
    """One timed run (``policy`` None: the plain model, no engine); the row of figures."""
    decoding = trace.decoding if trace is not None else Decoding(32, 32, 0.95, True)
    run = (lambda g: g.replay(trace, 0)) if trace is not None else (lambda g: g.generate(prompt, gen_length))
    if policy is None:
        r, s = timed(device, lambda: run(Generator(model, decoding)))
        return {"policy": "plain model", "budget": None, "tau": None, "routing": "router", "forwards": r.forwards,
                "tokens_per_s": len(r.tokens) / s, "seconds": s}
    with OffloadEngine(model, policy, device) as eng:
        r, s = timed(device, lambda: run(Generator(model, decoding, engine=eng)))
    t, tm = eng.totals(), eng.timers
    per = 1e6 / (r.forwards * model.cfg.shape.n_moe_layers)  # microseconds per MoE layer-forward
    issue = tm["layer_s"] - tm["decide_s"] - tm["copy_s"] - tm["cpu_s"] - tm["fast_s"] - tm["wait_s"]
    return {"policy": policy.label, "budget": int(policy.budget[0]),
            "tau": int(policy.tau[0]) if policy.tau is not None else None,
            "routing": "replay" if trace is not None else "router", "forwards": r.forwards,
            "tokens_per_s": len(r.tokens) / s, "seconds": s,
            "hit_ratio": t["gpu_tokens"] / max(t["gpu_tokens"] + t["cpu_tokens"], 1), "migrations": t["migrations"],
            "decide": tm["decide_s"] * per, "copies": tm["copy_s"] * per, "cpu": tm["cpu_s"] * per,
            "fast": tm["fast_s"] * per, "wait": tm["wait_s"] * per, "book": tm["book_s"] * per, "issue": issue * per,
            "layer": tm["layer_s"] * per}


def median_of(repeats: int, fn) -> dict:
    """The run ``repeats`` times; numbers are the medians (a shared box is noisy)."""
    rows = [fn() for _ in range(repeats)]
    out = dict(rows[0])
    for k, v in out.items():
        if isinstance(v, float):
            out[k] = float(np.median([r[k] for r in rows]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.bench_engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budgets", default=None, help="comma-separated GPU experts per layer")
    ap.add_argument("--gen-length", type=integer, default=None)
    ap.add_argument("--prompt-length", type=integer, default=32)
    ap.add_argument("--repeats", type=integer, default=3, help="runs per setting; medians are shown")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        raise TideError(f"--repeats must be at least 1, got {a.repeats}")
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
    L, E = shape.n_moe_layers, shape.experts
    base = []
    if not gpu:  # the experts live in host memory: the plain model runs them where it runs, the CPU
        base.append(median_of(a.repeats, lambda: run_one(model, None, device, prompt, gen_length)))
    if not gpu or shape.routed_expert_bytes(dtype) <= torch.cuda.mem_get_info(device)[0] * DEVICE_HEADROOM:
        base.append(median_of(a.repeats, lambda: run_one(model, Policy.make("all", L, E), device, prompt, gen_length)))
    rows = []
    for pol in policies(L, E, budgets)[1:]:
        for tr in (None, trace):
            rows.append(median_of(a.repeats, lambda: run_one(model, pol, device, prompt, gen_length, tr)))
    if a.json:
        print_json({"baseline": base, "policies": rows})
        return 0
    print(f"{shape.name} on {device} ({dtype}), prompt {a.prompt_length}, {gen_length} tokens, KV cache; "
          f"medians of {a.repeats} runs; host microseconds per MoE layer-forward")
    cols = ["policy", "budget", "tau", "routing", "forwards", "tokens_per_s", "hit_ratio", "migrations", *PARTS, "layer"]
    b = pd.DataFrame(base)
    if len(base) == 2 and base[0]["policy"] == "plain model":
        print(f"engine overhead: all through the engine {base[1]['seconds']:.3f} s against the plain model "
              f"{base[0]['seconds']:.3f} s ({100 * (base[1]['seconds'] / base[0]['seconds'] - 1):+.1f} %)")
    print(b.reindex(columns=cols).round(1).to_string(index=False))
    print(pd.DataFrame(rows)[cols].round(1).to_string(index=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
