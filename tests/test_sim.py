"""The simulator: agreement with the runtime, overlap semantics, outputs, errors."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_clean_error, run_module

from runtime.capture import TraceRecorder
from runtime.checkpoint import load_model
from runtime.decoding import Generator
from runtime.offload import OffloadEngine
from sim.simulate import simulate
from traces.costs.cost_model import CostModel
from traces.costs.policy_run import replay_policy
from traces.formats.profile_file import Profile
from traces.formats.shapes import ModelShape
from traces.formats.trace_file import Decoding
from traces.formats.trace_read import read_trace
from traces.policies.spec import Policy
from traces.workloads.synthetic import synthesize

CASES = [("all", None, None), ("cpu", None, None), ("static", 4, None), ("swap", 2, None), ("swap", 8, None),
         ("tide", 0, 1), ("tide", 1, 2), ("tide", 8, 3), ("plan", [0, 5, 12], [1, 4, 2])]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


@pytest.mark.parametrize("kv", [True, False])
def test_counters_agree_with_the_runtime_for_every_policy(tmp_path, model, tiny_profile, kv):
    prof = Profile.load(tiny_profile)
    L, E = model.cfg.shape.n_moe_layers, model.cfg.shape.experts
    for name, b, tau in CASES:
        policy = Policy.make(name, L, E, budget=b, tau=tau)
        rec = TraceRecorder(model, Decoding(32, 32, 0.3, kv), "float32").attach()
        eng = OffloadEngine(model, policy, torch.device("cpu"))
        gen = Generator(model, Decoding(32, 32, 0.3, kv), recorder=rec, engine=eng)
        gen.generate(list(range(2, 30)), 64, request=0)
        gen.generate(list(range(50, 90)), 32, request=1)
        eng.detach(), rec.detach()
        trace = read_trace(rec.trace().write(tmp_path / "t.parquet"))
        res = simulate(trace, prof, policy)
        for k, v in res.counters.items():
            if k == "bytes_act" and not kv:
                continue  # no-KV traces keep only the block's choices: the simulator bounds it
            assert np.array_equal(v, trace.counters[k]), (name, b, tau, k)
        assert res.seconds > 0


@pytest.fixture(scope="module")
def mini_trace():
    return synthesize(ModelShape.named("llada2-mini").replace(num_hidden_layers=6), 256, 64, seed=0)


def test_policies_order_as_expected_on_h200(mini_trace):
    prof = Profile.load("h200")
    L, E = mini_trace.shape.n_moe_layers, mini_trace.shape.experts
    t = {n: simulate(mini_trace, prof, Policy.make(n, L, E, budget=b, tau=tau)).seconds
         for n, b, tau in [("all", None, None), ("cpu", None, None), ("tide", 128, 2), ("static", 128, None)]}
    assert t["all"] < t["tide"] < t["static"] < t["cpu"]


def test_overlap_on_a_gpu_box_and_serial_cores_when_the_fast_device_is_the_cpu(mini_trace):
    prof = Profile.load("h200")
    L, E = mini_trace.shape.n_moe_layers, mini_trace.shape.experts
    pol = Policy.make("tide", L, E, budget=64, tau=4)
    res = simulate(mini_trace, prof, pol)
    busy = res.busy
    assert res.seconds < sum(busy.values())  # the box overlaps
    assert res.seconds >= max(busy["gpu"], busy["h2d"], busy["d2h"], busy["host"] + busy["cpu"])  # CPU experts: host thread
    assert busy["host"] > 0
    data = json.loads(json.dumps(prof.data))
    data["fast_device"] = "cpu"
    serial = simulate(mini_trace, Profile(data), pol)
    assert serial.seconds == pytest.approx(sum(serial.busy.values()), rel=1e-9)  # one lane: everything adds up


@pytest.mark.parametrize("fast_device", ["gpu", "cpu"])
def test_simulator_equals_the_cost_models_layer_times(mini_trace, fast_device):
    """The planner prices candidates with CostModel.layer_seconds; it must be what the events add up to."""
    prof = Profile.load("h200")
    if fast_device == "cpu":
        data = json.loads(json.dumps(prof.data))
        data["fast_device"] = "cpu"
        prof = Profile(data)
    cm = CostModel(prof, mini_trace.shape, mini_trace.dtype)
    L, E = mini_trace.shape.n_moe_layers, mini_trace.shape.experts
    for name, b, tau in [("all", None, None), ("cpu", None, None), ("static", 48, None), ("swap", 24, None),
                         ("tide", 40, 1), ("tide", 96, 3), ("plan", [0, 8, 200, 64, 256], [1, 5, 2, 4, 3])]:
        pol = Policy.make(name, L, E, budget=b, tau=tau)
        sim = simulate(mini_trace, prof, pol)
        rep = replay_policy(mini_trace, pol, cost=cm)
        assert rep.seconds() == pytest.approx(sim.seconds, rel=1e-9), name
        per_forward = rep.times["layer_s"].sum(axis=1) + rep.times["fixed_s"]
        np.testing.assert_allclose(per_forward, sim.per_forward["seconds"], rtol=1e-9)


def test_command_json_timeline_and_gantt(tmp_path, mini_trace):
    import matplotlib
    matplotlib.use("Agg")
    from sim.gantt import plot_forward
    path = mini_trace.write(tmp_path / "t.parquet")
    tl = tmp_path / "tl.parquet"
    proc = run_module("sim.replay", "--trace", str(path), "--profile", "h200", "--policy", "tide", "--gpu-experts", "64",
                      "--tau", "3", "--timeline", str(tl), "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    for k in ("seconds", "tokens_per_s", "gpu_tokens", "cpu_tokens", "migrations", "setup_migrations", "bytes_h2d",
              "bytes_act", "gpu_busy_s", "cpu_busy_s", "pcie_busy_s"):
        assert k in s
    df = pd.read_parquet(tl)
    assert {"forward", "layer", "resource", "what", "start_s", "end_s"} <= set(df.columns)
    assert df["end_s"].max() == pytest.approx(s["seconds"])
    ax = plot_forward(df, 3)
    assert len(ax.get_yticks()) == 6  # host, CPU experts, GPU, PCIe each way, the drive
    mem = run_module("sim.replay", "--trace", str(path), "--profile", "rtx4090", "--policy", "tide", "--gpu-mem-gb", "8", "--json")
    assert mem.returncode == 0, mem.stderr
    assert 0 < json.loads(mem.stdout)["policy"]["budget"][0] < 256


def test_bad_input_fails_cleanly(tmp_path, small_trace):
    p = small_trace.write(tmp_path / "small.parquet")
    assert_clean_error(run_module("sim.replay", "--trace", str(p), "--profile", "h200", "--policy", "all"),
                       "no cpu_expert_ffn entry for expert shape 64x32")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(p.read_bytes()[:100])
    assert_clean_error(run_module("sim.replay", "--trace", str(bad), "--profile", "h200", "--policy", "all"), "truncated")
    flash = synthesize(ModelShape.named("llada2-flash").replace(num_hidden_layers=3), 32, 32, seed=0)
    fp = flash.write(tmp_path / "flash.parquet")
    assert_clean_error(run_module("sim.replay", "--trace", str(fp), "--profile", "h200", "--policy", "tide",
                                  "--gpu-experts", "300"), "budgets must lie")
    assert_clean_error(run_module("sim.replay", "--trace", str(fp), "--profile", "nope", "--policy", "all"), "bundled profiles")
    assert_clean_error(run_module("sim.replay", "--trace", str(fp), "--profile", "rtx4090", "--policy", "static",
                                  "--gpu-mem-gb", "1"), "no room for one expert")
