"""The synthetic LLaDA2.0 workloads reproduce the published figures (prompt 64, 1024 tokens)."""
import numpy as np
import pytest

from traces.formats.shapes import ModelShape
from traces.workloads.statistics import cosine_gap, distinct_experts_per_forward, tide_hit_ratio
from traces.workloads.synthetic import CALIBRATION, synthesize

MODELS = ("llada2-mini", "llada2-flash")


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return request.param


@pytest.fixture(scope="module")
def kv_trace(model):
    return synthesize(ModelShape.named(model), 1024, 64, seed=0, kv_cache=True)


@pytest.fixture(scope="module")
def nokv_trace(model):
    return synthesize(ModelShape.named(model), 1024, 64, seed=0, kv_cache=False)


def test_kv_cache_stability_and_spread(kv_trace):
    cos = cosine_gap(kv_trace, gaps=[1, 5])
    assert 0.975 <= cos[1] <= 0.995
    assert cos[5] >= 0.95
    distinct = distinct_experts_per_forward(kv_trace).mean()
    assert 55 <= distinct <= 85


def test_tokens_per_forward_follows_threshold_decoding(kv_trace, model):
    fw = kv_trace.forwards
    tpf = kv_trace.tokens_generated / (fw["kind"] == "step").sum()
    assert abs(tpf - CALIBRATION[model].tokens_per_step) < 0.25
    assert kv_trace.tokens_generated == 1024
    assert (fw.loc[fw["kind"] == "step", "step"] < 32).all()  # every block ends within its steps


def test_no_kv_hit_ratio_at_128(nokv_trace):
    hit = tide_hit_ratio(nokv_trace, budgets=[128], taus=[1, 3, 5, 8]).loc[128]
    assert ((hit[[1, 3, 5]] >= 0.92) & (hit[[1, 3, 5]] <= 0.96)).all(), hit
    assert hit[1] >= hit[3] >= hit[5] >= hit[8]  # falls as tau grows
    assert hit[1] - hit[8] < 0.05  # slowly


def test_same_seed_same_trace_and_kv_modes_share_the_schedule(model):
    s = ModelShape.named(model).replace(num_hidden_layers=3)
    a = synthesize(s, 96, 64, seed=5)
    b = synthesize(s, 96, 64, seed=5)
    assert np.array_equal(a.counts, b.counts) and np.array_equal(a.choices, b.choices)
    c = synthesize(s, 96, 64, seed=5, kv_cache=False)
    ka = a.forwards[a.forwards["kind"] == "step"]["tokens_committed"].to_numpy()
    assert np.array_equal(ka, c.forwards["tokens_committed"].to_numpy())
    # the current block's choices are the same process with and without the KV cache
    assert np.array_equal(a.choice_counts()[(a.forwards["kind"] == "step").to_numpy()], c.choice_counts())
