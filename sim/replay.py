"""Replaying a trace on a simulated box under a placement policy.

``python -m sim.replay --trace FILE --profile FILE|NAME --policy P [--tau T]
[--gpu-experts B | --gpu-mem-gb G] [--plan FILE] [--popularity TRACE] [--timeline FILE]
[--batch-size N] [--arrival-rate R --seed S | --clients N | --arrivals FILE]
[--requests-out FILE] --json``

prints one JSON object: ``seconds``, ``tokens_per_s``, ``requests_per_s`` (and in steady
state, the first and last batches left out), latency percentiles (end to end, to the first
committed block, queueing), the batch size per forward (mean, max), the contract's
counters, ``gpu_busy_s``, ``cpu_busy_s``, ``pcie_busy_s`` (both copy engines) and each
lane's busy fraction, events and the simulator's own wall time. Without ``--batch-size``
and a stream it replays the forwards the trace recorded, every request there at 0 (today's
numbers for a batch-1 trace); :mod:`sim.serve` runs the stream. ``--timeline`` writes every resource use as a Parquet table;
:func:`sim.gantt.plot_forward` draws one forward from it.

In Python, :func:`sim.simulate.simulate` returns a :class:`SimResult` whose ``summary()`` is that
object and whose DataFrames hold the per-forward times and the per-layer counters.
"""
from __future__ import annotations

import sys

from sim.simulate import simulate
from traces.common import checks
from traces.common.checks import resolve_batch_size
from traces.common.cli import ArgumentParser, integer, number, print_json, run_cli
from traces.common.errors import TideError
from traces.common.files import atomic_write, check_out_path
from traces.costs.memory import kv_tokens
from traces.formats.profile_file import BUNDLED, Profile
from traces.formats.trace_read import load_popularity, read_trace
from traces.serving.arrivals import closed_loop, poisson, read_arrivals
from traces.settings import add_host_flags, parse_budget, resolve_policy


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m sim.replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--profile", required=True, help=f"a bundled profile name ({', '.join(BUNDLED)}) or a JSON file")
    ap.add_argument("--policy", required=True, help="all, cpu, static, swap, tide or plan")
    ap.add_argument("--tau", type=integer, default=None)
    ap.add_argument("--gpu-experts", default=None, help="expert slots per MoE layer (one number or one per layer)")
    ap.add_argument("--gpu-mem-gb", type=number, default=None)
    ap.add_argument("--plan", default=None)
    add_host_flags(ap)
    ap.add_argument("--popularity", default=None, help="trace whose total counts fill the slots at setup")
    ap.add_argument("--cpu-dtype", default=None, help="weight dtype of CPU experts (default: the trace's)")
    ap.add_argument("--timeline", default=None, help="write every resource use here (Parquet)")
    ap.add_argument("--batch-size", type=checks.batch_size, default=None,
                    help="requests per forward, composed from the trace's requests (default: the forwards it recorded)")
    ap.add_argument("--arrival-rate", type=checks.rate, default=None, help="Poisson arrivals, requests per second")
    ap.add_argument("--seed", type=checks.seed, default=0, help="seed of --arrival-rate's stream")
    ap.add_argument("--clients", type=checks.clients, default=None, help="a closed loop of this many clients")
    ap.add_argument("--arrivals", default=None, help="file of arrival offsets in seconds, one per line")
    ap.add_argument("--requests-out", default=None, help="write one row per request here (Parquet)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    for flag in ("timeline", "requests_out"):
        if getattr(a, flag) is not None:
            check_out_path(getattr(a, flag), f"--{flag.replace('_', '-')}")
    streams = [f for f in ("arrival_rate", "clients", "arrivals") if getattr(a, f) is not None]
    if len(streams) > 1:
        raise TideError("give at most one of --arrival-rate, --clients, --arrivals")
    trace = read_trace(a.trace)
    n = len(trace.requests)
    arrivals = (poisson(a.arrival_rate, n, a.seed) if a.arrival_rate is not None else closed_loop(a.clients)
                if a.clients is not None else read_arrivals(a.arrivals, n) if a.arrivals is not None else None)
    profile = Profile.load(a.profile)
    batch_size = resolve_batch_size(a.batch_size, trace=trace.batch_size)
    policy = resolve_policy(a.policy, trace.shape, trace.dtype, tau=a.tau, gpu_experts=parse_budget(a.gpu_experts),
                            gpu_mem_gb=a.gpu_mem_gb, plan=a.plan, kv_tokens=kv_tokens([trace], batch_size),
                            mem_limit_bytes=profile.capacity("gpu_mem_bytes"), host_mem_gb=a.host_mem_gb,
                            host_policy=a.host_policy, host_tau=a.host_tau,
                            host_bytes=profile.capacity("host_mem_bytes"))
    pop = load_popularity(a.popularity, trace.shape) if a.popularity else None
    res = simulate(trace, profile, policy, pop, timeline=a.timeline is not None, cpu_dtype=a.cpu_dtype,
                   batch_size=a.batch_size, arrivals=arrivals)
    if a.timeline is not None:
        atomic_write(a.timeline, lambda tmp: res.timeline.to_parquet(tmp, index=False))
    if a.requests_out is not None:
        atomic_write(a.requests_out, lambda tmp: res.requests.to_parquet(tmp, index=False))
    s = res.summary()
    if a.json:
        print_json(s)
    else:
        print(f"{trace.shape.name} on {profile.name}, {s['policy']['name']}: {s['seconds']:.3f} s, "
              f"{s['tokens_per_s']:.1f} tokens/s; GPU busy {s['gpu_busy_s']:.3f} s, CPU {s['cpu_busy_s']:.3f} s, "
              f"PCIe {s['pcie_busy_s']:.3f} s; {s['events']} events in {s['sim_wall_s']:.2f} s")
        if s["drive_reads"] or s["drive_fills"]:
            print(f"drive: {s['drive_reads']} experts read on the forwards' path, {s['drive_fills']} filled after "
                  f"their layers ({s['drive_gb_per_forward']:.2f} GB per forward), drive busy {s['drive_busy_s']:.3f} s")
        print(f"{s['requests']} requests ({s['arrivals']}, batch {s['batch_size'] or 'as recorded'}, "
              f"mean {s['mean_batch']:.1f} per forward): {s['requests_per_s']:.3f} requests/s; latency p50 "
              f"{s['latency_s_p50']:.2f} s, p99 {s['latency_s_p99']:.2f} s; first block p50 {s['first_block_s_p50']:.2f} s; "
              f"queueing p50 {s['queue_s_p50']:.2f} s")
    if s["extrapolated"]:
        print(f"note: priced past {profile.name}'s measured range (its tables' last slope extended): "
              + "; ".join(s["extrapolated"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
