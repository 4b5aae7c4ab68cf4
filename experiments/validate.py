"""Does the plan deliver on this box? Predicted against measured, and the tokens checked.

``python -m experiments.validate --checkpoint DIR --plan PLAN.json [--trace FILE ...]
[--device cpu|cuda] [--rounds 5] [--batch-size N] [--out FILE]``

Replays the traces the plan was made from (``--trace`` to give others; KV-cache traces:
their schedules and expert choices, so the work is the work the planner priced) through the
runtime under the plan and under the baselines the planner compared it with (``cpu``,
``static``, ``swap``, ``tide`` tau=1, with the plan's budgets), plus ``all`` (every expert on
the fast device) as the reference for the tokens when it fits. In rounds (``--rounds``), each
re-timing this box's profile next to the runs: prints every round's error (predicted over
measured seconds, minus one), then per run the medians over rounds against the plan's own
prediction and how far the box drifted since it, tokens/s and the plan's speedups; writes the table with provenance (torch
version, device, checkpoint, plan, profile and trace hashes) to ``--out`` (``.parquet`` or
``.json``), and fails with one clear line unless every run's tokens agree with the
reference as the lossless rule (:mod:`runtime.lossless`) requires: exactly when the fast
device is the CPU, differences only from a near-tie on a GPU.

Needs only ``runtime`` and ``traces``: it runs on the GPU box's own Python.
"""
from __future__ import annotations

import datetime as dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from runtime.checkpoint import dtype_name, load_model, load_on_drive
from runtime.config import ModelConfig
from runtime.decoding import Generator
from runtime.device import check_device, give_back_freed_memory, host_memory_bytes, speed_reference_s, timed
from runtime.lossless import agree
from runtime.model import LLaDA2
from runtime.offload import OffloadEngine
from runtime.profile import fits_in_memory, in_run_text, profile_box
from runtime.profile_drive import with_drive
from traces.common import checks
from traces.common.checks import resolve_batch_size
from traces.common.cli import ArgumentParser, integer, run_cli, span
from traces.common.errors import TideError
from traces.common.files import atomic_write, check_out_path, file_sha256
from traces.common.values import get, need_dict, need_float, need_list, need_str
from traces.costs.cost_model import CostModel
from traces.costs.memory import DEVICE_HEADROOM, MemoryBudget
from traces.costs.policy_run import replay_policy
from traces.formats.plan_file import Plan
from traces.formats.shapes import ModelShape
from traces.formats.trace_file import Trace
from traces.formats.trace_read import read_trace
from traces.policies.labels import baselines, display_name, kinds_label, tau_label
from traces.policies.spec import Policy
from traces.serving.admission import compose_trace


def plan_traces(plan: Plan, given: list[str] | None) -> list[tuple[str, Trace]]:
    """The traces to replay: ``--trace`` files, or those the plan names (checked by hash);
    one request per forward (a batch is composed from their requests: ``--batch-size``)."""
    out = [(p, read_trace(p)) for p in given] if given else _named_traces(plan)
    for p, t in out:
        t.require_one_request_per_forward(p)
    return out


def _named_traces(plan: Plan) -> list[tuple[str, Trace]]:
    named = need_list(plan.provenance.get("traces") or [], "--plan: provenance.traces")
    if not named:
        raise TideError("--plan: the plan names no traces; give --trace")
    out = []
    for i, t in enumerate(named):
        w = f"--plan: provenance.traces[{i}]"
        t = need_dict(t, w)
        path = Path(need_str(get(t, "name", w), f"{w}.name"))
        sha = need_str(t["sha256"], f"{w}.sha256") if t.get("sha256") is not None else None
        if not path.is_file():
            raise TideError(f"--plan: its trace {path} is not here; give --trace")
        if sha and file_sha256(path) != sha:
            raise TideError(f"--plan: {path} has changed since the plan was made (sha256 differs); give --trace")
        out.append((str(path), read_trace(path)))
    return out


def runs_to_make(plan: Plan, traces: list[Trace], shape: ModelShape, all_fits: bool,
                 batch_size: int = 1, in_memory: bool = True) -> dict[str, Policy]:
    """The plan, its baselines at the budget the planner gave them (the largest uniform one
    that fits the plan's memory limit with these traces' KV cache at ``batch_size``), and
    ``all`` when it fits. With a host tier (the plan's), the baselines also run with one: a
    cache evicting the least recently used expert in the plan's host memory (``+lru``); a
    checkpoint larger than this machine's memory (``in_memory`` false) runs those only."""
    runs: dict[str, Policy] = {}
    L, E = shape.n_moe_layers, shape.experts
    if all_fits and in_memory:
        runs["all"] = Policy.make("all", L, E)
    runs["plan"] = Policy.from_plan(plan, shape)
    if plan.gpu_mem_bytes is not None:
        b = MemoryBudget.for_traces(traces, plan.gpu_mem_bytes, batch_size).largest_uniform()
        base = baselines(L, E, b)
        if in_memory:
            runs.update(base)
        if plan.host is not None:
            mem = MemoryBudget.for_traces(traces, plan.gpu_mem_bytes, batch_size,
                                          plan.host.get("host_mem_bytes", float("inf")))
            for name, p in base.items():
                lru = mem.lru_host(p)
                if lru is not None and lru.host.budget[0] > 0:
                    runs[f"{name}+lru"] = lru
    return runs


def validate(checkpoint: str, plan: Plan, traces: list[tuple[str, Trace]], device_name: str = "cpu",
             rounds: int = 5, progress: bool = False, batch_size: int = 1) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Run every policy on every trace, in rounds; the table (medians over rounds), the
    rounds' own figures, and the lossless failures (empty: all agree).

    ``batch_size`` above 1 runs each trace's requests up to that many per forward
    (continuous batching, :mod:`traces.serving.admission`), predicted over the same composition
    (:func:`traces.serving.admission.compose_trace`), each request's tokens checked against the
    reference's at the same batch size; the plan's own prediction is for its own batch size,
    so ``planned_s`` and ``drift`` are left empty at another.

    Each round re-times this box's profile in this process, warm, next to the runs (the quick
    profiler of :mod:`runtime.profile`, on this checkpoint), then runs every policy once; the
    round's prediction of each run is the cost model's on that round's profile (the closed
    form of the simulator's task graphs, :func:`traces.costs.policy_run.replay_policy`: the same seconds).
    A run's error is predicted over measured, minus one, per round; the table keeps the median
    over rounds. The plan's own prediction, on the profile it was planned on, is ``planned_s``;
    how far the box has moved since (``drift``: planned over predicted now, minus one, and the
    speed reference then and now) is reported beside the error, never folded into it."""
    device = check_device(device_name)
    cfg = ModelConfig.load(checkpoint)
    in_memory = fits_in_memory(cfg, plan.dtype)
    if not in_memory and plan.host is None:
        raise TideError(f"--checkpoint {checkpoint}: larger than this machine's memory "
                        f"({host_memory_bytes() / 1e9:.0f} GB), and the plan keeps every expert in host memory: "
                        "plan with sim.plan --host-mem-gb (what this machine can give its experts)")
    drive = load_on_drive(checkpoint, device, plan.dtype) if plan.host is not None else None  # any host tier runs there
    model = load_model(checkpoint, device=device, dtype=plan.dtype, experts_device="cpu") if in_memory else drive[0]
    shape = model.cfg.shape
    plan.check_model(shape, "--plan")
    for name, tr in traces:
        if tr.dtype != dtype_name(model.dtype):
            raise TideError(f"--trace {name}: recorded in {tr.dtype}, the plan runs {dtype_name(model.dtype)}")
    recorded = [t for _, t in traces]
    all_fits = device.type == "cpu" or MemoryBudget.for_traces(
        recorded, torch.cuda.get_device_properties(device).total_memory * DEVICE_HEADROOM, batch_size).fits(shape.experts)
    policies = runs_to_make(plan, recorded, shape, all_fits, batch_size, in_memory)
    priced = [(tr if batch_size == 1 else compose_trace(tr, batch_size)) for tr in recorded]  # the forwards that run
    run = _Runs(model, device, traces, batch_size, drive)
    checked = {name: run(policy, True) for name, policy in policies.items()}  # tokens, and a warm-up
    rounds_df = _rounds(model, device, policies, priced, run, rounds, progress, batch_size,
                        checkpoint if drive is not None else None)
    df, failures = _table(plan, policies, checked, rounds_df, exact=device.type == "cpu", batch_size=batch_size)
    _, origin = plan_profile(plan)
    ref_then = origin.get("reference_s") if isinstance(origin.get("reference_s"), (int, float)) else None
    df["reference_drift"] = (ref_then / float(rounds_df["reference_s"].median()) - 1) if ref_then else float("nan")
    tokens = sum(t.tokens_generated for _, t in traces)
    df["predicted_tokens_per_s"] = tokens / df["predicted_s"]
    df["measured_tokens_per_s"] = tokens / df["measured_s"]
    plan_row = df.set_index("policy").loc["plan"]
    df["predicted_plan_speedup"] = df["predicted_s"] / plan_row["predicted_s"]
    df["measured_plan_speedup"] = df["measured_s"] / plan_row["measured_s"]
    return df, rounds_df, failures


class _Runs:
    """Runs a policy on every trace, each from an empty placement as the planner priced it:
    seconds, counters and each request's result."""

    def __init__(self, model: LLaDA2, device: torch.device, traces: list[tuple[str, Trace]], batch_size: int,
                 drive: tuple | None = None):
        self.model, self.device, self.traces, self.batch_size = model, device, traces, batch_size
        self.drive = drive  # (the model with its experts left on the drive, their files): host-tier policies run there

    def __call__(self, policy: Policy, check: bool) -> tuple[float, dict[str, int], list]:
        model, device, files = self.model, self.device, None
        if policy.host is not None or (self.drive is not None and self.drive[0] is model):
            model, files = self.drive
        total, counters, results = 0.0, dict.fromkeys(("gpu_tokens", "cpu_tokens", "migrations"), 0), []
        for _, tr in self.traces:
            with OffloadEngine(model, policy, device, drive=files) as engine:
                gen = Generator(model, tr.decoding, engine=engine, margins=check)
                if self.batch_size > 1:
                    res, s = timed(device, lambda: gen.replay_batch(tr, [r["request"] for r in tr.requests],
                                                                    self.batch_size))
                    total += s
                    results.extend(res)
                for r in tr.requests if self.batch_size == 1 else ():
                    res, s = timed(device, lambda: gen.replay(tr, r["request"]))
                    total += s
                    results.append(res)
            counters = {k: v + engine.totals()[k] for k, v in counters.items()}
            give_back_freed_memory()  # its stacks, out of time: the next policy's and the host stack's room
        return total, counters, results


def _rounds(model: LLaDA2, device: torch.device, policies: dict[str, Policy], priced: list[Trace], run: _Runs,
            rounds: int, progress: bool, batch_size: int, drive_checkpoint: str | None = None) -> pd.DataFrame:
    """Rounds of: this box's profile re-timed in this process (with the drive holding
    ``drive_checkpoint``, for host-tier policies), then every policy once, each priced on that
    round's profile (one row per round and policy)."""
    per_round = []
    for rnd in tqdm(range(rounds), desc="rounds of profile + every policy", unit="round", disable=not progress):
        prof = profile_box(model.cfg, device, dtype_name(model.dtype), quick=True, progress=False,
                           model=model if not any(b.on_drive for b in model.moe_blocks) else None,
                           batches=batch_size > 1)  # what a batch adds is measured where one runs
        if drive_checkpoint is not None:
            prof = with_drive(prof, drive_checkpoint, model.cfg)
        ref_now = speed_reference_s()
        for name, policy in policies.items():  # every policy once per round: a shared box's load hits all alike
            predicted = sum(replay_policy(tr, policy, cost=CostModel(prof, tr.shape, tr.dtype)).seconds()
                            for tr in priced)
            measured = run(policy, False)[0]
            per_round.append({"round": rnd, "policy": name, "predicted_s": predicted, "measured_s": measured,
                              "error": predicted / measured - 1, "reference_s": ref_now,
                              "in_run": in_run_text(prof)})
    return pd.DataFrame(per_round)


def _table(plan: Plan, policies: dict[str, Policy], checked: dict[str, tuple], rounds_df: pd.DataFrame,
           exact: bool, batch_size: int) -> tuple[pd.DataFrame, list[str]]:
    """One row per policy (medians over rounds, tokens against the reference's, counters,
    the plan's own prediction and the drift since) and the lossless failures."""
    failures, reference, rows = [], None, []
    for name, policy in policies.items():
        _, counters, results = checked[name]
        if reference is None:
            reference = results
        checks = [agree(a, b, exact) for a, b in zip(reference, results)]
        bad = [c.detail for c in checks if not c.ok]
        if bad:
            failures.append(f"{name}: {bad[0]}")
        mine = rounds_df[rounds_df["policy"] == name]
        measured = mine["measured_s"].to_numpy()
        rows.append({"policy": name, "kinds": kinds_label(policy.kinds), "budget": span(policy.budget.tolist()),
                     "tau": tau_label(policy.kinds, policy.tau),
                     "predicted_s": float(mine["predicted_s"].median()), "measured_s": float(np.median(measured)),
                     "error": float(mine["error"].median()),
                     "error_min": float(mine["error"].min()), "error_max": float(mine["error"].max()),
                     "spread": float(measured.max() / measured.min() - 1),
                     "planned_s": _predicted(plan, name) if batch_size == plan.batch_size else float("nan"),
                     "tokens_identical": all(c.identical for c in checks), "tokens_ok": not bad,
                     "note": next((c.detail for c in checks if c.detail), ""),
                     **{k: counters[k] for k in ("gpu_tokens", "cpu_tokens", "migrations")}})
    df = pd.DataFrame(rows)
    # how the box moved since the plan's profile: the plan's prices against today's, and the
    # speed reference then and now (reported beside the error, never folded into it)
    df["drift"] = df["planned_s"] / df["predicted_s"] - 1
    return df, failures


def box_check(plan: Plan, tolerance: float = 0.25) -> tuple[list[str], list[str]]:
    """Is this run on the box, and under the load, the plan's profile was measured on?

    Lines to print, and warnings: the profile's age and host against this one, the load
    average now and then, and the profile's reference figure (host memory bandwidth)
    re-measured now. A mismatch means predictions are for another box or another load.
    """
    import os
    import socket

    import torch

    from runtime.profile_tables import memory_bandwidth_gbps
    prof, origin = plan_profile(plan)
    name = prof.get("name", "?")
    lines, warn = [], []
    host = socket.gethostname()
    if not origin.get("host"):
        warn.append(f"profile {name} was not measured here (no host recorded: a bundled or derived box); "
                    "the predictions are for that box, not this one")
        return lines, warn
    age = ""
    try:
        created = dt.datetime.fromisoformat(str(origin["created"]))
        hours = (dt.datetime.now(dt.timezone.utc) - created).total_seconds() / 3600
        age = f", {hours:.1f} h ago" if hours < 48 else f", {hours / 24:.0f} days ago"
    except (KeyError, ValueError, TypeError):
        pass
    load_now = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    load_then = origin.get("load_avg_1m")
    load_then = float("nan") if load_then is None else need_float(load_then, "--plan: provenance.profile.origin.load_avg_1m")
    lines.append(f"profile {name}: measured on {origin['host']}{age} (load {load_then:.1f}); "
                 f"this run on {host} (load {load_now:.1f}, {os.cpu_count()} cores)")
    if origin["host"] != host:
        warn.append(f"the profile was measured on {origin['host']}, this run is on {host}: predictions are for another box")
    speed = origin.get("reference_s")
    if isinstance(speed, (int, float)) and speed > 0:
        from runtime.device import speed_reference_s
        lines.append(f"speed reference: {1e3 * speed:.2f} ms when profiled, {1e3 * speed_reference_s():.2f} ms now "
                     "(reported as reference_drift; errors are taken against a profile re-timed in every round)")
    ref = origin.get("host_mem_bw_gbps")
    if isinstance(ref, (int, float)) and ref > 0:
        now = memory_bandwidth_gbps(torch.device("cpu"))
        lines.append(f"reference kernel (host memory copy): {ref:.1f} GB/s in the profile, {now:.1f} GB/s now")
        if abs(now / ref - 1) > tolerance:
            warn.append(f"host memory bandwidth is {now:.1f} GB/s now against {ref:.1f} GB/s when profiled "
                        f"({100 * (now / ref - 1):+.0f}%): the box is under another load; re-profile, or expect errors")
    return lines, warn


def pct(v: pd.Series) -> pd.Series:
    """Fractions as signed percentages, for printing."""
    return v.map(lambda x: "nan" if pd.isna(x) else f"{100 * x:+.1f}%")


def round_table(rounds: pd.DataFrame, by: str = "policy", labels: dict | None = None) -> str:
    """Each round's error per run (a row per round, a column per ``by``, renamed by ``labels``):
    the spread a user should see (validate's and accuracy's tables)."""
    wide = rounds.pivot(index="round", columns=by, values="error")[rounds[by].unique()]
    return "error per round (predicted / measured - 1):\n" + wide.rename(columns=labels or {}).apply(pct).to_string()


def _predicted(plan: Plan, name: str) -> float:
    """The plan's own prediction of a run (NaN where it made none), each value checked."""
    p = plan.predicted
    if name != "plan":
        base = need_dict(p.get("baselines") or {}, "--plan: predicted.baselines")
        p = need_dict(base.get(name) or {}, f"--plan: predicted.baselines.{name}")
    v = p.get("seconds")
    return float("nan") if v is None else need_float(v, f"--plan: predicted{'' if name == 'plan' else '.baselines.' + name}.seconds", positive=True)


def plan_profile(plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    """The plan's provenance of its profile and that profile's origin (each an object, or empty)."""
    prof = need_dict(plan.provenance.get("profile") or {}, "--plan: provenance.profile")
    return prof, need_dict(prof.get("origin") or {}, "--plan: provenance.profile.origin")



def provenance(checkpoint: str, plan_path: str, plan: Plan, traces: list[tuple[str, Trace]],
               device_name: str) -> dict[str, Any]:
    import torch
    device = torch.cuda.get_device_name(torch.device(device_name)) if device_name.startswith("cuda") \
        else (platform.processor() or platform.machine())
    return {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "device": device_name, "device_name": device,
            "checkpoint": str(checkpoint), "plan": {"path": plan_path, "sha256": file_sha256(plan_path)},
            "profile": plan.provenance.get("profile"),
            "traces": [{"path": n, "sha256": file_sha256(n)} for n, _ in traces]}


def write(out: str, df: pd.DataFrame, rounds: pd.DataFrame, prov: dict[str, Any]) -> None:
    """The table (one row per run, medians over rounds) with provenance; every round's figures
    beside it (JSON: ``rounds``; Parquet: the schema metadata ``tide.validation.rounds``)."""
    if out.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.Table.from_pandas(df, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               b"tide.validation": json.dumps(prov).encode(),
                                               b"tide.validation.rounds": rounds.to_json(orient="records").encode()})
        atomic_write(out, lambda tmp: pq.write_table(table, tmp))
    else:
        text = json.dumps({"provenance": prov, "runs": df.to_dict(orient="records"),
                           "rounds": rounds.to_dict(orient="records")}, indent=1) + "\n"
        atomic_write(out, lambda tmp: tmp.write_text(text))


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.validate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--trace", action="append", default=None, help="trace(s) to replay (default: the plan's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--rounds", "--repeats", dest="rounds", type=integer, default=5,
                    help="rounds of (profile re-timed, every policy once); errors are medians over rounds")
    ap.add_argument("--out", default=None, help="write the table here (.parquet or .json)")
    ap.add_argument("--batch-size", type=checks.batch_size, default=None,
                    help="requests per forward (continuous batching; default: the plan's); above a trace's "
                         "requests runs them all")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        raise TideError(f"--rounds must be at least 1, got {a.rounds}")
    if a.out:
        check_out_path(a.out)
    plan = Plan.read(a.plan)
    traces = plan_traces(plan, a.trace)
    for name in ("plan", *baselines(1, 1, 1)):  # the plan's own predictions, checked before any work
        _predicted(plan, name)
    from runtime.config import ModelConfig
    from runtime.device import check_device
    check_device(a.device)
    plan.check_model(ModelConfig.load(a.checkpoint).shape, "--plan")
    lines, warnings = box_check(plan)
    for line in lines:
        print(line)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    batch = resolve_batch_size(a.batch_size, plan=plan.batch_size)
    most = max(len(t.requests) for _, t in traces)
    if batch > most:
        print(f"note: batch size {batch} is above the traces' requests ({most}): each runs them all at once",
              file=sys.stderr)
    df, rounds, failures = validate(a.checkpoint, plan, traces, a.device, a.rounds, progress=True, batch_size=batch)
    if a.out:
        write(a.out, df, rounds, {**provenance(a.checkpoint, a.plan, plan, traces, a.device), "box_check": lines,
                                  "warnings": warnings})
    print(round_table(rounds))
    cols = ["policy", "kinds", "budget", "tau", "predicted_s", "measured_s", "error", "planned_s", "drift",
            "predicted_tokens_per_s", "measured_tokens_per_s", "predicted_plan_speedup", "measured_plan_speedup", "tokens_ok"]
    show = df[cols].assign(error=pct(df["error"]), drift=pct(df["drift"]), policy=df["policy"].map(display_name))
    print(show.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    err = df["error"].abs()
    drift = df["drift"].abs()
    moved = "n/a (the plan priced another batch size)" if drift.isna().all() else \
        pct(df["drift"]).iloc[int(drift.fillna(-1).to_numpy().argmax())]
    print(f"median |error| {100 * err.median():.1f}%, worst {100 * err.max():.1f}% (each run's median over "
          f"{a.rounds} rounds; error = predicted / measured - 1); drift since the plan's profile "
          f"{moved} at most, speed reference "
          f"{pct(df['reference_drift']).iloc[0]}; in-run level of the round profiles: {rounds['in_run'].iloc[-1]}")
    for w in warnings:
        print(f"warning: {w}")
    if failures:
        raise TideError("the lossless rule does not hold: " + "; ".join(failures))
    print(f"tokens agree with the reference ({df['policy'].iloc[0]}) for every policy"
          + (f"; wrote {a.out}" if a.out else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
