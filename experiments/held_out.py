"""Held-out accuracy: profile the box once, then predict a grid of workloads the profile never saw.

``python -m experiments.held_out [--preset tiny] [--dtype float32] [--skews 0,0.25,1] [--seeds 0,1]
[--gen-lengths 48,96] [--batch-sizes 1,4,8] [--rounds 3] [--out out/held-out]``

``experiments.accuracy`` profiles and runs on one workload; a user's own differs (another
checkpoint seed, router skew, lengths, batch size). Here the profile is taken once, on the
preset's own checkpoint (seed 0, skew 0.25), and every cell of the grid (one checkpoint per
seed and skew; each generation length and batch size; ``--requests`` prompts through the
model's own router) runs under ``all``, ``tide`` (a quarter of the experts, tau 4) and
``static`` (a quarter). The simulator predicts each run from its recorded trace on that one
profile. A noisy box is met three ways, said in the output and applied alike to the profile
and the runs: the checkpoints are synced to the drive before the profile; the profile's in-run
replays each go on for ``--spread-s`` seconds (the box's slow phases seen too); each checkpoint runs
once untimed before round 0; rounds are interleaved (each round
runs every cell and policy once, so a slow minute hits them all alike); each round's speed
reference is recorded, and a round whose reference moved (against the profile's) more than
the error it reports is flagged. Prints the error per cell and policy (median over rounds),
each run's spread, the medians by batch size, and the predicted speedups over ``all``;
writes ``held-out.parquet`` and ``held-out-rounds.parquet`` in ``--out``.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from experiments.accuracy import need_router_skew, preset_checkpoint
from traces.common.cli import ArgumentParser, comma_list, integer, number, run_cli
from traces.common.errors import TideError
from traces.common.files import atomic_write, check_out_path, read_json, write_json
from traces.common.values import need_int
from traces.formats.trace_file import Decoding
from traces.policies.spec import Policy

#: The policies every cell runs: (name, budget fraction, tau).
POLICIES: list[tuple[str, float | None, int | None]] = [("all", None, None), ("tide", 0.25, 4), ("static", 0.25, None)]


@dataclass(frozen=True)
class Cell:
    seed: int
    skew: float
    gen_length: int
    batch_size: int


def prompts_for(vocab: int, n: int, length: int) -> list[list[int]]:
    """``n`` fixed prompts of ``length`` tokens (the same in every cell, so cells differ only in
    what the grid varies)."""
    return [[1 + (i * 997 + j * 31) % (vocab - 3) for j in range(length)] for i in range(n)]


def policy_of(name: str, frac: float | None, tau: int | None, L: int, E: int) -> Policy:
    return Policy.make(name, L, E, budget=None if frac is None else max(1, int(E * frac)), tau=tau)


def capture(out: Path, preset: str, dtype: str, cells: list[Cell], requests: int, prompt_length: int,
            rounds: int, device_name: str, spread_s: float = 10.0, threads: int | None = None,
            quick: bool = False) -> dict:
    """The runtime half: one profile, then rounds of every cell and policy, a row each in
    ``measured.parquet``. Returns what was done to steady the box. ``quick``: a smoke run (the
    profile's small batch workload, one timed replay per speed reference), not the check."""
    import torch

    from runtime.capture import TraceRecorder
    from runtime.checkpoint import load_model
    from runtime.config import ModelConfig
    from runtime.decoding import Generator
    from runtime.calibrate import replay_seconds
    from runtime.device import check_device, give_back_freed_memory, timed
    from runtime.offload import OffloadEngine
    from runtime.profile import profile_box

    device = check_device(device_name)
    if threads:  # the profile and every run alike
        torch.set_num_threads(threads)
    (out / "traces").mkdir(parents=True, exist_ok=True)
    folders = {(c.seed, c.skew): preset_checkpoint(out, preset, c.seed, c.skew) for c in cells}
    base = preset_checkpoint(out, preset)  # the presets' own: the profile's workload
    os.sync()  # the checkpoints' writeback done before the profile, not under it
    cfg = ModelConfig.load(base)
    model = load_model(base, device=device, dtype=dtype, experts_device="cpu")
    prof = profile_box(cfg, device, dtype, quick=True, progress=False, model=model, spread_s=spread_s,
                       full_batches=not quick)
    prof.write(out / "profile.json")
    del model
    give_back_freed_memory()
    steady = {"threads": torch.get_num_threads(), "warm_up": "one run of each checkpoint before round 0",
              "rounds": "interleaved: every cell and policy once per round",
              "reference": "before each run, the profile's level replay timed again (same work), against the profile's",
              "reference_kind": "replay",
              "writeback": "checkpoints synced to the drive before the profile",
              "profile": f"each in-run replay repeated for {spread_s:g} s at least (the box's slow phases seen too)"
                         + ("; quick: the small batch workload, one unwarmed replay per reference (a smoke run)" if quick else "")}
    shape = cfg.shape
    L, E = shape.n_moe_layers, shape.experts
    prompts = prompts_for(shape.vocab, requests, prompt_length)
    decoding = Decoding()
    rows: list[dict] = []
    by_ckpt: dict[tuple[int, float], list[Cell]] = {}
    for c in cells:
        by_ckpt.setdefault((c.seed, c.skew), []).append(c)
    total = rounds * len(cells) * len(POLICIES) + len(by_ckpt)
    bar = tqdm(total=total, desc="held-out runs (a warm-up per checkpoint, then rounds)", unit="run")
    for rnd in range(-1, rounds):  # -1: the warm-up, one run per checkpoint, not kept
        for key, group in by_ckpt.items():
            model = load_model(folders[key], device=device, dtype=dtype, experts_device="cpu")
            todo = list(itertools.product(group, POLICIES)) if rnd >= 0 else [(group[0], POLICIES[0])]
            for cell, (name, frac, tau) in todo:
                policy = policy_of(name, frac, tau, L, E)
                ref = replay_seconds(model, device, reps=1 if quick else 3, warm=not quick) if rnd >= 0 else 0.0
                with TraceRecorder(model, decoding, dtype) as rec, OffloadEngine(model, policy, device) as eng:
                    gen = Generator(model, decoding, recorder=rec, engine=eng)
                    _, secs = timed(device, lambda: gen.generate_batch(prompts, [cell.gen_length] * requests,
                                                                         cell.batch_size))
                if rnd >= 0:
                    path = out / "traces" / f"{cell.seed}-{cell.skew:g}-{cell.gen_length}-{cell.batch_size}-{name}.parquet"
                    if rnd == rounds - 1:
                        rec.trace(policy=policy.to_json()).write(path)
                    rows.append({"seed": cell.seed, "skew": cell.skew, "gen_length": cell.gen_length,
                                 "batch_size": cell.batch_size, "policy": name, "round": rnd, "measured_s": secs,
                                 "reference_s": ref, "trace": path.name})
                give_back_freed_memory()
                bar.update()
            del model
    bar.close()
    runs = pd.DataFrame(rows)
    atomic_write(out / "measured.parquet", lambda tmp: runs.to_parquet(tmp, index=False))
    write_json(out / "steady.json", steady)
    return steady


def predict(out: Path, profile: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The simulator half: each captured run (``measured.parquet``) predicted on the one
    profile (``profile``: another, for a what-if on the pricing); errors per round, then per
    (cell, policy) the median over rounds, the spread and the flags."""
    from sim.simulate import simulate
    from traces.formats.profile_file import Profile
    from traces.formats.trace_read import read_trace

    if not (out / "measured.parquet").is_file():
        raise TideError(f"{out}: no measured.parquet (capture it first: python -m experiments.held_out --out {out})")
    prof = Profile.load(profile or out / "profile.json")
    steady = read_json(out / "steady.json", "steady") if (out / "steady.json").is_file() else {}
    # the reference the capture timed: the profile's level replay, or (older captures) small matmuls
    replay_s = (prof.data.get("in_run") or {}).get("replay_s")
    ref_p = replay_s if steady.get("reference_kind") == "replay" and replay_s else prof.reference_s()
    runs = pd.read_parquet(out / "measured.parquet")
    pred, refused = {}, {}
    for name in tqdm(sorted(runs["trace"].unique()), desc="predicting", unit="run"):
        trace = read_trace(out / "traces" / name)
        policy = Policy.from_json(trace.policy, trace.shape.n_moe_layers, trace.shape.experts)
        try:
            pred[name] = simulate(trace, prof, policy).seconds
        except TideError as exc:  # the pricing refuses this workload (e.g. a fitted term priced below zero)
            pred[name], refused[name] = np.nan, str(exc).split(": ", 1)[-1]
    runs["predicted_s"] = runs["trace"].map(pred)
    runs["refused"] = runs["trace"].map(lambda n: refused.get(n, ""))
    runs["error"] = runs["predicted_s"] / runs["measured_s"] - 1
    # how much slower the box ran just before this run than while the profile was taken
    runs["drift"] = (runs["reference_s"] / ref_p - 1) if ref_p else np.nan
    runs["flagged"] = runs["drift"].abs() > runs["error"].abs()
    key = ["seed", "skew", "gen_length", "batch_size", "policy"]
    cells = runs.groupby(key, sort=False).agg(
        measured_s=("measured_s", "median"), predicted_s=("predicted_s", "median"), error=("error", "median"),
        spread=("measured_s", lambda s: s.max() / s.min() - 1), flagged_rounds=("flagged", "sum"),
        refused=("refused", "first")).reset_index()
    # each policy's predicted speedup over ``all`` against the one measured in the same round
    # (paired: a slow minute slows both), the median over rounds
    cell_key = ["seed", "skew", "gen_length", "batch_size"]
    alls = runs[runs["policy"] == "all"].set_index([*cell_key, "round"])[["measured_s", "predicted_s"]]
    paired = runs.join(alls.add_suffix("_all"), on=[*cell_key, "round"])
    runs["speedup_error"] = (paired["predicted_s_all"] / paired["predicted_s"]) / (paired["measured_s_all"] / paired["measured_s"]) - 1
    cells["speedup_error"] = runs.groupby(key, sort=False)["speedup_error"].median().to_numpy()
    atomic_write(out / "held-out.parquet", lambda tmp: cells.to_parquet(tmp, index=False))
    atomic_write(out / "held-out-rounds.parquet", lambda tmp: runs.to_parquet(tmp, index=False))
    return cells, runs


def box_floor(runs: pd.DataFrame) -> tuple[float, float] | None:
    """How far the box lets a measurement be reproduced: each run's median over the even rounds
    against its median over the odd ones, after the two halves' common shift (a slow phase
    over a whole half), as (median, worst) of ``|ratio - 1|``; None with one round. A
    prediction cannot be held tighter than the measurement repeats (on the 2-core VM the same
    tiny grid, captured four times, disagreed by 6-9% median and 24-44% worst)."""
    if runs["round"].nunique() < 2:
        return None
    key = ["seed", "skew", "gen_length", "batch_size", "policy"]
    half = runs["round"] % 2
    even = runs[half == 0].groupby(key)["measured_s"].median()
    odd = runs[half == 1].groupby(key)["measured_s"].median()
    ratio = even / odd
    off = (ratio / ratio.median() - 1).abs()
    return float(off.median()), float(off.max())


def summary(cells: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """The medians a reader checks: overall, by batch size, the speedups, the rounds' medians."""
    lines = []
    if (cells["refused"] != "").any():
        lines.append(f"the pricing refused {int((cells['refused'] != '').sum())} runs: {cells.loc[cells['refused'] != '', 'refused'].iloc[0]}")
    err = cells["error"].abs()
    lines.append(f"median |error| {100 * err.median():.1f}%, worst {100 * err.max():.1f}% over {int(err.notna().sum())} runs")
    lines.append("  " + "; ".join(f"batch {b}: median {100 * part['error'].abs().median():.1f}%, worst "
                                  f"{100 * part['error'].abs().max():.1f}%" for b, part in cells.groupby("batch_size")))
    per_round = runs.groupby("round")["error"].apply(lambda e: 100 * e.abs().median())
    lines.append("  median |error| per round: " + ", ".join(f"{v:.1f}%" for v in per_round))
    other = cells[cells["policy"] != "all"]
    if len(other):
        lines.append(f"predicted speedups over all (against each round's measured, median over rounds) within "
                     f"{100 * other['speedup_error'].abs().max():.1f}% (median {100 * other['speedup_error'].abs().median():.1f}%)")
    lines.append(f"runs' spread, fastest to slowest round: median {100 * cells['spread'].median():.0f}%; the box ran "
                 f"{100 * runs['drift'].median():+.0f}% (median) against the profile, {100 * runs['drift'].min():+.0f}% to "
                 f"{100 * runs['drift'].max():+.0f}%; runs whose reference moved more than their error: "
                 f"{int(runs['flagged'].sum())} of {len(runs)}")
    floor = box_floor(runs)
    if floor:
        lines.append(f"the box's own floor: each run's median over even rounds against odd rounds differs by "
                     f"{100 * floor[0]:.1f}% (median), {100 * floor[1]:.1f}% (worst), after the halves' common shift")
    return lines


def main(argv: list[str] | None = None, prog: str = "python -m experiments.held_out") -> int:
    ap = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=("tiny", "mini-moe"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="float32: row-exact batches (the reference mode); bfloat16: merged requests (the GPU's way)")
    ap.add_argument("--skews", default="0,0.25,1", help="router skews of the grid's checkpoints")
    ap.add_argument("--seeds", default="0,1", help="seeds of the grid's checkpoints")
    ap.add_argument("--gen-lengths", default="48,96")
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--prompt-length", type=integer, default=24)
    ap.add_argument("--requests", type=integer, default=8, help="prompts per run")
    ap.add_argument("--rounds", type=integer, default=3)
    ap.add_argument("--spread-s", type=number, default=10.0,
                    help="the profile's in-run replays each go on this many seconds at least (a shared box runs in "
                         "phases seconds long)")
    ap.add_argument("--threads", type=integer, default=None,
                    help="torch threads for the profile and every run (default: torch's; on the 2-core VM one thread "
                         "ran a tiny forward faster and steadier)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: the profile's small batch workload and one replay per speed reference "
                         "(its figures are not the check's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/held-out")
    ap.add_argument("--replay-only", default=None, metavar="DIR", help="predict a capture again (no runs)")
    ap.add_argument("--profile", default=None, help="with --replay-only: predict on this profile instead of the capture's")
    a = ap.parse_args(argv)
    if a.profile and not a.replay_only:
        raise TideError("--profile goes with --replay-only (a capture profiles the box itself)")
    skews = comma_list(a.skews, "--skews", number, "numbers")
    for v in skews:
        need_router_skew(v, "--skews")
    seeds = comma_list(a.seeds, "--seeds", integer, "integers")
    gens = comma_list(a.gen_lengths, "--gen-lengths", integer, "integers")
    batches = comma_list(a.batch_sizes, "--batch-sizes", integer, "integers")
    for v in seeds:
        need_int(v, "--seeds", lo=0)
    for v in gens:
        need_int(v, "--gen-lengths", lo=1, hi=4096)
    for v in batches:
        need_int(v, "--batch-sizes", lo=1, hi=64)
    need_int(a.prompt_length, "--prompt-length", lo=1, hi=4096)
    need_int(a.requests, "--requests", lo=1, hi=256)
    need_int(a.rounds, "--rounds", lo=1, hi=100)
    if a.threads is not None:
        need_int(a.threads, "--threads", lo=1, hi=os.cpu_count() or 1)
    if not 0 <= a.spread_s <= 600:
        raise TideError(f"--spread-s must be within 0..600 seconds, got {a.spread_s:g}")
    if a.replay_only:
        out = Path(a.replay_only)
        steady = read_json(out / "steady.json", "steady") if (out / "steady.json").is_file() else {}
    else:
        out = check_out_path(Path(a.out), "--out", folder=True)
        out.mkdir(parents=True, exist_ok=True)
        cells = [Cell(d, s, g, b) for s in skews for d in seeds for g in gens for b in batches]
        steady = capture(out, a.preset, a.dtype, cells, a.requests, a.prompt_length, a.rounds, a.device, a.spread_s, a.threads,
                         a.quick)
    table, runs = predict(out, a.profile)
    print("steadying the box: " + "; ".join(f"{k}: {v}" for k, v in steady.items()))
    show = table.assign(**{c: (100 * table[c]).round(1).astype(str) + "%" for c in ("error", "spread", "speedup_error")})
    with pd.option_context("display.width", 200):
        print(show.round(4).to_string(index=False))
    print("\n".join(summary(table, runs)))
    return 0


if __name__ == "__main__":
    run_cli(main)
