"""How well the simulator predicts the runtime on this box.

``python -m experiments.accuracy [--device cpu|cuda] [--checkpoint DIR] [--out DIR]
[--capture-only DIR | --replay-only DIR]``

1. Profiles this box with the runtime profiler (``--quick``) for the checkpoint's shapes
   (a tiny random checkpoint when none is given).
2. Runs the runtime under several policies and budgets, replaying a synthetic trace of the
   checkpoint's shape (realistic expert traffic), and captures each run's trace with its
   counters and measured seconds.
3. Replays every captured trace with the simulator on the measured profile and prints
   predicted against measured seconds, the error per run, and the median and worst error.

The runtime half needs only ``runtime`` and ``traces`` (``--capture-only DIR`` writes the
profile, traces and ``runs.json`` to DIR, e.g. on a GPU box without simpy); the simulator
half (``--replay-only DIR``) runs anywhere. Results go to ``DIR/accuracy.parquet``.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from tqdm.auto import tqdm

from traces.cli import ArgumentParser, atomic_write, check_out_path, integer, read_json, run_cli, write_json
from traces.errors import TideError
from traces.values import get, need_dict, need_float, need_int, need_list, need_str

RUNS: list[tuple[str, float | None, int | None]] = [
    ("all", None, None), ("cpu", None, None), ("static", 0.25, None), ("static", 0.5, None),
    ("swap", 0.25, None), ("swap", 0.5, None), ("tide", 0.25, 1), ("tide", 0.25, 4), ("tide", 0.5, 2),
]


def capture(out: Path, device_name: str, checkpoint: str | None, gen_length: int, prompt_length: int,
            repeats: int = 3) -> None:
    """The runtime half: profile, then run and record every configuration."""
    from runtime.checkpoint import load_model
    from runtime.config import ModelConfig
    from runtime.decoding import Generator
    from runtime.device import check_device, timed
    from runtime.capture import TraceRecorder
    from runtime.make_checkpoint import preset_config, write_checkpoint
    from runtime.offload import OffloadEngine
    from runtime.profile import profile_box
    from traces.policies import Policy
    from traces.synth import synthesize

    device = check_device(device_name)
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        checkpoint = str(out / "checkpoint")
        if not (Path(checkpoint) / "config.json").is_file():
            write_checkpoint(checkpoint, preset_config("tiny"), seed=0, dtype="float32", router_skew=0.25)
    cfg = ModelConfig.load(checkpoint)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    profile = profile_box(cfg, device, dtype, quick=True)
    profile.write(out / "profile.json")
    model = load_model(checkpoint, device=device, dtype=dtype, experts_device="cpu")
    shape = model.cfg.shape
    work = synthesize(shape, gen_length, prompt_length, seed=0, dtype=dtype)
    L, E = shape.n_moe_layers, shape.experts
    with OffloadEngine(model, Policy.make("cpu", L, E), device) as warm:  # the experts live in host memory
        Generator(model, work.decoding, engine=warm).replay(work, 0)  # warm-up: a whole run, not timed
    runs = []
    bar = tqdm(total=len(RUNS) * repeats, desc="runs", unit="run")
    for i, (name, frac, tau) in enumerate(RUNS):
        budget = None if frac is None else max(1, int(E * frac))
        policy = Policy.make(name, L, E, budget=budget, tau=tau)
        times = []
        for rep in range(repeats):  # the median of a few runs: single runs on a shared box are noisy
            with TraceRecorder(model, work.decoding, dtype) as rec, OffloadEngine(model, policy, device) as eng:
                gen = Generator(model, work.decoding, recorder=rec, engine=eng)
                times.append(timed(device, lambda: gen.replay(work, 0))[1])
            bar.update()
        seconds = float(sorted(times)[len(times) // 2])
        path = out / f"run{i}.parquet"
        rec.trace(policy=policy.to_json()).write(path)
        runs.append({"run": i, "policy": name, "budget": budget, "tau": tau, "trace": path.name,
                     "measured_s": seconds, "device": str(device)})
    bar.close()
    write_json(out / "runs.json", {"checkpoint": checkpoint, "runs": runs})


def read_runs(out: Path) -> list[dict]:
    """``runs.json`` of a capture, every field of its type (one error line naming the field)."""
    path = out / "runs.json"
    if not path.is_file():
        raise TideError(f"{out}: no runs.json (run --capture-only {out} first)")
    w = str(path)
    runs = need_list(get(need_dict(read_json(path, "runs"), w), "runs", w), f"{w}: runs", nonempty=True)
    out_runs = []
    for i, r in enumerate(runs):
        wi = f"{w}: runs[{i}]"
        r = need_dict(r, wi)
        opt = lambda k: None if r.get(k) is None else need_int(r[k], f"{wi}.{k}", lo=1)  # noqa: E731
        trace = need_str(get(r, "trace", wi), f"{wi}.trace")
        if Path(trace).name != trace:
            raise TideError(f"{wi}.trace must be a file name in {out}, got {trace!r}")
        out_runs.append({"run": need_int(get(r, "run", wi), f"{wi}.run", lo=0),
                         "policy": need_str(get(r, "policy", wi), f"{wi}.policy"), "budget": opt("budget"),
                         "tau": opt("tau"), "trace": trace,
                         "measured_s": need_float(get(r, "measured_s", wi), f"{wi}.measured_s", positive=True),
                         "device": need_str(get(r, "device", wi), f"{wi}.device")})
    return out_runs


def replay(out: Path) -> pd.DataFrame:
    """The simulator half: predict every captured run on the measured profile."""
    from sim.replay import simulate
    from traces.policies import Policy
    from traces.profile import Profile
    from traces.trace import read_trace

    runs = read_runs(out)
    profile = Profile.load(out / "profile.json")
    rows = []
    for r in runs:
        trace = read_trace(out / r["trace"])
        if not trace.policy:
            raise TideError(f"{out / r['trace']}: records no policy (not a capture of experiments.accuracy)")
        try:
            policy = Policy.from_json(trace.policy, trace.shape.n_moe_layers, trace.shape.experts)
        except TideError as exc:
            raise TideError(f"{out / r['trace']}: recorded policy: {exc}") from None
        res = simulate(trace, profile, policy)
        agree = all((res.counters[k] == trace.counters[k]).all() for k in res.counters)
        rows.append({**{k: r[k] for k in ("run", "policy", "budget", "tau", "device")},
                     "measured_s": r["measured_s"], "predicted_s": res.seconds,
                     "error": (res.seconds - r["measured_s"]) / r["measured_s"], "counters_agree": agree})
    df = pd.DataFrame(rows)
    atomic_write(out / "accuracy.parquet", lambda tmp: df.to_parquet(tmp, index=False))
    return df


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--out", default="out/accuracy")
    ap.add_argument("--capture-only", default=None, metavar="DIR")
    ap.add_argument("--replay-only", default=None, metavar="DIR")
    ap.add_argument("--gen-length", type=integer, default=128)
    ap.add_argument("--prompt-length", type=integer, default=64)
    ap.add_argument("--repeats", type=integer, default=3, help="runs per setting; the median is kept")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        raise TideError("--repeats must be at least 1")
    if a.capture_only and a.replay_only:
        raise TideError("give --capture-only or --replay-only, not both")
    out = Path(a.capture_only or a.replay_only or a.out)
    if a.replay_only:
        read_runs(out)
    else:
        check_out_path(out, "--capture-only" if a.capture_only else "--out", folder=True)
        if a.checkpoint is not None:
            from runtime.config import ModelConfig
            ModelConfig.load(a.checkpoint)
    if not a.replay_only:
        import torch
        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        capture(out, device, a.checkpoint, a.gen_length, a.prompt_length, a.repeats)
        if a.capture_only:
            print(f"captured {out}; replay anywhere with python -m experiments.accuracy --replay-only {out}")
            return 0
    df = replay(out)
    with pd.option_context("display.width", 140):
        print(df.assign(error=(100 * df["error"]).round(1).astype(str) + "%").round(4).to_string(index=False))
    err = df["error"].abs()
    print(f"\nmedian |error| {100 * err.median():.1f}%, worst {100 * err.max():.1f}% over {len(df)} runs; "
          f"counters agree in {int(df['counters_agree'].sum())}/{len(df)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
