"""Benchmark of generation: ms per forward and tokens/s with and without the KV cache, and
against the batch size.

``python -m experiments.bench_runtime [--preset tiny|mini|flash] [--layers N] [--device cpu|cuda]
[--dtype D] [--prompt-length 32] [--gen-length 64] [--checkpoint-dir DIR]
[--batch-sizes 1,2,4,8,16] [--policies all,static,swap,tide] [--traffic own,replay]``

A random checkpoint of the preset is written once under ``--checkpoint-dir`` (default
``out/checkpoints``) and reused. Without ``--batch-sizes``: plain generation (every expert
where the model runs) with and without the KV cache. With it: for each batch size ``b``,
``b`` requests (distinct prompts) decoded together through the offload engine under
``all`` (every expert resident) and ``static``, ``swap`` and ``tide`` (tau 4) at a quarter
of the experts, with the model's own router (``own``) and with calibrated synthetic
traffic replayed (``replay``: a random router sends a block's identical mask tokens to a
few experts, which flatters batching); tokens/s, forwards/s, ms per forward and where a
forward's time goes (the engine's expert math on the fast device and the CPU, copies, the
decision, the rest: attention, router, head and the decoding loop). Prints one table;
``--json`` prints the rows instead.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from runtime.checkpoint import load_model
from runtime.decoding import Generator, warm_up
from runtime.device import check_device, timed
from runtime.make_checkpoint import preset_config, write_checkpoint
from traces.common.checks import check_batch_size
from traces.common.cli import ArgumentParser, comma_list, integer, print_json, run_cli
from traces.common.values import need_str
from traces.formats.trace_file import Decoding


def ensure_checkpoint(folder: Path, preset: str, layers: int | None, seed: int = 0) -> Path:
    name = f"{preset}-{layers}l" if layers else preset
    path = folder / name
    if not (path / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        dtype = "float32" if preset == "tiny" else "bfloat16"
        write_checkpoint(path, preset_config(preset, layers), seed=seed, dtype=dtype, router_skew=0.25, progress=True)
    return path


def bench(model, prompt_length: int, gen_length: int, kv: bool, device: torch.device) -> dict:
    prompt = list(range(1, prompt_length + 1))
    dec = Decoding(32, 32, 0.95, kv)
    warm_up(model, dec, prompt)
    r, s = timed(device, lambda: Generator(model, dec).generate(prompt, gen_length))
    return {"kv_cache": kv, "forwards": r.forwards, "seconds": s, "ms_per_forward": 1e3 * s / r.forwards,
            "tokens": len(r.tokens), "tokens_per_s": len(r.tokens) / s}


def bench_batches(model, device: torch.device, batch_sizes: list[int], policies: list[str], traffic: list[str],
                  prompt_length: int, gen_length: int) -> list[dict]:
    """Tokens/s against the batch size, per policy and traffic (see the module doc)."""
    from tqdm.auto import tqdm

    from runtime.offload import OffloadEngine
    from traces.policies.spec import Policy
    from traces.workloads.synthetic import synthesize
    s = model.cfg.shape
    L, E = s.n_moe_layers, s.experts
    top = max(batch_sizes)
    vocab = s.vocab - 3  # clear of mask, eos and pad at the top of the vocabulary
    prompts = [[1 + (i * 997 + j) % vocab for j in range(prompt_length)] for i in range(top)]
    dec = Decoding(32, 32, 0.95, True)
    work = synthesize(s, gen_length, prompt_length, seed=0, dtype=str(model.dtype).removeprefix("torch."),
                      requests=top) if "replay" in traffic else None
    make = {"all": lambda: Policy.make("all", L, E), "static": lambda: Policy.make("static", L, E, budget=max(1, E // 4)),
            "swap": lambda: Policy.make("swap", L, E, budget=max(1, E // 4)),
            "tide": lambda: Policy.make("tide", L, E, budget=max(1, E // 4), tau=4)}
    rows = []
    todo = [(t, p, b) for t in traffic for p in policies for b in batch_sizes]
    for t, name, b in tqdm(todo, desc="batch sizes x policies", unit="run"):
        policy = make[name]()
        with OffloadEngine(model, policy, device) as eng:
            gen = Generator(model, dec, engine=eng)
            warm_up(model, dec, prompts[0], engine=eng)
            if t == "own":
                res, sec = timed(device, lambda: gen.generate_batch(prompts[:b], [gen_length] * b, b))
            else:
                res, sec = timed(device, lambda: gen.replay_batch(work, [r["request"] for r in work.requests[:b]], b))
            timers = dict(eng.timers)
        F = gen.forwards_run
        tokens = sum(len(r.tokens) for r in res)
        ms = lambda v: 1e3 * v / max(F, 1)  # noqa: E731
        expert = timers["fast_s"] + timers["cpu_s"]
        rows.append({"traffic": t, "policy": name, "budget": int(policy.budget[0]), "batch_size": b, "tokens": tokens,
                     "forwards": F, "seconds": sec, "tokens_per_s": tokens / sec, "forwards_per_s": F / sec,
                     "ms_per_forward": ms(sec), "experts_ms": ms(expert), "copies_ms": ms(timers["copy_s"]),
                     "decide_ms": ms(timers["decide_s"]), "engine_other_ms": ms(timers["layer_s"] - expert
                                                                               - timers["copy_s"] - timers["decide_s"]),
                     "rest_ms": ms(sec - timers["layer_s"])})
    df = pd.DataFrame(rows)
    base = df[df["batch_size"] == min(batch_sizes)].set_index(["traffic", "policy"])["tokens_per_s"]
    df["speedup_vs_smallest"] = [r.tokens_per_s / base[(r.traffic, r.policy)] for r in df.itertuples()]
    return df.to_dict(orient="records")


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.bench_runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=integer, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--prompt-length", type=integer, default=32)
    ap.add_argument("--gen-length", type=integer, default=64)
    ap.add_argument("--checkpoint-dir", default="out/checkpoints")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--batch-sizes", default=None, help="e.g. 1,2,4,8,16: tokens/s against the batch size")
    ap.add_argument("--policies", default="all,static,swap,tide", help="with --batch-sizes: among all, static, swap, tide")
    ap.add_argument("--traffic", default="own,replay", help="with --batch-sizes: own (the model's router), replay "
                    "(calibrated synthetic traffic), or both")
    a = ap.parse_args(argv)
    sizes = None
    if a.batch_sizes is not None:
        sizes = comma_list(a.batch_sizes, "--batch-sizes", lambda v: check_batch_size(integer(v), "--batch-sizes"),
                           "integer values")
        policies = comma_list(a.policies, "--policies", lambda v: need_str(v, "--policies", ("all", "static", "swap", "tide")))
        traffic = comma_list(a.traffic, "--traffic", lambda v: need_str(v, "--traffic", ("own", "replay")))
    device = check_device(a.device)
    path = ensure_checkpoint(Path(a.checkpoint_dir), a.preset, a.layers)
    t0 = time.perf_counter()
    # batches run through the offload engine, which keeps every routed expert in host memory
    model = load_model(path, device=device, dtype=a.dtype, experts_device="cpu" if sizes is not None else device)
    load_s = time.perf_counter() - t0
    if sizes is not None:
        rows = bench_batches(model, device, sizes, policies, traffic, a.prompt_length, a.gen_length)
        rows = [dict(preset=a.preset, layers=model.cfg.shape.layers, **r) for r in rows]
    else:
        rows = [dict(preset=a.preset, layers=model.cfg.shape.layers, dtype=str(model.dtype).removeprefix("torch."),
                     device=str(device), load_s=load_s, **bench(model, a.prompt_length, a.gen_length, kv, device))
                for kv in (True, False)]
    if a.json:
        print_json(rows)
    else:
        with pd.option_context("display.width", 250):
            print(pd.DataFrame(rows).round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
