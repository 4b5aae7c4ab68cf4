import copy

import numpy as np
import pytest

from traces.common.errors import TideError
from traces.costs.cost_model import CostModel
from traces.costs.policy_run import replay_policy
from traces.formats.profile_file import Profile
from traces.formats.shapes import ModelShape
from traces.policies.counters import forward_counters
from traces.policies.runner import PolicyRunner
from traces.policies.spec import Policy
from traces.workloads.synthetic import synthesize


@pytest.fixture(scope="module")
def mini_trace():
    return synthesize(ModelShape.named("llada2-mini").replace(num_hidden_layers=4), 128, 64, seed=1)


def _one_forward(policy_name, budget, counts):
    L, E = counts.shape
    r = PolicyRunner(Policy.make(policy_name, L, E, budget=budget, tau=1), E)
    d = r.step(counts, "prefill", 0)
    return d, forward_counters(d, counts, 6291456, 2 * 2048 * 2)


def test_more_misses_cost_more_cpu_time():
    cm = CostModel(Profile.load("h200"), ModelShape.named("llada2-mini"))
    rng = np.random.default_rng(0)
    counts = rng.multinomial(256, np.ones(256) / 256, size=19)
    times = []
    for b in (0, 64, 128, 256):
        d, c = _one_forward("static", b, counts)
        times.append(cm.layer_costs(cm.layer_parts(d, counts, c, 32, 96))["cpu_s"].sum())
    assert times[0] > times[1] > times[2] > times[3] == 0


def test_copies_cost_bytes_over_bandwidth():
    p = Profile.load("h200")
    cm = CostModel(p, ModelShape.named("llada2-mini"))
    assert cm.copies_s(np.array([10]))[0] == pytest.approx(10 * 6291456 / 51.99e9)
    assert cm.copies_s(np.array([0]))[0] == 0


def test_bound_overlaps_on_a_gpu_and_adds_up_when_the_fast_device_is_the_cpu():
    p = Profile.load("h200")
    cm = CostModel(p, ModelShape.named("llada2-mini"))
    costs = {k: np.array([v]) for k, v in dict(gpu_s=1.0, cpu_s=2.0, h2d_s=0.5, d2h_s=0.25, copy_s=0.4, host_s=0.0).items()}
    assert cm.layer_bound(costs)[0] == pytest.approx(0.25 + 2.0 + 0.1)  # the CPU path dominates
    assert cm.layer_bound(costs, serial_copies=True)[0] == pytest.approx(2.35)
    data = copy.deepcopy(p.data)
    data["fast_device"] = "cpu"
    cm_cpu = CostModel(Profile(data), ModelShape.named("llada2-mini"))
    assert cm_cpu.layer_bound(costs)[0] == pytest.approx(3.75)


def test_replay_prices_every_forward(mini_trace):
    p = Profile.load("h200")
    cm = CostModel(p, mini_trace.shape)
    L, E = mini_trace.shape.n_moe_layers, mini_trace.shape.experts
    t_all = replay_policy(mini_trace, Policy.make("all", L, E), cost=cm).bound_seconds()
    t_cpu = replay_policy(mini_trace, Policy.make("cpu", L, E), cost=cm).bound_seconds()
    t_tide = replay_policy(mini_trace, Policy.make("tide", L, E, budget=64, tau=4), cost=cm).bound_seconds()
    assert t_all < t_tide < t_cpu


def test_a_profile_without_the_model_and_experts_that_do_not_fit():
    small = ModelShape.named("llada2-mini").replace(hidden_size=64, moe_intermediate_size=32)
    with pytest.raises(TideError, match="no cpu_expert_ffn entry for expert shape 64x32"):
        CostModel(Profile.load("h200"), small)


def test_swaps_decision_grows_with_its_waves_and_older_profiles_price_it_flat():
    prof = Profile.load("h200")
    cm = CostModel(prof, ModelShape.named("llada2-mini"))
    counts = np.zeros((19, 256), dtype=np.int64)
    counts[:, :8] = 4  # eight experts chosen in every layer
    for b, waves in ((8, 1), (2, 4)):
        d, c = _one_forward("swap", b, counts)
        decide = cm.layer_parts(d, counts, c, 32, 96)["decide"]
        assert decide == pytest.approx(prof.host("swap_s") + waves * prof.host("swap_wave_s"))
    older = copy.deepcopy(prof.data)
    del older["host"]["swap_wave_s"]  # measured before the per-wave cost: swap_s is the whole decision
    assert Profile(older).host("swap_wave_s") == 0.0


def test_a_grouped_call_pays_for_its_idle_stack_entries():
    """A grouped kernel walks the whole slot stack: with ``group_s`` measured, each stack entry
    without tokens adds it to the call (hits on the budget's slots; on a CPU fast device,
    misses on the host stack of every expert); profiles without it price as before."""
    p = Profile.load("h200")
    shape = ModelShape.named("llada2-mini")
    key = shape.expert_shape_key
    data = copy.deepcopy(p.data)
    data["gpu_experts"][key]["bfloat16"]["group_s"] = 1e-6
    with_group = CostModel(Profile(data), shape)
    plain = CostModel(p, shape)
    e, t = np.array([4.0]), np.array([16.0])
    assert with_group.grouped_s(e, t, 64)[0] == pytest.approx(plain.grouped_s(e, t)[0] + 60e-6)
    assert with_group.grouped_s(np.array([0.0]), np.array([0.0]), 64)[0] == 0  # no call, no cost
    assert plain.grouped_s(e, t, 64)[0] == plain.grouped_s(e, t)[0]
    counts = np.random.default_rng(0).multinomial(256, np.ones(256) / 256, size=19)
    d, c = _one_forward("static", 128, counts)
    diff = with_group.layer_parts(d, counts, c, 32, 96)["hits_ready"] - plain.layer_parts(d, counts, c, 32, 96)["hits_ready"]
    ready = (counts > 0) & d.resident
    assert diff == pytest.approx(1e-6 * (128 - ready.sum(axis=1)))
    data["gpu_experts"][key]["bfloat16"]["group_s"] = -1.0
    with pytest.raises(TideError, match="group_s"):
        Profile(data)


def test_a_row_exact_batch_prices_its_waved_expert_calls():
    """fp32 with the CPU as the fast device computes each request's rows of an expert in a
    call of its own, in waves: each further (request, expert) call and each wave of a call
    run in waves costs the profile's batch_segment_s / batch_wave_s on top of its table price, on
    the hits' side and the misses' side apart; a batch where no expert holds two requests'
    rows runs one call, as batch 1 does (no waves)."""
    from traces.policies.decision import Decision
    data = copy.deepcopy(Profile.load("h200").data)
    data["fast_device"] = "cpu"
    for table in ("gpu_experts", "cpu_expert_ffn"):  # the reference mode is fp32: the bf16 tables stand in
        for entry in data[table].values():
            entry["float32"] = entry["bfloat16"]
    shape = ModelShape.named("llada2-mini")
    L, E = shape.n_moe_layers, shape.experts
    counts = np.zeros((L, E), np.int64)
    counts[:, :4] = 6  # experts 0-3: 3 tokens from each of two requests ...
    counts[:, 4] = 2  # ... expert 4: one request only
    segments = (counts > 0).astype(np.int64) * 2
    segments[:, 4] = 1
    resident = np.zeros((L, E), bool)
    resident[:, [0, 1]] = True  # hits 0, 1; misses 2, 3, 4
    dec = Decision(resident=resident, setup_table=np.zeros((0, 4), np.int64), copy_table=np.zeros((0, 4), np.int64))
    zero = {k: np.zeros(L, np.int64) for k in ("migrations", "setup_migrations", "bytes_act")}

    def priced(seg_s, calls_s, segs):
        d = copy.deepcopy(data)
        d["host"]["batch_segment_s"] = {"value": seg_s, "source": "measured"}
        d["host"]["batch_wave_s"] = {"value": calls_s, "source": "measured"}
        cm = CostModel(Profile(d), shape, dtype="float32")
        assert cm.row_exact
        return cm.layer_parts(dec, counts, zero, np.array([8, 8]), np.array([40, 60]), segs)
    base, more = priced(0.0, 0.0, segments), priced(1e-3, 1e-2, segments)
    np.testing.assert_allclose(more["hits_ready"] - base["hits_ready"], 2 * 1e-3 + 2 * 1e-2)  # 2 further calls, 2 waves
    np.testing.assert_allclose(more["cpu"] - base["cpu"], 2 * 1e-3 + 2 * 1e-2)  # experts 2, 3 twice, 4 once: 2 waves
    three = segments.copy()
    three[:, 2] = 3  # a third request on expert 2: the misses' call runs in three waves
    np.testing.assert_allclose(priced(0.0, 1e-2, three)["cpu"] - priced(0.0, 0.0, three)["cpu"], 3 * 1e-2)
    alone = segments.copy()
    alone[:, :4] = 1  # no expert shared: one call each side, no waves
    np.testing.assert_allclose(priced(1e-3, 1e-2, alone)["cpu"], priced(0.0, 0.0, alone)["cpu"])
    # a signed saving fitted on one workload, on a batch with more further calls than it saw:
    # the further calls cost at least nothing, never less (a held-out tiny grid once priced
    # a hits task at -3.9 ms and the simulator refused the run)
    saving = -float(np.max(base["hits_ready"] + base["cpu"]))  # past what the further calls cost
    low = priced(saving, 0.0, segments)
    assert (low["hits_ready"] >= 0).all() and (low["cpu"] >= 0).all()
    np.testing.assert_allclose(low["hits_ready"], priced(0.0, 0.0, alone)["hits_ready"])  # the first calls' price


def test_the_fit_of_a_batchs_expert_calls_over_its_runs():
    from runtime.calibrate import _fit_signed_and_positive as fit
    assert fit([(10.0, 2.0, 10 * 0.5 + 2 * 3.0), (10.0, 4.0, 10 * 0.5 + 4 * 3.0)]) == pytest.approx((0.5, 3.0))
    a, b = fit([(10.0, 2.0, 6.0), (10.0, 4.0, 4.0)])  # exact solution has b < 0: a alone
    assert b == 0.0 and a == pytest.approx(0.5)
    a, b = fit([(10.0, 2.0, -10 * 0.2 + 2 * 1.0), (10.0, 4.0, -10 * 0.2 + 4 * 1.0)])
    assert (a, b) == pytest.approx((-0.2, 1.0))  # a further call may cost less than its table says
    # four runs (two policies, two batch sizes), one off by noise: the least-squares fit
    rows = [(x, y, 0.5 * x + 3.0 * y) for x, y in ((10.0, 2.0), (30.0, 8.0), (14.0, 4.0), (40.0, 16.0))]
    rows[0] = (10.0, 2.0, rows[0][2] + 0.1)
    a, b = fit(rows)
    assert a == pytest.approx(0.5, abs=0.02) and b == pytest.approx(3.0, abs=0.05)
    assert fit([(1.0, 2.0, 3.0), (2.0, 4.0, 6.0)])[1] == 0.0  # rows that do not tell them apart
