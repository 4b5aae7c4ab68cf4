"""The planner end to end on a reduced mini trace: candidate prices equal the simulator, the
plan is no worse than any uniform (tau, B) that fits, and the command's plan and errors."""
import json
import time

import numpy as np
import pytest

from conftest import assert_clean_error, run_module
from sim.candidates import Candidates, distinct_taus, price_candidates
from sim.planner import make_plan
from sim.replay import simulate
from traces.errors import TideError
from traces.plan import Plan
from traces.policies import KINDS, Policy
from traces.profile import Profile
from traces.shapes import ModelShape
from traces.synth import synthesize

MEM_GB = 3.3  # the reduced mini: 1.3 GB of non-expert weights, 768 experts of 6.3 MB: about half fit


@pytest.fixture(scope="module")
def trace():
    return synthesize(ModelShape.named("llada2-mini").replace(num_hidden_layers=4), 96, 48, seed=2)


@pytest.fixture(scope="module")
def profile():
    return Profile.load("a100-40gb")


def test_candidate_prices_add_up_to_the_simulated_time(trace, profile):
    """Any mix of kinds, priced from the table, is what the event simulator gives for that
    plan, on every profile the one replay was priced for (GPU box and CPU fast device)."""
    cands = Candidates.grid([1, 3, 6], [0, 16, 96, 256])
    shares = json.loads(json.dumps(profile.data))
    shares["fast_device"] = "cpu"  # one lane, misses priced by the grouped table
    boxes = [profile, Profile.load("h200"), Profile(shares)]
    priced = price_candidates(trace, boxes, cands)
    L, E = trace.shape.n_moe_layers, trace.shape.experts
    rng = np.random.default_rng(0)
    picks = [rng.integers(0, len(cands), L) for _ in range(3)]
    picks.append(np.array([cands.find("swap", 16)] * L))  # swap with many waves
    for pick in picks:
        pol = Policy.make("plan", L, E, budget=cands.budget[pick], tau=cands.tau[pick],
                          kind=[KINDS[k] for k in cands.kind[pick]])
        for p, box in enumerate(boxes):
            predicted = priced.seconds[p, np.arange(L), pick].sum() + priced.fixed_s[p]
            assert predicted == pytest.approx(simulate(trace, box, pol).seconds, rel=1e-9)
    uniform = Policy.make("tide", L, E, budget=96, tau=3)  # a uniform setting's counters are column sums
    got = simulate(trace, profile, uniform).totals()
    c = cands.find("tide", 96, 3)
    assert {k: int(v[:, c].sum()) for k, v in priced.counters.items()} == got


def test_taus_that_refresh_at_the_same_steps_are_priced_once(trace):
    longest = int(trace.forwards["step"].max())
    taus = distinct_taus([trace], range(1, 33))
    assert taus == list(range(1, longest + 2))  # past the longest block, only each block's first step refreshes


def test_plan_is_no_worse_than_any_uniform_grid_point_in_simulation(trace, profile):
    plan, frame = make_plan([trace], profile, MEM_GB, budget_step=32, jobs=1, progress=False)
    uniform, _ = make_plan([trace], profile, MEM_GB, uniform=True, budget_step=32, jobs=1, progress=False)
    shape, L, E = trace.shape, trace.shape.n_moe_layers, trace.shape.experts
    limit = MEM_GB * 1e9
    fixed = shape.non_expert_bytes(trace.dtype) + int(trace.forwards["context"].max()) * shape.kv_bytes_per_token(trace.dtype)
    assert fixed + sum(plan.budget) * shape.expert_bytes(trace.dtype) <= limit
    grid = []
    for b in plan.provenance["candidates"]["budgets"]:
        if fixed + L * b * shape.expert_bytes(trace.dtype) > limit:
            continue
        for tau in plan.provenance["candidates"]["taus"]:
            grid.append(simulate(trace, profile, Policy.make("plan", L, E, budget=b, tau=tau)).seconds)
        if b:
            grid += [simulate(trace, profile, Policy.make(k, L, E, budget=b)).seconds for k in ("static", "swap")]
    best = min(grid)
    assert uniform.predicted["seconds"] <= best * 1.01
    assert plan.predicted["seconds"] <= best * 1.01
    assert plan.predicted["seconds"] <= uniform.predicted["seconds"] * 1.01
    sim = simulate(trace, profile, plan.policy(shape)).seconds  # the program's prices against the event simulation
    assert plan.predicted["program_seconds"] == pytest.approx(sim, rel=1e-9)
    assert set(frame["policy"]) == {"plan", "uniform best", "cpu", "static", "swap", "tide_tau1"}
    assert (frame["seconds"] >= plan.predicted["seconds"] * 0.999).all()  # nothing compared beats the plan
    assert plan.predicted["speedup"]["cpu"] > 1


def test_command_writes_a_plan_the_runtime_reads(tmp_path, trace):
    tr = tmp_path / "t.parquet"
    trace.write(tr)
    out = tmp_path / "plan.json"
    t0 = time.perf_counter()
    p = run_module("sim.plan", "--trace", str(tr), "--trace", str(tr), "--profile", "a100-40gb", "--gpu-mem-gb",
                   str(MEM_GB), "--budget-step", "64", "--jobs", "2", "--out", str(out), real=True)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr
    assert "tau per layer" in p.stdout and "tide_tau1" in p.stdout
    plan = Plan.read(out)
    pol = plan.policy(trace.shape)
    assert pol.name == "plan" and len(pol.tau) == trace.shape.n_moe_layers
    d = json.loads(out.read_text())
    assert d["predicted"]["tokens"] == 2 * trace.tokens_generated
    assert len(d["provenance"]["traces"]) == 2 and len(d["provenance"]["traces"][0]["sha256"]) == 64
    assert d["provenance"]["profile"]["name"] == "a100-40gb"
    solver = d["provenance"]["solver"]
    assert 0 < solver["solve_s"] < wall and 0 < solver["build_s"] < wall  # seconds of this run, not another unit
    assert solver["binaries"] >= trace.shape.n_moe_layers  # at least one candidate per layer


def test_bad_input_fails_cleanly(tmp_path, trace):
    tr = tmp_path / "t.parquet"
    trace.write(tr)
    out = tmp_path / "plan.json"
    base = ["sim.plan", "--trace", str(tr), "--profile", "a100-40gb", "--out", str(out)]
    assert_clean_error(run_module(*base, "--gpu-mem-gb", "1.0"), "--gpu-mem-gb 1", "one expert per layer")
    assert_clean_error(run_module(*base, "--gpu-mem-gb", "80"), "--gpu-mem-gb 80", "more than")
    assert_clean_error(run_module(*base, "--gpu-mem-gb", "3", "--budget-step", "0"), "--budget-step")
    assert_clean_error(run_module(*base, "--gpu-mem-gb", "3", "--kinds", "tide,lru"), "--kinds", "lru")
    assert_clean_error(run_module(*base, "--gpu-mem-gb", "3", "--layer-kinds", "tide,swap"), "--layer-kinds",
                       "one kind for each of the 3 MoE layers")
    assert_clean_error(run_module(*base, "--gpu-mem-gb", "3", "--layer-kinds", "tide,swap,cpu", "--uniform"),
                       "--layer-kinds", "neither --uniform")
    assert not out.exists()
    flash = synthesize(ModelShape.named("llada2-flash"), 32, 16, seed=0)
    with pytest.raises(TideError, match="do not fit in h200's host memory"):
        make_plan([flash], Profile.load("h200"), 100, progress=False)
    other = tmp_path / "o.parquet"
    synthesize(ModelShape.named("llada2-mini").replace(num_hidden_layers=5), 32, 16, seed=0).write(other)
    assert_clean_error(run_module(*base, "--trace", str(other), "--gpu-mem-gb", "3"), str(other), "a trace of")
