import json
import shutil

import pytest
import torch
from conftest import assert_clean_error, run_module
from safetensors.torch import load_file, save_file

from runtime.checkpoint import iter_state, load_model
from runtime.config import EOS_ID, MASK_ID, ModelConfig
from runtime.make_checkpoint import preset_config, write_checkpoint
from traces.common.errors import TideError


def test_round_trip_single_and_sharded(tmp_path, tiny_ckpt):
    single = load_model(tiny_ckpt)
    sharded = write_checkpoint(tmp_path / "sharded", preset_config("tiny"), seed=0, dtype="float32",
                               router_skew=0.25, shard_bytes=400_000)
    files = sorted(p.name for p in sharded.iterdir())
    assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 2
    m2 = load_model(sharded)
    a, b = dict(iter_state(single)), dict(iter_state(m2))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.arange(20)
    assert torch.equal(single(ids), m2(ids))


def test_published_parameter_names(tiny_ckpt):
    names = set(load_file(str(tiny_ckpt / "model.safetensors")).keys())
    for n in ("model.word_embeddings.weight", "model.layers.0.attention.query_key_value.weight",
              "model.layers.0.attention.dense.weight", "model.layers.0.attention.query_layernorm.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.1.mlp.gate.expert_bias", "model.layers.1.mlp.experts.31.down_proj.weight",
              "model.layers.1.mlp.shared_experts.up_proj.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.3.post_attention_layernorm.weight"):
        assert n in names, n


def test_router_skew_sets_expert_bias(tmp_path):
    out = write_checkpoint(tmp_path / "skew", preset_config("tiny"), seed=1, dtype="float32", router_skew=2.0)
    bias = load_file(str(out / "model.safetensors"))["model.layers.1.mlp.gate.expert_bias"]
    assert bias.dtype == torch.float32 and 1.2 < bias.std() < 2.8


def test_mask_and_eos_ids():
    cfg = dict(preset_config("mini"))
    cfg.pop("mask_token_id"), cfg.pop("eos_token_id")
    c = ModelConfig.from_dict(cfg)
    assert (c.mask_id, c.eos_id) == (MASK_ID, EOS_ID) == (156895, 156892)
    tiny = ModelConfig.from_dict(preset_config("tiny"))
    assert (tiny.mask_id, tiny.eos_id) == (511, 510)
    bad = dict(preset_config("tiny"))
    bad.pop("mask_token_id")
    with pytest.raises(TideError, match="mask_token_id 156895 is outside the vocabulary"):
        ModelConfig.from_dict(bad)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder, fn):
    path = folder / "model.safetensors"
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path))


def _bad_cases(tmp_path, tiny_ckpt):
    cases = {}
    d = _copy(tiny_ckpt, tmp_path / "shape")
    _edit_tensors(d, lambda t: t.update({"model.layers.1.mlp.gate.weight": torch.zeros(31, 64)}))
    cases["wrong shape"] = (d, "model.layers.1.mlp.gate.weight has shape [31, 64], the config implies [32, 64]")
    d = _copy(tiny_ckpt, tmp_path / "dtype")
    _edit_tensors(d, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    cases["wrong dtype"] = (d, "expected a floating-point type")
    d = _copy(tiny_ckpt, tmp_path / "missing")
    _edit_tensors(d, lambda t: t.pop("model.layers.2.mlp.experts.7.up_proj.weight"))
    cases["missing tensor"] = (d, "tensor model.layers.2.mlp.experts.7.up_proj.weight missing")
    d = _copy(tiny_ckpt, tmp_path / "config")
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    cases["config does not match"] = (d, "the config implies")
    d = write_checkpoint(tmp_path / "shards", preset_config("tiny"), seed=0, dtype="float32", shard_bytes=400_000)
    (d / "model-00002-of-00008.safetensors").unlink()
    cases["missing shard"] = (d, "shard model-00002-of-00008.safetensors named in model.safetensors.index.json is missing")
    d = _copy(tiny_ckpt, tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    cases["corrupt file"] = (d, "not a readable safetensors file")
    d = tmp_path / "empty"
    d.mkdir()
    cases["no config"] = (d, "no config.json")
    return cases


def test_bad_checkpoints_fail_cleanly(tmp_path, tiny_ckpt):
    for name, (folder, fragment) in _bad_cases(tmp_path, tiny_ckpt).items():
        with pytest.raises(TideError) as exc:
            load_model(folder)
        assert fragment in str(exc.value), (name, str(exc.value))
    cli = tmp_path / "cli"
    cli.mkdir()
    folder, fragment = _bad_cases(cli, tiny_ckpt)["missing shard"]
    proc = run_module("runtime.generate", "--checkpoint", str(folder), "--prompt-ids", "1,2,3", "--gen-length", "8")
    assert_clean_error(proc, fragment)


def test_make_checkpoint_command(tmp_path):
    out = tmp_path / "t"
    proc = run_module("runtime.make_checkpoint", "--preset", "tiny", "--out", str(out), "--seed", "3", "--layers", "2")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert load_model(out).cfg.shape.n_moe_layers == 1
    assert_clean_error(run_module("runtime.make_checkpoint", "--preset", "flash", "--out", str(tmp_path / "f")),
                       "--layers")
    assert_clean_error(run_module("runtime.make_checkpoint", "--preset", "tiny", "--out", str(out)), "not empty")
    assert_clean_error(run_module("runtime.make_checkpoint", "--preset", "huge", "--out", str(tmp_path / "h")),
                       "unknown preset")
    assert not (tmp_path / "f").exists()
