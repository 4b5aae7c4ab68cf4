"""The serving simulator: requests arrive, queue and share forwards; offline it equals the
closed form; streams and their bad input."""
import json

import numpy as np
import pandas as pd
import pytest
from conftest import assert_clean_error, run_module

from sim.simulate import simulate
from traces.costs.cost_model import CostModel
from traces.costs.policy_run import replay_policy
from traces.formats.profile_file import Profile
from traces.formats.shapes import ModelShape
from traces.policies.spec import Policy
from traces.serving.admission import compose_trace
from traces.serving.arrivals import closed_loop, poisson
from traces.workloads.synthetic import synthesize


@pytest.fixture(scope="module")
def mini():
    shape = ModelShape.named("llada2-mini")
    return synthesize(shape, gen_length=32, prompt_length=40, seed=5, requests=6), Profile.load("h200")


def _policies(shape):
    L, E = shape.n_moe_layers, shape.experts
    return [Policy.make("all", L, E), Policy.make("tide", L, E, budget=64, tau=4), Policy.make("swap", L, E, budget=64)]


def test_offline_serving_equals_the_closed_form(mini):
    """All requests at 0, batch N: the event simulation's seconds are the closed form's over
    the composed batched forwards (one interpreter of a forward's work)."""
    trace, prof = mini
    for pol in _policies(trace.shape):
        for b in ((1, 3, 8) if pol.name == "tide" else (3,)):
            res = simulate(trace, prof, pol, batch_size=b)
            closed = replay_policy(compose_trace(trace, b), pol, cost=CostModel(prof, trace.shape, trace.dtype))
            assert res.seconds == pytest.approx(closed.seconds(), rel=1e-9), (pol.name, b)
            assert len(res.per_forward) == compose_trace(trace, b).n_batched
            assert all(np.array_equal(res.counters[k], closed.counters[k]) for k in closed.counters)
    assert simulate(trace, prof, pol).seconds == pytest.approx(simulate(trace, prof, pol, batch_size=1).seconds)


def test_batching_raises_throughput_with_every_expert_resident(mini):
    trace, prof = mini
    pol = _policies(trace.shape)[0]
    tps = [simulate(trace, prof, pol, batch_size=b).summary()["tokens_per_s"] for b in (1, 2, 6)]
    assert tps[0] < tps[1] < tps[2]
    s = simulate(trace, prof, pol, batch_size=64).summary()  # above the requests: all at once
    assert s["max_batch"] == len(trace.requests) and s["queue_s_p99"] == 0.0


def test_a_stream_queues_and_reports_latencies(mini):
    trace, prof = mini
    pol = _policies(trace.shape)[1]
    alone = simulate(trace, prof, pol, batch_size=1).requests.set_index("request")
    sparse = simulate(trace, prof, pol, batch_size=4, arrivals=poisson(1e-3, len(trace.requests), seed=2))
    rq = sparse.requests
    assert (sparse.per_forward["members"] == 1).all()  # far apart: each request runs alone, on arrival
    assert (rq["queue_s"].abs() < 1e-9).all() and (rq["start_s"] >= rq["arrival_s"]).all()
    # a request alone costs what it costs at batch 1 give or take the placement it inherits
    assert np.allclose(rq.set_index("request")["latency_s"], alone["end_s"] - alone["start_s"], rtol=0.25)
    busy = simulate(trace, prof, pol, batch_size=2, arrivals=poisson(50.0, len(trace.requests), seed=2))
    s = busy.summary()
    assert s["queue_s_p99"] > 0 and s["max_batch"] == 2
    assert s["latency_s_p50"] <= s["latency_s_p90"] <= s["latency_s_p99"]
    assert (busy.requests["first_block_s"] <= busy.requests["latency_s"]).all()
    assert 0 < s["gpu_busy_fraction"] <= 1
    again = simulate(trace, prof, pol, batch_size=2, arrivals=poisson(50.0, len(trace.requests), seed=2))
    assert again.summary()["latency_s_p99"] == s["latency_s_p99"]  # seeded: deterministic


def test_a_closed_loop_keeps_its_clients_in_flight(mini):
    trace, prof = mini
    res = simulate(trace, prof, _policies(trace.shape)[0], batch_size=8, arrivals=closed_loop(2))
    assert res.per_forward["members"].max() == 2
    assert len(res.requests) == len(trace.requests)
    # a client's next request arrives when its previous one ends
    ends = sorted(res.requests["end_s"])[:len(trace.requests) - 2]
    assert sorted(res.requests["arrival_s"])[2:] == pytest.approx(ends)


def test_serving_on_the_command_line(tmp_path, mini):
    trace, _ = mini
    t = trace.write(tmp_path / "t.parquet")
    arrivals = tmp_path / "arrivals.txt"
    arrivals.write_text("# offsets from a log\n0\n0.5\n0.5\n1.25\n3\n4\n9\n")
    out = tmp_path / "r.parquet"
    p = run_module("sim.replay", "--trace", str(t), "--profile", "h200", "--policy", "tide", "--gpu-experts", "64",
                   "--tau", "4", "--batch-size", "4", "--arrivals", str(arrivals), "--requests-out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["requests"] == 6 and s["batch_size"] == 4 and "latency_s_p99" in s and "steady_tokens_per_s" in s
    rq = pd.read_parquet(out)
    assert len(rq) == 6 and list(rq["arrival_s"]) == [0, 0.5, 0.5, 1.25, 3, 4]
    text = run_module("sim.replay", "--trace", str(t), "--profile", "h200", "--policy", "all", "--batch-size", "3",
                      "--arrival-rate", "0.5", "--seed", "1")
    assert text.returncode == 0 and "latency p50" in text.stdout


@pytest.mark.parametrize("flags,fragment", [
    (["--arrival-rate", "0"], "--arrival-rate must be a finite number"),
    (["--arrival-rate", "-1"], "--arrival-rate must be a finite number"),
    (["--arrival-rate", "nan"], "--arrival-rate"),
    (["--arrival-rate", "inf"], "--arrival-rate"),
    (["--clients", "0"], "--clients must be an integer of at least 1"),
    (["--clients", "-3"], "--clients"),
    (["--batch-size", "0"], "--batch-size"),
    (["--clients", "2", "--arrival-rate", "1"], "at most one of"),
    (["--arrivals", "ARR:bad"], "is not a number"),
    (["--arrivals", "ARR:unsorted"], "must be sorted"),
    (["--arrivals", "ARR:negative"], "at least 0"),
    (["--arrivals", "ARR:short"], "2 arrival offsets for 6 requests"),
    (["--arrivals", "ARR:missing"], "file not found"),
])
def test_bad_streams_are_refused(tmp_path, mini, flags, fragment):
    trace, _ = mini
    t = trace.write(tmp_path / "t.parquet")
    files = {"bad": "0\nsoon\n", "unsorted": "0\n2\n1\n3\n4\n5\n", "negative": "-1\n0\n1\n2\n3\n4\n", "short": "0\n1\n"}
    if flags[-1].startswith("ARR:"):
        kind = flags[-1][4:]
        path = tmp_path / f"{kind}.txt"
        if kind in files:
            path.write_text(files[kind])
        flags = [*flags[:-1], str(path)]
    out = tmp_path / "r.parquet"
    assert_clean_error(run_module("sim.replay", "--trace", str(t), "--profile", "h200", "--policy", "all",
                                  "--requests-out", str(out), *flags), fragment)
    assert not out.exists()


def test_the_runtime_holds_each_request_until_its_arrival(tiny_ckpt, tmp_path):
    """runtime.generate --arrivals: a request starts no earlier than its offset, and a late one
    runs alone once the others have left; the tokens are those of the offline batch."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_ids": list(range(1 + i, 30 + i))}) for i in range(3)) + "\n")
    arrivals = tmp_path / "a.txt"
    arrivals.write_text("0\n0\n1.5\n")
    base = ["runtime.generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(prompts), "--gen-length", "32",
            "--threshold", "0.5", "--batch-size", "2", "--json"]
    p = run_module(*base, "--arrivals", str(arrivals))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    late = out["requests"][2]
    assert late["arrival_s"] == 1.5 and late["start_s"] >= 1.5
    assert late["latency_s"] == pytest.approx(late["end_s"] - 1.5)
    offline = json.loads(run_module(*base).stdout)
    assert [r["tokens"] for r in out["requests"]] == [r["tokens"] for r in offline["requests"]]
    arrivals.write_text("0\n")
    assert_clean_error(run_module(*base, "--arrivals", str(arrivals)), "1 arrival offsets for 3 requests")


def test_synth_draws_each_requests_lengths(tmp_path):
    from traces.formats.trace_read import read_trace
    out = tmp_path / "w.parquet"
    p = run_module("traces.synth", "--model", "llada2-mini", "--requests", "5", "--gen-length", "32,64",
                   "--prompt-length", "10:70", "--seed", "3", "--out", str(out))
    assert p.returncode == 0, p.stderr
    t = read_trace(out)
    gens = [r["gen_length"] for r in t.requests]
    prompts = [r["prompt_length"] for r in t.requests]
    assert set(gens) <= {32, 64} and all(10 <= q <= 70 for q in prompts) and len(set(prompts)) > 1
    for bad, frag in (("64:32", "runs backwards"), ("a,b", "expected an integer"), ("0", "--gen-length")):
        assert_clean_error(run_module("traces.synth", "--model", "llada2-mini", "--gen-length", bad,
                                      "--out", str(tmp_path / "x.parquet")), frag)


def test_prices_past_the_profiles_range_are_named(mini):
    trace, prof = mini
    cm = CostModel(prof, trace.shape, trace.dtype)
    assert cm.extrapolated(10, 64, 128) == []
    said = cm.extrapolated(5000, 64, 128)
    assert len(said) == 2 and all("measured up to 1024" in s for s in said)  # the fast device and the CPU
    res = simulate(trace, prof, _policies(trace.shape)[0], batch_size=6)
    assert res.summary()["extrapolated"] == cm.extrapolated(*[float(v) for v in (
        max(int(c.max()) for c in compose_trace(trace, 6).forward_counts()),
        compose_trace(trace, 6).forwards.groupby("forward")["tokens_run"].sum().max(),
        trace.forwards["context"].max())])


def test_offline_ends_in_closed_form_are_the_event_simulations(mini):
    """A request's end offline, from the forwards' priced seconds, is the serving
    simulator's: at batch 1 and composed at batch 3."""
    from sim.serve import offline_ends
    trace, prof = mini
    cost = CostModel(prof, trace.shape, trace.dtype)
    pol = _policies(trace.shape)[1]
    for b in (1, 3):
        res = simulate(trace, prof, pol, batch_size=b)
        closed = replay_policy(compose_trace(trace, b), pol, cost=cost)
        ends = offline_ends(compose_trace(trace, b), closed.times["layer_s"].sum(axis=1) + closed.times["fixed_s"])
        assert np.allclose(ends, res.requests.sort_values("request")["end_s"].to_numpy(), rtol=1e-9), b
