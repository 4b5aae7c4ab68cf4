"""The device check: how close the runtime comes to what the box allows.

``python -m experiments.gpu_check [--quick] [--plans FILE ...] [--out FILE.json]``

On a GPU box:

1. profiles the box quickly (``runtime.profile``, the fast path) for LLaDA2.0-mini's shape;
2. builds a random-weight mini-shape model in memory (bf16, router skew 0.25);
3. measures tokens/s and ms per forward, with the KV cache, 32-token prompt + 32 tokens, for
   ``all``, ``cpu``, ``static``, ``swap``, ``tide`` (tau 1 and 4) at B = 64 and 128, a plan
   of every kind layer by layer (swap, tide, static, cpu, ...) and each ``--plans`` file
   (made beforehand with ``sim.plan``), both with the model's own router and replaying a
   synthetic mini KV-cache trace (realistic expert traffic); and ``all`` and ``tide`` B=128
   tau 4 with and without the KV cache at 32+32 and at 1024 total tokens;
4. checks every run's tokens against ``all``'s under the same settings (the lossless rule,
   ``runtime.lossless``), and prices every run's recorded trace with the cost model of
   ``traces/`` on the profile just measured: the lower bound per forward (per layer the max
   of GPU, CPU and transfer time, overheads included, summed) and measured / bound;
5. prints one table and writes it as JSON (``--out``, default ``out/gpu_check.json``).

Without a GPU the same table runs on the tiny preset (fp32) with the CPU as the fast device
(budgets E/4 and E/2 for 64 and 128; 256 total tokens for 1024), so the tests exercise it.
``--quick`` keeps only the own-router runs and shortens the long ones (256 total tokens).
Needs only ``runtime`` and ``traces`` (the GPU box's own Python).
"""
from __future__ import annotations

import datetime as dt
import json
import platform
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from runtime.capture import TraceRecorder
from runtime.decoding import Generator, Result, warm_up
from runtime.device import timed
from runtime.lossless import agree
from runtime.make_checkpoint import preset_config, random_model
from runtime.offload import OffloadEngine
from runtime.profile import profile_box
from traces.common.cli import ArgumentParser, run_cli
from traces.common.errors import TideError
from traces.common.files import atomic_write, check_out_path
from traces.costs.cost_model import CostModel
from traces.costs.policy_run import replay_policy
from traces.formats.plan_file import Plan
from traces.formats.profile_file import Profile
from traces.formats.trace_file import Decoding, Trace
from traces.policies.labels import every_kind
from traces.policies.spec import Policy
from traces.workloads.synthetic import synthesize

#: The reference code's figures on the H200 box (../shared/reference/README.md).
REFERENCE = {"all_nokv_32_32": 3.5, "tide_b128_tau4_nokv_32_32": 8.7}


@dataclass
class Case:
    """One measured run: a policy under one routing, cache and length setting."""

    label: str
    policy: Policy
    routing: str  # "router" or "replay"
    kv: bool
    prompt: int
    gen: int


def run_case(model, case: Case, device: torch.device, profile: Profile, trace: Trace | None,
             dtype: str) -> tuple[dict[str, Any], Result]:
    """Run once (recording the trace), return the row and the result (tokens and margins)."""
    cfg = model.cfg
    decoding = trace.decoding if case.routing == "replay" else Decoding(32, 32, 0.95, case.kv)
    prompt = [(7 * i + 3) % (cfg.shape.vocab - 2) for i in range(case.prompt)]
    with OffloadEngine(model, case.policy, device) as engine:
        warm_up(model, Decoding(32, 32, 0.95, case.kv), prompt, engine=engine)
        with TraceRecorder(model, decoding, dtype) as rec:
            gen = Generator(model, decoding, recorder=rec, engine=engine, margins=True)
            res, seconds = timed(device, lambda: gen.replay(trace, 0) if case.routing == "replay"
                                 else gen.generate(prompt, case.gen))
    recorded = rec.trace()
    bound = replay_policy(recorded, case.policy, cost=CostModel(profile, recorded.shape, dtype)).bound_seconds()
    t = engine.totals()
    n_tokens = len(res.tokens)
    row = {"case": case.label, "policy": case.policy.name, "budget": int(case.policy.budget.max()),
           "tau": int(case.policy.tau.max()) if case.policy.tau is not None else None, "routing": case.routing,
           "kv_cache": case.kv, "total_tokens": case.prompt + case.gen, "forwards": res.forwards,
           "tokens_per_s": n_tokens / seconds, "ms_per_forward": 1e3 * seconds / res.forwards,
           "bound_ms_per_forward": 1e3 * bound / res.forwards, "measured_over_bound": seconds / bound,
           "hit_ratio": t["gpu_tokens"] / max(t["gpu_tokens"] + t["cpu_tokens"], 1), "migrations": t["migrations"]}
    return row, res


def cases(L: int, E: int, budgets: tuple[int, int], long_total: int, plans: list[Policy], quick: bool) -> list[Case]:
    b1, b2 = budgets
    pols = [("all", Policy.make("all", L, E)), ("cpu", Policy.make("cpu", L, E))]
    for b in (b1, b2):
        pols += [(f"static B={b}", Policy.make("static", L, E, budget=b)), (f"swap B={b}", Policy.make("swap", L, E, budget=b)),
                 (f"tide B={b} tau=1", Policy.make("tide", L, E, budget=b, tau=1)),
                 (f"tide B={b} tau=4", Policy.make("tide", L, E, budget=b, tau=4))]
    pols += [(f"mixed B={b1}/{b2}", every_kind(L, E, b1, b2, 4))] + [(f"plan {i}", p) for i, p in enumerate(plans)]
    out = [Case(name, pol, "router", True, 32, 32) for name, pol in pols]
    if not quick:
        out += [Case(name, pol, "replay", True, 32, 32) for name, pol in pols]
    tide = Policy.make("tide", L, E, budget=b2, tau=4)
    for prompt, gen in ((32, 32), (32, long_total - 32)):
        for kv in (False, True):
            if kv and gen == 32:
                continue  # measured above
            out += [Case("all", pols[0][1], "router", kv, prompt, gen), Case(f"tide B={b2} tau=4", tide, "router", kv, prompt, gen)]
    return out


def check(device_name: str | None = None, quick: bool = False, plan_files: list[str] | None = None,
          progress: bool = True) -> tuple[pd.DataFrame, dict[str, Any]]:
    if device_name is not None and device_name not in ("cpu", "cuda") and not device_name.startswith("cuda:"):
        raise TideError(f"--device: expected cpu or cuda, got {device_name!r}")
    cuda = torch.cuda.is_available() if device_name is None else device_name.startswith("cuda")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda and not torch.cuda.is_available():
        raise TideError("--device cuda: no CUDA device available")
    if cuda:
        config, dtype, budgets, long_total = preset_config("mini"), "bfloat16", (64, 128), 1024
    else:
        config, dtype, long_total = preset_config("tiny"), "float32", 256
        budgets = (config["num_experts"] // 4, config["num_experts"] // 2)
    if quick:
        long_total = 256
    t0 = time.perf_counter()
    model = random_model(config, seed=0, dtype=dtype, router_skew=0.25, device=device, experts_device="cpu")
    build_s = time.perf_counter() - t0
    shape = model.cfg.shape
    profile = profile_box(model.cfg, device, dtype, quick=True, progress=progress)
    plans = []
    for f in plan_files or []:
        p = Plan.read(f)
        p.check_model(shape, f)
        plans.append(Policy.from_plan(p, shape))
    trace = synthesize(shape, 32, 32, seed=0, dtype=dtype)
    rows, reference = [], {}
    todo = cases(shape.n_moe_layers, shape.experts, budgets, long_total, plans, quick)
    for i, case in enumerate(todo):
        row, res = run_case(model, case, device, profile, trace, dtype)
        setting = (case.routing, case.kv, case.prompt, case.gen)
        if case.policy.name == "all":
            reference[setting] = res
        a = agree(reference[setting], res, exact=device.type == "cpu")
        row.update(tokens_agree=a.ok, tokens_identical=a.identical, note=a.detail)
        rows.append(row)
        if progress:
            print(f"[{i + 1}/{len(todo)}] {case.label} {case.routing} kv={case.kv} {case.prompt}+{case.gen}: "
                  f"{row['tokens_per_s']:.1f} tok/s, {row['ms_per_forward']:.1f} ms/forward", flush=True)
    df = pd.DataFrame(rows)
    meta = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else platform.machine(),
            "model": shape.name, "dtype": dtype, "budgets": list(budgets), "build_s": build_s,
            "profile": profile.data, "targets": targets(df, budgets[1], long_total) if cuda else None}
    return df, meta


def targets(df: pd.DataFrame, b2: int, long_total: int) -> dict[str, Any]:
    """The issue's targets on the H200 box, from the table."""
    def tps(label: str, kv: bool, total: int) -> float:
        r = df[(df["case"] == label) & (df["routing"] == "router") & (df["kv_cache"] == kv) & (df["total_tokens"] == total)]
        return float(r["tokens_per_s"].iloc[0]) if len(r) else float("nan")
    tide = f"tide B={b2} tau=4"
    all_nokv, tide_nokv = tps("all", False, 64), tps(tide, False, 64)
    bound = df[(df["case"] == tide) & (df["kv_cache"] == False) & (df["total_tokens"] == 64)]  # noqa: E712
    return {"all_nokv_32_32_vs_reference": all_nokv / REFERENCE["all_nokv_32_32"],
            "tide_b128_tau4_nokv_32_32_vs_reference": tide_nokv / REFERENCE["tide_b128_tau4_nokv_32_32"],
            "tide_measured_over_bound": float(bound["measured_over_bound"].iloc[0]) if len(bound) else None,
            "kv_over_nokv_all_1024": tps("all", True, long_total) / tps("all", False, long_total),
            "kv_over_nokv_tide_1024": tps(tide, True, long_total) / tps(tide, False, long_total)}


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="own-router runs only; long runs at 256 tokens")
    ap.add_argument("--plans", nargs="*", default=[], help="plan JSON files (sim.plan) for the mini shape")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--out", default="out/gpu_check.json")
    a = ap.parse_args(argv)
    check_out_path(a.out)
    df, meta = check(a.device, a.quick, a.plans)
    atomic_write(a.out, lambda tmp: tmp.write_text(json.dumps({**meta, "runs": df.to_dict(orient="records")},
                                                              indent=1, default=str) + "\n"))
    cols = ["case", "routing", "kv_cache", "total_tokens", "tokens_per_s", "ms_per_forward", "bound_ms_per_forward",
            "measured_over_bound", "hit_ratio", "migrations", "tokens_agree"]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if meta["targets"]:
        print("targets:", json.dumps(meta["targets"]))
    bad = df[~df["tokens_agree"]]
    if len(bad):
        raise TideError(f"tokens disagree with all: {bad['case'].iloc[0]} ({bad['note'].iloc[0]})")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
