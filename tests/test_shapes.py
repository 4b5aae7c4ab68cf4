import json

import pytest

from traces.common.errors import TideError
from traces.formats.shapes import ModelShape


def test_mini_facts_match_the_published_model():
    s = ModelShape.named("llada2-mini")
    assert (s.layers, s.n_moe_layers, s.experts, s.top_k, s.shared_experts) == (20, 19, 256, 8, 1)
    assert s.moe_layers == list(range(1, 20))
    assert s.expert_bytes("bfloat16") == 6291456  # 6.29 MB
    assert abs(s.routed_expert_bytes() / 1e9 - 30.6) < 0.05
    assert s.kv_bytes_per_token() == 40 * 1024
    assert abs(s.total_params() / 1e9 - 16.26) < 0.01  # 16.26B as measured on the reference box


def test_flash_facts_match_the_published_model():
    s = ModelShape.named("llada2-flash")
    assert (s.layers, s.n_moe_layers, s.hidden, s.moe_intermediate) == (32, 31, 4096, 1024)
    assert s.expert_bytes() == 25165824  # 25.2 MB
    assert 195e9 < s.routed_expert_bytes() < 205e9  # ~200 GB
    assert s.kv_bytes_per_token() == 64 * 1024
    assert 98e9 < s.total_params() < 105e9  # 100B
    assert s.expert_bytes("float32") == 2 * s.expert_bytes("bfloat16")


def test_any_config_json_loads(tmp_path):
    cfg = dict(ModelShape.named("mini").config, num_hidden_layers=4, num_experts=64, name="tiny")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for ref in (tmp_path, tmp_path / "config.json"):
        s = ModelShape.load(ref)
        assert (s.layers, s.experts, s.n_moe_layers) == (4, 64, 3)


@pytest.mark.parametrize("change, fragment", [
    ({"num_experts": 0}, "num_experts"),
    ({"num_experts_per_tok": 300}, "exceeds"),
    ({"n_group": 7}, "multiple of n_group"),
    ({"first_k_dense_replace": 20}, "no MoE layer"),
])
def test_bad_configs_are_refused(change, fragment):
    with pytest.raises(TideError, match=fragment):
        ModelShape.named("mini").replace(**change)


def test_unknown_names_and_missing_fields():
    with pytest.raises(TideError, match="unknown model"):
        ModelShape.named("llada3")
    with pytest.raises(TideError, match="lacks"):
        ModelShape.from_config({"hidden_size": 8})


def test_memory_budget_accounts_for_weights_and_kv_cache():
    from traces.costs.memory import MemoryBudget, kv_tokens_for
    s = ModelShape.named("mini")
    # 24 GB: non-expert ~1.9 GB, then 19 layers x 6.29 MB per expert
    mem = MemoryBudget(s, "bfloat16", 24e9)
    b = mem.largest_uniform()
    assert b == int((24e9 - s.non_expert_bytes()) // (19 * s.expert_bytes()))
    assert mem.fits(b) and not mem.fits(b + 1) and mem.fits([b + 1] + [b] * 18)
    assert mem.fits_alone(256) and not MemoryBudget(s, "bfloat16", s.non_expert_bytes() + 4e6).fits_alone(1)
    assert MemoryBudget(s, "bfloat16", 24e9, kv_tokens=100_000).largest_uniform() < b
    assert MemoryBudget(s, "bfloat16", 1e9).largest_uniform() == 0
    assert MemoryBudget(s, "bfloat16", 1e12).largest_uniform() == 256
    with pytest.raises(TideError, match="does not fit"):
        mem.check(b + 1)
    with pytest.raises(TideError, match="one expert per layer"):
        MemoryBudget(s, "bfloat16", 2e9).check_one_each("--gpu-mem-gb 2")
    assert kv_tokens_for([(40, 50), (10, 5)], 32) == 96 and kv_tokens_for([(40, 50)], 32, kv_cache=False) == 0
