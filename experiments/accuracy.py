"""How well the simulator predicts the runtime on this box.

``python -m experiments.accuracy [--device cpu|cuda] [--checkpoint DIR] [--out DIR]
[--capture-only DIR | --replay-only DIR]``; ``python -m experiments.accuracy --held-out [...]``
is the held-out mode (:mod:`experiments.held_out`: one profile, a grid of workloads it never
saw; its own flags follow).

1. In rounds (``--rounds``), profiles this box with the runtime profiler (``--quick``) for
   the checkpoint's shapes (a random checkpoint of ``--preset`` when none is given), then
   runs the runtime under several policies and budgets, replaying a synthetic trace of the
   checkpoint's shape (realistic expert traffic), capturing each run's trace with its
   counters; the speed reference is read once per round.
2. Replays every captured trace with the simulator on each round's profile, against that
   round's runs (measured in the same process and conditions): a run's error is predicted
   over measured, minus one, per round; prints every round's errors, then per run the
   medians over rounds, each policy's predicted speedup over ``all`` against the measured
   one, the median and worst error, how much the runs varied between rounds (the box's
   noise) and, beside the error, how the speed reference moved between each round's
   profile and its runs (``drift``: never folded into the error).

The runtime half needs only ``runtime`` and ``traces`` (``--capture-only DIR`` writes the
profile, traces and ``runs.json`` to DIR, e.g. on a GPU box without simpy); the simulator
half (``--replay-only DIR``) runs anywhere. Results go to ``DIR/accuracy.parquet``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from traces.common.checks import check_batch_size
from traces.common.cli import ArgumentParser, integer, number, run_cli
from traces.common.errors import TideError
from traces.common.files import atomic_write, check_out_path, read_json, write_json
from traces.common.values import get, need_dict, need_float, need_int, need_list, need_str
from traces.formats.shapes import ModelShape
from traces.formats.trace_file import Trace
from traces.policies.labels import every_kind
from traces.policies.spec import Policy
from traces.workloads.synthetic import synthesize

RUNS: list[tuple[str, float | None, int | None]] = [
    ("all", None, None), ("cpu", None, None), ("static", 0.25, None), ("static", 0.5, None),
    ("swap", 0.25, None), ("swap", 0.5, None), ("tide", 0.25, 1), ("tide", 0.25, 4), ("tide", 0.5, 2),
    ("mixed", None, None),  # a plan of every kind in turn: swap at E/4, tide at E/2 tau 2, static at E/2, cpu
]

#: Settings with a host tier (batch 1, replayed traffic): (policy, budget fraction, tau, host
#: kind, host budget fraction, host tau). Every MoE layer keeps only that share of its experts
#: in host memory and reads the rest from the checkpoint's files as forwards need them.
HOSTED: list[tuple[str, float | None, int | None, str, float, int]] = [
    ("all", None, None, "lru", 0.5, 1), ("tide", 0.25, 4, "tide", 0.5, 4), ("static", 0.25, None, "static", 0.25, 1),
    ("cpu", None, None, "lru", 0.25, 1),
]

#: Batched settings: (policy, budget fraction, tau, batch size, traffic). ``replay``: the
#: synthetic trace's requests composed at that batch size (calibrated traffic); ``own``: the
#: model's own router on fixed prompts; ``arrivals``: replayed traffic arriving spread in time.
BATCHED: list[tuple[str, float | None, int | None, int, str]] = [
    ("all", None, None, 4, "replay"), ("tide", 0.25, 4, 4, "replay"), ("all", None, None, 8, "replay"),
    ("swap", 0.25, None, 8, "replay"), ("all", None, None, 4, "own"), ("tide", 0.25, 4, 4, "own"),
    ("all", None, None, 8, "own"), ("static", 0.25, None, 8, "own"), ("tide", 0.25, 4, 4, "arrivals"),
]
BATCH_REQUESTS = 8  # requests of a batched setting


#: Checkpoints made when none is given: the tiny model, and LLaDA2.0-mini's layer shapes
#: (one dense and two MoE layers, 256 experts of 2048x512, fp32) with a 1024-token
#: vocabulary, so that expert math, not the head, is most of a forward.
PRESETS = ("tiny", "mini-moe")


PRESET_SEED, PRESET_SKEW = 0, 0.25  # the presets' own checkpoint: what the profile is fitted on


def make_preset(folder: Path, preset: str, seed: int = PRESET_SEED, router_skew: float = PRESET_SKEW) -> None:
    """The preset's checkpoint in ``folder`` (kept: made once), fp32, of this seed and skew."""
    from runtime.make_checkpoint import preset_config, write_checkpoint
    if (folder / "config.json").is_file():
        return
    if preset == "tiny":
        cfg = preset_config("tiny")
    else:
        cfg = preset_config("mini", layers=3)
        cfg.update(name="llada2-mini-moe", vocab_size=1024, mask_token_id=1023, eos_token_id=1022, pad_token_id=1022)
    write_checkpoint(str(folder), cfg, seed=seed, dtype="float32", router_skew=router_skew)


def need_router_skew(v: float, where: str) -> float:
    """A preset checkpoint's router skew (``expert_bias = S x N(0, 1)``), within 0..10."""
    if not 0 <= v <= 10:
        raise TideError(f"{where} must be within 0..10, got {v:g}")
    return v


def preset_checkpoint(out: Path, preset: str, seed: int = PRESET_SEED, router_skew: float = PRESET_SKEW) -> Path:
    """The preset checkpoint of this seed and skew in ``out`` (made there once): the presets'
    own is ``checkpoint-PRESET``, any other is named for its seed and skew."""
    own = (seed, router_skew) == (PRESET_SEED, PRESET_SKEW)
    folder = out / (f"checkpoint-{preset}" if own else f"checkpoint-{preset}-seed{seed}-skew{router_skew:g}")
    make_preset(folder, preset, seed=seed, router_skew=router_skew)
    return folder


def capture(out: Path, device_name: str, checkpoint: str | None, gen_length: int, prompt_length: int,
            rounds: int = 5, preset: str = "tiny", batches: bool = True, batch_requests: int = BATCH_REQUESTS,
            host_only: bool = False, seed: int = PRESET_SEED, router_skew: float = PRESET_SKEW,
            quick: bool = False) -> None:
    """The runtime half. Rounds of: profile the box, then run every setting once. A shared box
    changes speed from minute to minute, so each round's runs are kept with the profile taken
    just before them (``profile-roundK.json``) and with the speed reference around each run;
    ``profile.json`` is the rounds' median, and the spread over rounds is the box's noise."""
    from runtime.capture import TraceRecorder
    from runtime.checkpoint import load_model, load_on_drive
    from runtime.config import ModelConfig
    from runtime.decoding import Generator
    from runtime.device import check_device, give_back_freed_memory, speed_reference_s, timed
    from runtime.offload import OffloadEngine
    from runtime.profile import profile_box
    from runtime.profile_drive import with_drive
    from traces.formats.profile_file import median_of

    device = check_device(device_name)
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        checkpoint = str(preset_checkpoint(out, preset, seed, router_skew))
    cfg = ModelConfig.load(checkpoint)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model = load_model(checkpoint, device=device, dtype=dtype, experts_device="cpu")
    shape = model.cfg.shape
    work = synthesize(shape, gen_length, prompt_length, seed=0, dtype=dtype)
    L, E = shape.n_moe_layers, shape.experts
    with OffloadEngine(model, Policy.make("cpu", L, E), device) as warm:  # the experts live in host memory
        Generator(model, work.decoding, engine=warm).replay(work, 0)  # warm-up: a whole run, not timed
    settings = _settings(L, E, batches, host_only)
    drive_model, files = load_on_drive(checkpoint, device, dtype)
    many, prompts = _batched_workload(shape, gen_length, prompt_length, batch_requests, dtype)
    offsets: list[float] | None = None  # the arrivals run's stream, set from the first round's batch-1 speed
    latencies: dict[int, list[float]] = {}

    def run_setting(i: int, gen: Generator) -> float:
        nonlocal offsets
        name, budget, tau, policy, batch, traffic = settings[i]
        ids = list(range(batch_requests))
        if batch == 1:
            return timed(device, lambda: gen.replay(work, 0))[1]
        if traffic == "own":
            return timed(device, lambda: gen.generate_batch(prompts, [many.requests[0]["gen_length"]] * len(prompts),
                                                            batch))[1]
        if traffic == "replay":
            return timed(device, lambda: gen.replay_batch(many, ids, batch))[1]
        if offsets is None:  # a request every quarter of what one takes alone (``all``, batch 1, first round)
            gap = times[0][0] * many.requests[0]["gen_length"] / work.requests[0]["gen_length"] / 4
            offsets = [round(k * gap, 4) for k in range(batch_requests)]
        res, secs = timed(device, lambda: gen.replay_batch(many, ids, batch, arrivals=offsets))
        latencies.setdefault(i, []).append(float(np.median([r.end_s - r.arrival_s for r in res])))
        return secs
    profiles, times, refs = [], [[] for _ in settings], [[] for _ in settings]
    bar = tqdm(total=rounds * (len(settings) + 1), desc="rounds of profile + runs", unit="step")
    for rnd in range(rounds):
        prof = profile_box(cfg, device, dtype, quick=True, progress=False, model=model, batches=batches,
                           full_batches=not quick)
        profiles.append(with_drive(prof, checkpoint, cfg))
        profiles[-1].write(out / f"profile-round{rnd}.json")
        ref = speed_reference_s()  # the box's speed during this round's runs: reported as drift, never folded in
        bar.update()
        for i, (name, budget, tau, policy, batch, traffic) in enumerate(settings):
            m, drive = (drive_model, files) if policy.host is not None else (model, None)
            with TraceRecorder(m, work.decoding, dtype) as rec, OffloadEngine(m, policy, device, drive=drive) as eng:
                gen = Generator(m, work.decoding, recorder=rec, engine=eng)
                times[i].append(run_setting(i, gen))
                refs[i].append(ref)
            if rnd == rounds - 1:
                rec.trace(policy=policy.to_json()).write(out / f"run{i}.parquet")
            give_back_freed_memory()  # the engine's stacks, out of time: room for the next (mini-moe fills 24 GB)
            bar.update()
    bar.close()
    typical = median_of(profiles)
    typical.data["measured"]["rounds"] = rounds
    typical.write(out / "profile.json")
    _write_runs(out, checkpoint, rounds, settings, times, refs, offsets, latencies, device)


def _settings(L: int, E: int, batches: bool, host_only: bool = False) -> list[tuple]:
    """Every setting measured: (name, budget, tau, policy, batch size, traffic), the batch-1
    runs (``RUNS``; ``host_only``: ``all`` alone), those with a host tier (``HOSTED``) and, with
    ``batches``, the batched ones (``BATCHED``)."""
    from traces.policies.host import HostPolicy
    settings = []
    for name, frac, tau, kind, hfrac, htau in HOSTED:
        budget = None if frac is None else max(1, int(E * frac))
        host = HostPolicy.make(kind, L, E, max(1, int(E * hfrac)), htau)
        settings.append((name, budget, tau, Policy.make(name, L, E, budget=budget, tau=tau).with_host(host), 1, "replay"))
    runs = RUNS[:1] if host_only else RUNS
    for name, frac, tau, batch, traffic in [(*r, 1, "replay") for r in runs] + (BATCHED if batches and not host_only else []):
        budget = None if frac is None else max(1, int(E * frac))
        policy = every_kind(L, E, max(1, E // 4), max(1, E // 2), 2) if name == "mixed" else \
            Policy.make(name, L, E, budget=budget, tau=tau)
        settings.append((name, budget, tau, policy, batch, traffic))
    return settings


def _batched_workload(shape: ModelShape, gen_length: int, prompt_length: int, batch_requests: int,
                      dtype: str) -> tuple[Trace, list[list[int]]]:
    """The batched settings' workload: requests of several prompt lengths, half the generation
    length, as a trace (replayed traffic) and as prompts (the model's own router)."""
    many = synthesize(shape, max(32, gen_length // 2), [prompt_length // 2 + 16 * (i % 4) for i in range(batch_requests)],
                      seed=1, requests=batch_requests, dtype=dtype)
    vocab = shape.vocab - 3
    prompts = [[1 + (i * 997 + j) % vocab for j in range(prompt_length // 2 + 16 * (i % 4))] for i in range(batch_requests)]
    return many, prompts


def _write_runs(out: Path, checkpoint: str, rounds: int, settings: list[tuple], times: list[list[float]],
                refs: list[list[float]], offsets: list[float] | None, latencies: dict[int, list[float]],
                device: object) -> None:
    """``runs.json``: each setting's rounds, their median and spread."""
    runs = [{"run": i, "policy": name, "budget": budget, "tau": tau, "trace": f"run{i}.parquet",
             "batch_size": batch, "traffic": traffic, "host": _host_label(policy),
             **({"arrivals": offsets, "rounds_latency_p50_s": latencies[i]} if traffic == "arrivals" else {}),
             "measured_s": float(np.median(times[i])), "spread": max(times[i]) / min(times[i]) - 1,
             "rounds_s": times[i], "rounds_reference_s": refs[i], "device": str(device)}
            for i, (name, budget, tau, policy, batch, traffic) in enumerate(settings)]
    write_json(out / "runs.json", {"checkpoint": checkpoint, "rounds": rounds, "runs": runs})


def _host_label(policy: Policy) -> str:
    """A setting's host tier in words (``-``: every expert in host memory)."""
    h = policy.host
    if h is None:
        return "-"
    return f"{h.label} {int(h.budget[0])}" + (f" tau={int(h.tau[0])}" if h.label == "tide" else "")


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
        arrivals = r.get("arrivals")
        out_runs.append({"batch_size": check_batch_size(r.get("batch_size", 1), f"{wi}.batch_size"),
                         "traffic": need_str(r.get("traffic", "replay"), f"{wi}.traffic", ("replay", "own", "arrivals")),
                         "arrivals": None if arrivals is None else [need_float(v, f"{wi}.arrivals", lo=0.0)
                                                                    for v in need_list(arrivals, f"{wi}.arrivals")],
                         "rounds_latency_p50_s": [need_float(v, f"{wi}.rounds_latency_p50_s", positive=True) for v in
                                                  need_list(r.get("rounds_latency_p50_s", []), f"{wi}.rounds_latency_p50_s")],
                         "run": need_int(get(r, "run", wi), f"{wi}.run", lo=0),
                         "policy": need_str(get(r, "policy", wi), f"{wi}.policy"), "budget": opt("budget"),
                         "tau": opt("tau"), "trace": trace,
                         "measured_s": need_float(get(r, "measured_s", wi), f"{wi}.measured_s", positive=True),
                         "spread": need_float(r.get("spread", 0.0), f"{wi}.spread", lo=0.0),
                         "rounds_s": [need_float(v, f"{wi}.rounds_s", positive=True)
                                      for v in need_list(r.get("rounds_s", []), f"{wi}.rounds_s")],
                         "rounds_reference_s": [need_float(v, f"{wi}.rounds_reference_s", positive=True)
                                                for v in need_list(r.get("rounds_reference_s", []),
                                                                   f"{wi}.rounds_reference_s")],
                         "device": need_str(get(r, "device", wi), f"{wi}.device"),
                         "host": need_str(r.get("host", "-"), f"{wi}.host")})
    return out_runs


def replay(out: Path) -> pd.DataFrame:
    """The simulator half: predict every captured run on the measured profile."""
    from sim.simulate import simulate
    from traces.formats.profile_file import Profile
    from traces.formats.trace_read import read_trace
    from traces.serving.arrivals import Arrivals

    runs = read_runs(out)
    n = len(runs[0]["rounds_s"])
    paired = n > 0 and all(len(r["rounds_s"]) == n for r in runs) and all(
        (out / f"profile-round{k}.json").is_file() for k in range(n))
    # each round's runs against the profile taken just before them (the same conditions), or
    # the one profile of an older capture
    profiles = [Profile.load(out / f"profile-round{k}.json") for k in range(n)] if paired else [
        Profile.load(out / "profile.json")]
    ref_p = [p.reference_s() for p in profiles]
    rows, pred, meas, per_round = [], [], [], []
    for r in runs:
        trace = read_trace(out / r["trace"])
        if not trace.policy:
            raise TideError(f"{out / r['trace']}: records no policy (not a capture of experiments.accuracy)")
        try:
            policy = Policy.from_json(trace.policy, trace.shape.n_moe_layers, trace.shape.experts)
        except TideError as exc:
            raise TideError(f"{out / r['trace']}: recorded policy: {exc}") from None
        stream = Arrivals(offsets=tuple(r["arrivals"]), label="spread") if r["arrivals"] else None
        sims = [simulate(trace, p, policy, batch_size=r["batch_size"] if stream else None, arrivals=stream)
                for p in profiles]
        p_r = np.array([res.seconds for res in sims])
        m_r = np.array(r["rounds_s"]) if paired else np.array([r["measured_s"]])
        drift = float("nan")
        if paired and len(r["rounds_reference_s"]) == n and all(ref_p):  # the box then against now, reported only
            drift = float(np.median(np.array(ref_p) / np.array(r["rounds_reference_s"]) - 1))
        pred.append(p_r)
        meas.append(m_r)
        agree = all(sims[0].counters[k].shape == trace.counters[k].shape and (sims[0].counters[k] == trace.counters[k]).all()
                    for k in sims[0].counters)  # a stream's forwards follow its own timing: they may differ
        lat = np.nan
        if stream and r["rounds_latency_p50_s"]:  # the stream's p50 latency, predicted against measured
            pl = np.array([res.summary()["latency_s_p50"] for res in sims])
            ml = np.array(r["rounds_latency_p50_s"])
            lat = float(np.median(pl / (ml if len(ml) == len(pl) else np.median(ml)) - 1))
        rows.append({**{k: r[k] for k in ("run", "policy", "budget", "tau", "host", "batch_size", "traffic", "device")},
                     "measured_s": float(np.median(m_r)), "predicted_s": float(np.median(p_r)),
                     "error": float(np.median(p_r / m_r - 1)), "spread": r["spread"], "drift": drift,
                     "latency_p50_error": lat, "counters_agree": agree})
        for k, (pk, mk) in enumerate(zip(p_r, m_r)):
            per_round.append({"round": k, "run": r["run"], "predicted_s": float(pk), "measured_s": float(mk),
                              "error": float(pk / mk - 1)})
    df = pd.DataFrame(rows)
    # each policy's speedup over all at the same batch size and traffic, predicted against measured
    key = list(zip(df["batch_size"], df["traffic"]))
    base = {k: i for i, (k, pol, h) in enumerate(zip(key, df["policy"], df["host"])) if pol == "all" and h == "-"}
    if base:
        df["speedup_error"] = [float(np.median((pred[base[k]] / p) / (meas[base[k]] / m) - 1)) if k in base else np.nan
                               for k, p, m in zip(key, pred, meas)]
    atomic_write(out / "accuracy.parquet", lambda tmp: df.to_parquet(tmp, index=False))
    rounds = pd.DataFrame(per_round)
    atomic_write(out / "accuracy-rounds.parquet", lambda tmp: rounds.to_parquet(tmp, index=False))
    return df, rounds


def main(argv: list[str] | None = None) -> int:
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--held-out"]:
        from experiments.held_out import main as held_out
        return held_out(argv[1:], prog="python -m experiments.accuracy --held-out")
    ap = ArgumentParser(prog="python -m experiments.accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--held-out", action="store_true",
                    help="first, alone or before experiments.held_out's flags: profile once, then predict a grid of "
                         "workloads the profile never saw (see python -m experiments.held_out --help)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--out", default="out/accuracy")
    ap.add_argument("--capture-only", default=None, metavar="DIR")
    ap.add_argument("--replay-only", default=None, metavar="DIR")
    ap.add_argument("--gen-length", type=integer, default=128)
    ap.add_argument("--prompt-length", type=integer, default=64)
    ap.add_argument("--rounds", "--repeats", dest="rounds", type=integer, default=5,
                    help="rounds of profile + every setting; errors are medians over the rounds")
    ap.add_argument("--no-batches", action="store_true", help="only the batch-1 settings")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: each round's profile takes its batch terms on the small batch workload")
    ap.add_argument("--host-only", action="store_true",
                    help="only the settings with a host tier (experts read from the drive), beside all")
    ap.add_argument("--batch-requests", type=integer, default=BATCH_REQUESTS,
                    help="requests of each batched setting (a batch above them runs them all)")
    ap.add_argument("--seed", type=integer, default=PRESET_SEED, help="the preset checkpoint's seed (without --checkpoint)")
    ap.add_argument("--router-skew", type=number, default=PRESET_SKEW,
                    help="the preset checkpoint's router skew (expert_bias = S x N(0, 1); without --checkpoint)")
    ap.add_argument("--preset", default="tiny", choices=PRESETS,
                    help="checkpoint made when --checkpoint is not given (mini-moe: LLaDA2.0-mini's layers, ~7 GB)")
    a = ap.parse_args(argv)
    if a.held_out:
        raise TideError("--held-out goes first, before the held-out grid's own flags: "
                        "python -m experiments.accuracy --held-out [--skews ...]")
    if a.rounds < 1:
        raise TideError("--rounds must be at least 1")
    need_int(a.seed, "--seed", lo=0)
    need_router_skew(a.router_skew, "--router-skew")
    if a.checkpoint is not None and (a.seed, a.router_skew) != (PRESET_SEED, PRESET_SKEW):
        raise TideError("--seed and --router-skew make a preset checkpoint; with --checkpoint they do not apply")
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
        need_int(a.batch_requests, "--batch-requests", lo=1, hi=1024)
        capture(out, device, a.checkpoint, a.gen_length, a.prompt_length, a.rounds, a.preset, not a.no_batches,
                a.batch_requests, a.host_only, a.seed, a.router_skew, a.quick)
        if a.capture_only:
            print(f"captured {out}; replay anywhere with python -m experiments.accuracy --replay-only {out}")
            return 0
    df, rounds = replay(out)
    pct = lambda c: (100 * df[c]).round(1).astype(str) + "%"  # noqa: E731
    from experiments.validate import round_table
    with pd.option_context("display.width", 200):
        print(round_table(rounds, "run", {int(r): f"{r}:{p}" for r, p in zip(df["run"], df["policy"])}))
    show = df.assign(error=pct("error"), spread=pct("spread"), drift=pct("drift"),
                     latency_p50_error=df["latency_p50_error"].map(lambda v: "" if pd.isna(v) else f"{100 * v:+.1f}%"),
                     **({"speedup_error": pct("speedup_error")} if "speedup_error" in df else {}))
    with pd.option_context("display.width", 160):
        print(show.round(4).to_string(index=False))
    err = df["error"].abs()
    sp = f", speedup over all within {100 * df['speedup_error'].abs().max():.1f}%" if "speedup_error" in df else ""
    for label, part in (("batch 1", df[df["batch_size"] == 1]), ("batched", df[df["batch_size"] > 1]),
                        ("with a host tier (experts read from the drive)", df[df["host"] != "-"])):
        if len(part) and len(part) < len(df):
            print(f"{label}: median |error| {100 * part['error'].abs().median():.1f}%, "
                  f"worst {100 * part['error'].abs().max():.1f}% over {len(part)} runs")
    if df["latency_p50_error"].notna().any():
        print(f"p50 latency of the run with arrivals: {100 * df['latency_p50_error'].dropna().iloc[0]:+.1f}%")
    print(f"\nmedian |error| {100 * err.median():.1f}%, worst {100 * err.max():.1f}% over {len(df)} runs{sp}; "
          f"counters agree in {int(df['counters_agree'].sum())}/{len(df)}; box noise: runs varied by "
          f"{100 * df['spread'].median():.0f}% (median) between their fastest and slowest round")
    return 0


if __name__ == "__main__":
    run_cli(main)
