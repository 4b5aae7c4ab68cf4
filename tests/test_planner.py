"""The planner end to end on a reduced mini trace: candidate prices equal the simulator, the
plan is no worse than any uniform (tau, B) that fits, and the command's plan and errors."""
import json
import time

import numpy as np
import pytest
from conftest import assert_clean_error, run_module

from sim.candidates import Candidates, distinct_taus, price_candidates
from sim.planner import make_plan
from sim.simulate import simulate
from traces.common.errors import TideError
from traces.formats.plan_file import Plan
from traces.formats.profile_file import Profile
from traces.formats.shapes import ModelShape
from traces.formats.vocabulary import KINDS
from traces.policies.spec import Policy
from traces.workloads.synthetic import synthesize

MANY_GB = 2.5  # the two-MoE-layer mini: about 1.2 GB of non-expert weights, so some 100 experts per layer fit
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
    sim = simulate(trace, profile, Policy.from_plan(plan, shape)).seconds  # the program's prices against the event simulation
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
    assert "tau per layer" in p.stdout and "tide tau=1" in p.stdout and "tide_tau1" not in p.stdout
    plan = Plan.read(out)
    pol = Policy.from_plan(plan, trace.shape)
    assert pol.name == "plan" and len(pol.tau) == trace.shape.n_moe_layers
    d = json.loads(out.read_text())
    assert d["predicted"]["tokens"] == 2 * trace.tokens_generated
    assert len(d["provenance"]["traces"]) == 2 and len(d["provenance"]["traces"][0]["sha256"]) == 64
    assert d["provenance"]["profile"]["name"] == "a100-40gb"
    solver = d["provenance"]["solver"]
    assert 0 < solver["solve_s"] < wall and 0 < solver["build_s"] < wall  # seconds of this run, not another unit
    assert solver["binaries"] >= trace.shape.n_moe_layers  # at least one candidate per layer


def driveless(name: str) -> Profile:
    """A bundled box without its drive: what a box holds between GPU and host memory alone."""
    p = Profile.load(name)
    return Profile({k: v for k, v in p.data.items() if k != "drive"}, where=f"{p.where} without its drive")


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
    with pytest.raises(TideError, match="experts .* do not fit between the GPU's room for them .* and host memory"):
        make_plan([flash], driveless("rtx4090"), 20, progress=False)
    other = tmp_path / "o.parquet"
    synthesize(ModelShape.named("llada2-mini").replace(num_hidden_layers=5), 32, 16, seed=0).write(other)
    assert_clean_error(run_module(*base, "--trace", str(other), "--gpu-mem-gb", "3"), str(other), "a trace of")


def test_flash_plans_and_replays_on_the_h200_box():
    """LLaDA2.0-flash's experts (200 GB in bf16) exceed the h200 box's host memory (134 GB),
    but the box holds the model between its GPU and its host: the plan keeps some layers
    static (or wholly on the GPU), whose residents need no host copy, and fits both; the
    simulator replays it; baselines whose layers keep every expert on the host are left out."""
    from traces.costs.memory import MemoryBudget
    tr = synthesize(ModelShape.named("llada2-flash"), 32, 32, seed=0)
    prof = driveless("h200")  # with its drive, the planner would read some experts from there (test_drive)
    assert tr.shape.routed_expert_bytes(tr.dtype) > prof.capacity("host_mem_bytes")
    plan, frame = make_plan([tr], prof, 130, budget_step=64, progress=False)
    mem = MemoryBudget.for_traces([tr], 130e9, host_limit_bytes=prof.capacity("host_mem_bytes"))
    assert mem.need_bytes(plan.budget) <= 130e9
    assert mem.host_need_bytes(plan.kinds, plan.budget) <= prof.capacity("host_mem_bytes")
    assert plan.predicted["host_gb"] == pytest.approx(mem.host_need_bytes(plan.kinds, plan.budget) / 1e9)
    static = [i for i, (k, b) in enumerate(zip(plan.kinds, plan.budget)) if k == "static" and b < tr.shape.experts]
    assert set(plan.resident) == set(static)  # a static layer's residents are in the plan (format v3)
    res = simulate(tr, prof, Policy.from_plan(plan, tr.shape))
    assert res.seconds == pytest.approx(plan.predicted["seconds"])
    assert "cpu" not in set(frame["policy"]) and "swap" not in set(frame["policy"])
    with pytest.raises(TideError, match="does not fit in host memory"):
        simulate(tr, prof, Policy.make("tide", tr.shape.n_moe_layers, tr.shape.experts, budget=64, tau=2))


@pytest.fixture(scope="module")
def many():
    """Six requests of a reduced mini (two MoE layers) of several prompt lengths."""
    shape = ModelShape.named("llada2-mini").replace(num_hidden_layers=3)
    return synthesize(shape, 32, [24, 40, 56, 72, 32, 48], seed=4, requests=6)


def test_the_planner_chooses_the_batch_size_with_the_plan(many, tmp_path):
    """Plans at each batch size (on the batched forwards the runtime runs), each served:
    offline the most tokens/s is chosen; under a latency bound the most tokens/s that meets
    it; with an arrival rate the lowest p99 latency among the batch sizes that sustain it.
    The plan records its batch size and the frontier, and the runtime's batched pricing
    of the chosen plan equals the serving simulator's."""
    from sim.frontier import choose, plans_by_batch, serve_figures
    prof = Profile.load("a100-40gb")
    plans = plans_by_batch([many], prof, MANY_GB, [8, 1, 2, 4, 2], budget_step=32, progress=False)
    assert sorted(plans) == [1, 2, 4, 8] and all(p.batch_size == b for b, (p, _) in plans.items())
    front = choose(plans, [many], prof)
    t = front.table.set_index("batch_size")
    assert list(t.index) == [1, 2, 4, 8] and t["chosen"].sum() == 1
    assert front.plan.batch_size == t["tokens_per_s"].idxmax()
    fig = serve_figures([many], prof, front.plan, front.plan.batch_size)
    assert fig["tokens_per_s"] == pytest.approx(t.loc[front.plan.batch_size, "tokens_per_s"])
    assert [r["batch_size"] for r in front.plan.predicted["frontier"]] == [1, 2, 4, 8]
    bound = float(t["latency_p99_s"].sort_values().iloc[1]) * 1.0001  # two batch sizes meet it
    meets = t[t["latency_p99_s"] <= bound]
    assert choose(plans, [many], prof, latency_p99_s=bound).plan.batch_size == meets["tokens_per_s"].idxmax()
    with pytest.raises(TideError, match="no batch size meets it; the closest is batch"):
        choose(plans, [many], prof, latency_p99_s=float(t["latency_p99_s"].min()) / 2)
    rate = float(t["requests_per_s"].min()) / 2
    at = choose(plans, [many], prof, arrival_rate=rate, seed=3)
    assert at.table["sustains"].all() and at.plan.batch_size == at.table.set_index("batch_size")["latency_p99_s"].idxmin()
    with pytest.raises(TideError, match="cannot sustain it at any batch size"):
        choose(plans, [many], prof, arrival_rate=float(t["requests_per_s"].max()) * 3)
    path = tmp_path / "p.json"
    front.plan.write(path)
    assert Plan.read(path).batch_size == front.plan.batch_size


def test_plan_command_over_batch_sizes_and_its_bad_input(many, tmp_path):
    tr = tmp_path / "many.parquet"
    many.write(tr)
    out = tmp_path / "plan.json"
    base = ("sim.plan", "--trace", str(tr), "--profile", "a100-40gb", "--gpu-mem-gb", str(MANY_GB), "--jobs", "1",
            "--budget-step", "32")
    p = run_module(*base, "--batch-sizes", "1,4,16", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "frontier (offline" in p.stdout and "<-" in p.stdout and "run them all at once" in p.stderr
    assert json.loads(out.read_text())["version"] == 4
    for flags, fragment in ((["--batch-sizes", "0,2"], "--batch-sizes must be"), (["--batch-sizes", "2,x"], "--batch-sizes: comma"),
                            (["--arrival-rate", "-1"], "--arrival-rate must be"),
                            (["--latency-p99-s", "1", "--arrival-rate", "1"], "not both")):
        assert_clean_error(run_module(*base, *flags, "--out", str(tmp_path / "bad.json")), fragment)
        assert not (tmp_path / "bad.json").exists()
