import json

from conftest import assert_clean_error, run_module

from runtime.checkpoint import load_model
from traces.costs.cost_model import CostModel
from traces.formats.profile_file import Profile


def test_quick_profile_of_this_box_validates_and_prices_the_model(tmp_path, tiny_ckpt):
    out = tmp_path / "p.json"
    proc = run_module("runtime.profile", "--out", str(out), "--checkpoint", str(tiny_ckpt), "--device", "cpu", "--quick")
    assert proc.returncode == 0, proc.stderr
    prof = Profile.load(out)
    assert prof.fast_device == "cpu" and prof.shares_cores
    d = json.loads(out.read_text())
    shape = load_model(tiny_ckpt).cfg.shape
    assert shape.expert_shape_key in d["gpu_experts"] and shape.model_key in d["non_expert"]
    assert all(v["source"] == "measured" for v in d["capacities"].values())
    cm = CostModel(prof, shape, dtype="float32")
    assert cm.non_expert_s("moe_layer", 32, 96) > 0
    assert prof.cpu_expert_s(shape.expert_shape_key, "float32", 64) > prof.cpu_expert_s(shape.expert_shape_key, "float32", 1) * 0.5
    assert prof.transfer_s("h2d", 1 << 20) > 0
    # the host thread's costs, measured by running the engine and the decoding loop themselves
    assert all(v["source"] == "measured" for v in d["host"].values())
    assert prof.host("forward_s") > 0 and prof.host("issue_s") > 0 and prof.host("decide_s") > 0
    assert prof.host("refresh_s") > prof.host("decide_s")  # a refresh ranks and moves experts
    assert prof.host("expert_call_s") == 0.0  # the fast device is the CPU: its grouped time is host time
    # the tables' level inside a forward, measured on the checkpoint itself and recorded beside them
    level = d["in_run"]
    assert {"dense", "moe", "head", "experts", "decide", "copies"} <= set(level) and "note" in level
    assert all(0.2 < level[k] < 5 for k in level if k not in ("note", "member_s", "replay_s")), level
    # the level replay's seconds per forward: what runtime.calibrate.replay_seconds times again
    assert 0 < level["replay_s"] < 1
    # what each further request of a batched forward adds, from a batch replayed on the checkpoint
    member = level["member_s"]
    assert {"moe_layer", "head", "loop"} <= set(member) and prof.host("member_s") == member["loop"] >= 0
    assert prof.member_s(shape.model_key, "moe_layer") == member["moe_layer"]
    assert d["gpu_experts"][shape.expert_shape_key]["float32"]["in_run"] == level["experts"]
    assert d["gpu_experts"][shape.expert_shape_key]["float32"]["group_s"] >= 0
    assert d["measured"]["reference_s"] > 0  # recorded for drift reports; no cell is rescaled by it
    # the box's read bandwidth, and each CPU expert cell's share of it (weights read per second)
    for entry in d["cpu_expert_ffn"][shape.expert_shape_key].values():
        assert entry["read_gbps"] > 0 and len(entry["read_fraction"]) == len(entry["tokens"])
        assert all(f > 0 for f in entry["read_fraction"]) and entry["kernel"] in ("loop", "grouped", "fused")
    assert d["cpu_expert_ffn"][shape.expert_shape_key]["float32"]["kernel"] == "loop"  # row-exact: the chain


def test_profile_bad_flags(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_clean_error(run_module("runtime.profile", "--out", str(tmp_path / "afile" / "p.json"), "--quick"),
                       "is a file, not a folder")
    assert_clean_error(run_module("runtime.profile", "--out", str(tmp_path / "p.json"), "--device", "tpu"), "--device")
