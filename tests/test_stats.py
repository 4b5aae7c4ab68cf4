import json

import numpy as np
from conftest import assert_clean_error, run_module

from traces.costs.policy_run import replay_policy
from traces.policies.spec import Policy
from traces.workloads.statistics import cosine_gap, distinct_experts_per_forward, summarize


def test_stats_command_prints_one_json_object(tmp_path, small_trace):
    path = small_trace.write(tmp_path / "t.parquet")
    proc = run_module("traces.stats", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["forwards"] == small_trace.n_forwards
    assert s["layers"] == small_trace.shape.n_moe_layers and s["experts"] == small_trace.shape.experts
    assert set(s["cosine_gap"]) == {str(g) for g in range(1, 9)}
    assert set(s["tide_hit_ratio"]) == {"32", "64", "128"}
    assert set(s["tide_hit_ratio"]["64"]) == {str(t) for t in range(1, 9)}
    # 32 experts: budgets above that hold every expert
    assert s["tide_hit_ratio"]["128"]["1"] == 1.0
    assert "mean" in s["distinct_experts_per_forward"]


def test_cosine_of_identical_steps_is_one(small_trace):
    import copy
    t = copy.deepcopy(small_trace)
    steps = (t.forwards["kind"] == "step").to_numpy()
    # make every step of a block route like the block's first step
    for (r, b), g in t.forwards[steps].groupby(["request", "block"]):
        first = g.index[0]
        for f in g.index[1:]:
            t_ch = t.choices_of(f)
            t_ch[...] = t.choices_of(first)[: len(t_ch)]
    assert np.allclose(cosine_gap(t, gaps=[1, 2]), 1.0)


def test_distinct_experts_counts_nonzero(small_trace):
    d = distinct_experts_per_forward(small_trace)
    assert np.allclose(d.to_numpy(), (small_trace.counts > 0).sum(axis=2).mean(axis=0))


def test_hit_ratio_equals_policy_replay(small_trace):
    s = summarize(small_trace)
    L, E = small_trace.shape.n_moe_layers, small_trace.shape.experts
    rep = replay_policy(small_trace, Policy.make("tide", L, E, budget=min(32, E), tau=3))
    assert abs(s["tide_hit_ratio"]["32"]["3"] - rep.hit_ratio()) < 1e-12


def test_stats_usage_error_is_one_line():
    assert_clean_error(run_module("traces.stats", "/nonexistent/trace.parquet"), "/nonexistent/trace.parquet")
