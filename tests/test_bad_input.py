"""Bad input never hurts: values of the wrong type or at their edges, limits checked one way,
output paths checked before the work, nothing made for a bad grid, kills that clean up, and
results that count what was asked for. In process where the library owns the check; a few
real command lines for the whole contract (one ``error:`` line, exit 2, no traceback)."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import assert_clean_error, run_module

from traces.common.errors import TideError
from traces.common.files import atomic_write, check_out_path, temp_name
from traces.formats.plan_file import Plan
from traces.formats.profile_file import Profile
from traces.formats.shapes import ModelShape
from traces.formats.trace_file import META_KEY
from traces.formats.trace_read import read_trace


def _raises(fn, *fragments: str) -> str:
    with pytest.raises(TideError) as exc:
        fn()
    msg = str(exc.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# ---- values of the wrong type inside otherwise valid files ------------------------------------
def _with_meta(tmp_path: Path, trace, edit) -> Path:
    table = trace.to_table()
    meta = json.loads(table.schema.metadata[META_KEY])
    edit(meta)
    path = tmp_path / "t.parquet"
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), path)
    return path


TRACE_META = {
    "block length a float": (lambda m: m["decoding"].__setitem__("block_length", 2.5), "block_length must be an integer"),
    "block length a string": (lambda m: m["decoding"].__setitem__("block_length", "32"), "block_length must be an integer"),
    "block length zero": (lambda m: m["decoding"].__setitem__("block_length", 0), "block_length must be at least 1"),
    "steps a boolean": (lambda m: m["decoding"].__setitem__("steps", True), "steps must be an integer"),
    "threshold NaN": (lambda m: m["decoding"].__setitem__("threshold", math.nan), "threshold must be a finite number"),
    "decoding incomplete": (lambda m: m["decoding"].pop("steps"), "lacks 'steps'"),
    "decoding a list": (lambda m: m.__setitem__("decoding", [32, 32]), "decoding must be an object"),
    "requests an object": (lambda m: m.__setitem__("requests", {"0": 1}), "requests must be a list"),
    "request id a boolean": (lambda m: m["requests"][0].__setitem__("request", False), "request must be an integer"),
    "gen length zero": (lambda m: m["requests"][0].__setitem__("gen_length", 0), "gen_length must be at least 1"),
    "request incomplete": (lambda m: m["requests"][0].pop("prompt_length"), "lacks 'prompt_length'"),
    "duplicate requests": (lambda m: m["requests"][1].__setitem__("request", 0), "distinct"),
    "model a list": (lambda m: m.__setitem__("model", [1]), "metadata model must be an object"),
    "experts a float": (lambda m: m["model"].__setitem__("num_experts", 32.0), "num_experts must be an integer"),
    "experts beyond 64 bits": (lambda m: m["model"].__setitem__("num_experts", 2**70), "num_experts"),
    "dtype a number": (lambda m: m.__setitem__("dtype", 2), "dtype must be a string"),
    "model name a number": (lambda m: m.__setitem__("model_name", 3), "model_name must be a string"),
    "metadata a list": (lambda m: (m.clear(), m.update({"format": "tide-trace", "version": 1, "model": 1, "dtype": 1,
                                                          "decoding": 1, "requests": 1})), "metadata model"),
}


@pytest.mark.parametrize("case", list(TRACE_META))
def test_trace_metadata_of_the_wrong_type_or_incomplete(tmp_path, small_trace, case):
    edit, fragment = TRACE_META[case]
    path = _with_meta(tmp_path, small_trace, edit)
    _raises(lambda: read_trace(path), str(path), fragment)


@pytest.mark.parametrize("meta", ["[]", "3", '"x"', "null"])
def test_trace_metadata_that_is_not_an_object(tmp_path, small_trace, meta):
    table = small_trace.to_table()
    path = tmp_path / "t.parquet"
    pq.write_table(table.replace_schema_metadata({META_KEY: meta.encode()}), path)
    _raises(lambda: read_trace(path), str(path), "tide.trace metadata must be an object")


def test_a_trace_with_no_forwards_is_refused(tmp_path, small_trace):
    table = small_trace.to_table().slice(0, 0)
    path = tmp_path / "empty.parquet"
    pq.write_table(table, path)
    _raises(lambda: read_trace(path), "no forwards")


def _profile_edit(path: Path, edit) -> Path:
    data = copy.deepcopy(Profile.load("h200").data)
    edit(data)
    path.write_text(json.dumps(data))
    return path


PROFILE_EDITS = {
    "cores a string": (lambda d: d["capacities"]["cpu_cores"].__setitem__("value", "8"), "cpu_cores must be a number"),
    "launch NaN": (lambda d: d["overheads"]["launch_s"].__setitem__("value", math.nan), "launch_s must be a finite"),
    "memory beyond floats": (lambda d: d["capacities"]["gpu_mem_bytes"].__setitem__("value", 10**400), "finite"),
    "bandwidth zero": (lambda d: d["capacities"]["host_mem_bw_gbps"].__setitem__("value", 0), "must be positive"),
    "sizes as strings": (lambda d: d["h2d"]["pinned"].__setitem__("bytes", ["1", "2"]), "bytes[0] must be a number"),
    "seconds as booleans": (lambda d: next(iter(next(iter(d["cpu_expert_ffn"].values())).values()))
                            .__setitem__("seconds", [True] * 20), "must be a number"),
    "ragged table": (lambda d: next(iter(next(iter(d["gpu_experts"].values())).values()))["seconds"].__setitem__(0, [1.0]),
                     "same length"),
    "section a list": (lambda d: d.__setitem__("h2d", []), "h2d"),
    "name a number": (lambda d: d.__setitem__("name", 5), "name must be a string"),
    "expert table a number": (lambda d: next(iter(d["gpu_experts"].values())).update(bfloat16=3), "must be an object"),
    "CPU table a string": (lambda d: next(iter(d["cpu_expert_ffn"].values())).update(bfloat16="x"), "must be an object"),
    "layer table a list": (lambda d: next(iter(d["non_expert"].values())).update(moe_layer=[1, 2]), "must be an object"),
    "group cost negative": (lambda d: next(iter(next(iter(d["gpu_experts"].values())).values())).update(group_s=-1),
                            "group_s must be at least 0"),
    "in-run level a list": (lambda d: d.update(in_run=[1.2]), "in_run must be an object"),
    "in-run factor a string": (lambda d: d.update(in_run={"dense": "1.2"}), "in_run.dense must be a number"),
}


@pytest.mark.parametrize("case", list(PROFILE_EDITS))
def test_profile_values_of_the_wrong_type_or_at_their_edges(tmp_path, case):
    edit, fragment = PROFILE_EDITS[case]
    path = _profile_edit(tmp_path / "p.json", edit)
    _raises(lambda: Profile.load(path), fragment)


def _plan_json(small_shape) -> dict:
    return Plan.for_shape(small_shape, tau=[1, 2], budget=[4, 8]).to_json()


PLAN_EDITS = {
    "layers an object": (lambda d: d.__setitem__("layers", {"a": 1}), "layers must be a list"),
    "tau a float": (lambda d: d["layers"][0].__setitem__("tau", 2.5), "layers[0].tau must be an integer"),
    "budget a boolean": (lambda d: d["layers"][1].__setitem__("budget", True), "layers[1].budget must be an integer"),
    "tau a string": (lambda d: d["layers"][0].__setitem__("tau", "4"), "tau must be an integer"),
    "model a list": (lambda d: d.__setitem__("model", []), "model must be an object"),
    "experts a string": (lambda d: d["model"].__setitem__("experts", "32"), "model.experts must be an integer"),
    "predicted a list": (lambda d: d.__setitem__("predicted", [1]), "predicted must be an object"),
    "dtype unknown": (lambda d: d.__setitem__("dtype", "int8"), "dtype must be one of"),
    "memory NaN": (lambda d: d.__setitem__("gpu_mem_bytes", math.nan), "gpu_mem_bytes must be a finite"),
    "ignored tau beyond 64 bits": (lambda d: (d.__setitem__("version", 2), d["layers"][0].update(kind="cpu", budget=0,
                                                                                               tau=10**30)),
                                   "layers[0].tau must be at least 1 and fit in 64 bits"),
    "ignored tau a string": (lambda d: (d["layers"][1].update(kind="static", tau="x")), "layers[1].tau must be an integer"),
}


@pytest.mark.parametrize("case", list(PLAN_EDITS))
def test_plan_sections_of_the_wrong_type(tmp_path, small_shape, case):
    edit, fragment = PLAN_EDITS[case]
    d = _plan_json(small_shape)
    edit(d)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    _raises(lambda: Plan.read(path), str(path), fragment)


VALIDATE_PLAN_EDITS = {
    "traces a string": (lambda d: d["provenance"].update(traces="t.parquet"), "provenance.traces must be a list"),
    "a trace a number": (lambda d: d["provenance"].update(traces=[3]), "provenance.traces[0] must be an object"),
    "a trace's name a list": (lambda d: d["provenance"].update(traces=[{"name": ["t"]}]),
                              "provenance.traces[0].name must be a string"),
    "a trace's hash a number": (lambda d: d["provenance"]["traces"][0].update(sha256=5), "sha256 must be a string"),
    "profile a string": (lambda d: d["provenance"].update(profile="h200"), "provenance.profile must be an object"),
    "predicted seconds a list": (lambda d: d["predicted"].update(seconds=[1]), "predicted.seconds must be a number"),
    "baselines a list": (lambda d: d["predicted"].update(baselines=[1]), "predicted.baselines must be an object"),
}


@pytest.mark.parametrize("case", list(VALIDATE_PLAN_EDITS))
def test_validate_reads_the_plans_provenance_and_predictions_strictly(validated, tmp_path, case):
    """What validate reads of a plan beyond its layers (the traces it names, its profile's
    origin, its own predictions): a value of the wrong kind is one line, before any run."""
    edit, fragment = VALIDATE_PLAN_EDITS[case]
    d = json.loads(validated["plan"].read_text())
    edit(d)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    assert_clean_error(run_module("experiments.validate", "--checkpoint", str(validated["checkpoint"]), "--plan",
                                  str(path)), fragment)


CONFIG_EDITS = {
    "experts a float": ({"num_experts": 8.0}, "num_experts must be an integer"),
    "layers a boolean": ({"num_hidden_layers": True}, "num_hidden_layers must be an integer"),
    "vocab a string": ({"vocab_size": "300"}, "vocab_size must be an integer"),
    "negative epsilon": ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be positive"),
    "negative rope theta": ({"rope_theta": -10000}, "rope_theta must be positive"),
    "NaN rope theta": ({"rope_theta": math.nan}, "rope_theta must be a finite number"),
    "negative groups": ({"n_group": -2}, "n_group must be at least 1"),
    "negative shared experts": ({"num_shared_experts": -1}, "num_shared_experts must be at least 0"),
    "rotary factor a string": ({"partial_rotary_factor": "half"}, "partial_rotary_factor must be a number"),
    "flag a string": ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    "rope scaling a list": ({"rope_scaling": [1]}, "rope_scaling must be an object"),
    "eos beyond 64 bits": ({"eos_token_id": 2**64}, "eos_token_id"),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_config_json_fields_of_the_wrong_type_or_that_make_nan(tmp_path, case):
    from runtime.config import ModelConfig
    from runtime.make_checkpoint import preset_config
    change, fragment = CONFIG_EDITS[case]
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**preset_config("tiny"), **change}))
    _raises(lambda: ModelConfig.load(folder), "config.json", fragment)
    _raises(lambda: ModelShape.load(folder), fragment) if case in ("experts a float", "negative groups") else None


def test_config_json_that_is_not_an_object(tmp_path):
    from runtime.config import ModelConfig
    (tmp_path / "config.json").write_text("[1, 2]")
    _raises(lambda: ModelConfig.load(tmp_path), "must be an object")
    _raises(lambda: ModelShape.load(tmp_path), "must be an object")


@pytest.fixture
def sharded(tmp_path, tiny_ckpt):
    import shutil
    d = tmp_path / "sharded"
    shutil.copytree(tiny_ckpt, d)
    (d / "model.safetensors").rename(d / "part-1.safetensors")
    from safetensors import safe_open
    with safe_open(str(d / "part-1.safetensors"), framework="pt") as f:
        names = list(f.keys())
    return d, names


@pytest.mark.parametrize("weight_map,fragment", [
    ([], "weight_map must be an object"),
    ("part-1.safetensors", "weight_map must be an object"),
    (None, "weight_map must be an object"),
    ({"x": 5}, "must be a string"),
    ({"x": "../part-1.safetensors"}, "must be a file name"),
])
def test_safetensors_index_maps_of_the_wrong_type(sharded, weight_map, fragment):
    from runtime.checkpoint import load_model
    d, _ = sharded
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _raises(lambda: load_model(d), "model.safetensors.index.json", fragment)


def test_safetensors_index_that_is_a_list(sharded):
    from runtime.checkpoint import load_model
    d, _ = sharded
    (d / "model.safetensors.index.json").write_text("[]")
    _raises(lambda: load_model(d), "must be an object")


def test_checkpoint_weights_holding_nan(tmp_path, tiny_ckpt):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from runtime.checkpoint import load_model
    d = tmp_path / "nan"
    shutil.copytree(tiny_ckpt, d)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.1.attention.dense.weight"][0, 0] = float("nan")
    tensors["model.norm.weight"][0] = float("inf")
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    _raises(lambda: load_model(d), "holds NaN or infinite values")
    assert torch.isfinite(load_model(tiny_ckpt).model.norm.weight).all()


@pytest.mark.parametrize("line,fragment", [
    ('{"prompt_ids": [1.5, 2]}', "prompt_ids[0] must be an integer"),
    ('{"prompt_ids": [true, 2]}', "prompt_ids[0] must be an integer"),
    ('{"prompt_ids": ["3"]}', "prompt_ids[0] must be an integer"),
    ('{"prompt_ids": [-1]}', "prompt_ids[0] must be at least 0"),
    ('{"prompt_ids": []}', "prompt_ids must not be empty"),
    ('{"prompt_ids": 5}', "prompt_ids must be a list"),
    ('[1, 2]', "each line needs"),
    ('{"prompt_ids": [1], "gen_length": 0}', "gen_length must be at least 1"),
    ('{"prompt_ids": [1], "gen_length": 2.5}', "gen_length must be an integer"),
    ('{"prompt_ids": [1], "gen_length": 100000000000000000000}', "gen_length"),
])
def test_jsonl_prompt_ids_of_the_wrong_type(tmp_path, line, fragment):
    from runtime.generate import read_prompts
    f = tmp_path / "p.jsonl"
    f.write_text(line + "\n")
    args = Namespace(prompt=None, prompt_ids=None, prompts=str(f), chat=False, checkpoint="x", gen_length=8)
    _raises(lambda: read_prompts(args, None), str(f), fragment)


@pytest.mark.parametrize("toml,fragment", [
    ("taus = [2.5]", "taus[0] must be an integer"),
    ("gen_lengths = ['256']", "gen_lengths[0] must be an integer"),
    ("budgets = [true]", "budgets[0] (an integer or fit) must be an integer"),
    ("budgets = ['most']", "budgets[0] (an integer or fit) must be an integer"),
    ("pcie = [nan]", "pcie[0] must be a finite number"),
    ("pcie = [0]", "pcie[0] must be positive"),
    ("gpu_mem_gb = [inf]", "gpu_mem_gb[0] must be a finite number"),
    ("models = [1]", "models[0] must be a string"),
    ("seed = -1", "seed must be at least 0"),
    ("seed = 1.5", "seed must be an integer"),
    ("taus = []", "taus must not be empty"),
    ("budgets = [300]", "300 exceeds llada2-mini's 256 experts"),
])
def test_sweep_toml_values_of_the_wrong_type(tmp_path, toml, fragment):
    from experiments.sweep import studies_from_toml
    f = tmp_path / "g.toml"
    f.write_text(f"models = ['llada2-mini']\n[[study]]\nname = 's'\n{toml}\n")
    _raises(lambda: studies_from_toml(str(f)), f"--grid {f}: study 's'", fragment)


@pytest.mark.parametrize("runs,fragment", [
    ({"runs": {}}, "runs must be a list"),
    ([], "must be an object"),
    ({"runs": [{"run": 1.5, "policy": "all", "trace": "r.parquet", "measured_s": 1.0, "device": "cpu"}]},
     "runs[0].run must be an integer"),
    ({"runs": [{"run": 0, "policy": "all", "trace": "r.parquet", "measured_s": "1", "device": "cpu"}]},
     "measured_s must be a number"),
    ({"runs": [{"run": 0, "policy": "all", "trace": "../r.parquet", "measured_s": 1.0, "device": "cpu"}]},
     "must be a file name"),
    ({"runs": [{"run": 0, "policy": "static", "budget": True, "trace": "r.parquet", "measured_s": 1.0,
                "device": "cpu"}]}, "budget must be an integer"),
])
def test_accuracy_runs_json_of_the_wrong_type(tmp_path, runs, fragment):
    from experiments.accuracy import read_runs
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    _raises(lambda: read_runs(tmp_path), "runs.json", fragment)
    assert_clean_error(run_module("experiments.accuracy", "--replay-only", str(tmp_path)), fragment)


# ---- numbers at their edges on the command line ---------------------------------------------
@pytest.mark.parametrize("module,argv,fragment", [
    ("sim.replay", ["--trace", "T", "--profile", "h200", "--policy", "static", "--gpu-mem-gb", "nan"], "--gpu-mem-gb"),
    ("sim.replay", ["--trace", "T", "--profile", "h200", "--policy", "static", "--gpu-mem-gb", "inf"], "--gpu-mem-gb"),
    ("sim.plan", ["--trace", "T", "--profile", "h200", "--gpu-mem-gb", "-inf", "--out", "p.json"], "--gpu-mem-gb"),
    ("traces.synth", ["--model", "llada2-mini", "--seed", str(2**70), "--out", "x.parquet"], "64 bits"),
    ("traces.synth", ["--model", "llada2-mini", "--seed", "-1", "--gen-length", "8", "--out", "x.parquet"],
     "--seed must be at least 0"),
    ("traces.synth", ["--model", "llada2-mini", "--block-length", "0", "--gen-length", "8", "--out", "x.parquet"],
     "--block-length must lie in 1.."),
    ("traces.synth", ["--model", "llada2-mini", "--steps", "0", "--gen-length", "8", "--out", "x.parquet"],
     "--steps must be at least 1"),
    ("traces.synth", ["--model", "llada2-mini", "--gen-length", "2.5", "--out", "x.parquet"], "expected an integer"),
])
def test_numbers_at_their_edges_in_process(tmp_path, small_trace, module, argv, fragment):
    import importlib
    small_trace.write(tmp_path / "T")
    argv = [str(tmp_path / a) if a in ("T", "p.json", "x.parquet") else a for a in argv]
    main = importlib.import_module(module).main
    _raises(lambda: main(argv), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["T"]  # nothing written


@pytest.mark.parametrize("flags,fragment", [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--top-k", "100000"], "--top-k must lie in 0.."),
    (["--top-p", "0"], "--top-p must be positive"),
    (["--seed", "-3"], "--seed must be at least 0"),
    (["--threshold", "nan"], "--threshold"),
])
def test_sampling_values_torch_would_reject(tiny_ckpt, flags, fragment):
    from runtime.generate import main
    _raises(lambda: main(["--checkpoint", str(tiny_ckpt), "--prompt-ids", "1,2,3", "--gen-length", "4", *flags]),
            fragment)


# ---- limits checked the one way -------------------------------------------------------------
def test_limits_are_checked_the_same_way_everywhere(tmp_path, small_trace):
    from sim.replay import main as replay_main
    path = tmp_path / "t.parquet"
    small_trace.write(path)
    _raises(lambda: replay_main(["--trace", str(path), "--profile", "h200", "--policy", "static",
                                 "--gpu-mem-gb", "1000"]), "--gpu-mem-gb 1000: more than")
    _raises(lambda: replay_main(["--trace", str(path), "--profile", "h200", "--policy", "static",
                                 "--gpu-experts", "1,2,3,4,5"]), "--gpu-experts", "2 per-layer budgets, got 5")
    _raises(lambda: replay_main(["--trace", str(path), "--profile", "h200", "--policy", "tide",
                                 "--gpu-experts", "1,true"]), "--gpu-experts")


def test_gpu_check_refuses_a_device_typo():
    from experiments.gpu_check import check
    _raises(lambda: check("cdua", quick=True), "--device: expected cpu or cuda, got 'cdua'")


def test_sweep_budgets_that_do_not_fit_get_a_row_saying_so():
    from experiments.sweep_points import Point, evaluate
    df = evaluate(Point("t", "a100-40gb", "llada2-mini", gen_length=32, gpu_mem_gb=16, policies=("static", "tide"),
                        taus=(1,), budgets=(256,)))
    assert set(df["status"].str.contains("does not fit")) == {True}
    assert set(df["policy"]) == {"static", "tide"}


# ---- output paths: checked before the work --------------------------------------------------
def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    _raises(lambda: check_out_path(tmp_path / "adir"), "exists and is a folder")
    _raises(lambda: check_out_path(tmp_path / "afile", folder=True), "exists and is a file")
    _raises(lambda: check_out_path(tmp_path / "afile" / "x.json"), "is a file, not a folder")
    assert check_out_path(tmp_path / "new" / "deeper" / "x.json").name == "x.json"
    assert not (tmp_path / "new").exists()  # nothing made by the check
    _raises(lambda: atomic_write(tmp_path / "adir", lambda t: t.write_text("x")), "is a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_folder_is_refused_before_the_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _raises(lambda: check_out_path(ro / "x.json"), "cannot write")
    finally:
        ro.chmod(0o700)


def test_commands_refuse_an_output_that_is_a_folder(tmp_path, small_trace):
    from sim.plan import main as plan_main
    from traces.synth import main as synth_main
    trace = tmp_path / "t.parquet"
    small_trace.write(trace)
    (tmp_path / "adir").mkdir()
    _raises(lambda: plan_main(["--trace", str(trace), "--profile", "h200", "--gpu-mem-gb", "10",
                               "--out", str(tmp_path / "adir")]), "--out", "is a folder")
    _raises(lambda: synth_main(["--model", "llada2-mini", "--gen-length", "8", "--out", str(tmp_path / "adir")]),
            "is a folder")
    assert_clean_error(run_module("experiments.sweep", "--quick", "--out", str(trace)), "exists and is a file")


def test_atomic_write_makes_missing_folders_and_removes_stale_temporaries(tmp_path):
    target = tmp_path / "a" / "b" / "x.json"
    atomic_write(target, lambda t: t.write_text("1"))
    dead = 2**22 + 12345  # no such process
    stale = target.parent / f".x.json.{dead}.abcd.tmp"
    stale.write_text("half")
    live = target.parent / f".x.json.{os.getppid()}.abcd.tmp"  # a live writer's: kept
    live.write_text("busy")
    other = target.parent / f".y.json.{dead}.abcd.tmp"  # another target's: not ours to judge now
    other.write_text("half")
    atomic_write(target, lambda t: t.write_text("2"))
    assert target.read_text() == "2" and not stale.exists() and live.exists() and other.exists()
    assert temp_name(target).startswith(f".x.json.{os.getpid()}.")


def test_make_checkpoint_removes_a_killed_runs_half_written_folder(tmp_path):
    from runtime.make_checkpoint import preset_config, write_checkpoint
    half = tmp_path / f".ck.{2**22 + 54321}.x1y2.tmp"
    half.mkdir()
    (half / "shard-0.safetensors").write_bytes(b"partial")
    write_checkpoint(tmp_path / "ck", preset_config("tiny"), seed=0, dtype="float32")
    assert not half.exists() and (tmp_path / "ck" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# ---- nothing made for a bad grid; errors not on the progress bar's line ------------------------
@pytest.mark.parametrize("flags,fragment", [
    (["--taus", "0"], "--taus[0] must be at least 1"),
    (["--budgets", "999"], "--budgets: 999 exceeds"),
    (["--pcie", "nan"], "--pcie"),
    (["--profiles", "nosuch"], "--profiles"),
    (["--executor", "threads"], "--executor"),
    (["--gen-lengths", "2.5"], "--gen-lengths"),
    (["--batch-sizes", "0"], "--batch-sizes[0] must be at least 1"),
    (["--batch-sizes", "2.5"], "--batch-sizes"),
    (["--arrival-rates", "-1"], "--arrival-rates[0]"),
    (["--requests", "0"], "--requests"),
])
def test_a_bad_sweep_makes_nothing(tmp_path, flags, fragment):
    from experiments.sweep import main
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        _raises(lambda: main(["--quick", *flags]), fragment)
    finally:
        os.chdir(cwd)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_workload_run_makes_nothing(tmp_path):
    from experiments.workloads import main
    out = tmp_path / "w"
    _raises(lambda: main(["--out", str(out), "--models", "llada2-tiny"]), "unknown model")
    _raises(lambda: main(["--out", str(out), "--seed", "-2"]), "--seed")
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_dask_scheduler_is_one_line(tmp_path, monkeypatch):
    import experiments.sweep
    monkeypatch.setattr(experiments.sweep, "DASK_CONNECT_TIMEOUT", "1s")
    assert_clean_error(run_module("experiments.sweep", "--quick", "--executor", "dask", "--scheduler",
                                  "tcp://127.0.0.1:9", "--out", str(tmp_path / "d")), "--scheduler", "no Dask scheduler")
    assert not (tmp_path / "d").exists()


# ---- a hard kill ------------------------------------------------------------------------------
def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.add(k)
            todo.append(k)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start_sweep(out: Path) -> tuple[subprocess.Popen, set[int]]:
    proc = subprocess.Popen([sys.executable, "-m", "experiments.sweep", "--quick", "--jobs", "2", "--no-figures",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    workers: set[int] = set()
    while time.time() < deadline and len(workers) < 2:
        time.sleep(0.2)
        workers = _children(proc.pid)
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before its workers started: {proc.stderr.read()}")
    assert len(workers) >= 2, "no worker processes seen"
    return proc, workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_a_sweep_ends_its_workers(tmp_path, sig):
    proc, workers = _start_sweep(tmp_path / "s")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "workers outlived the sweep"
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and err.strip().splitlines()[-1] == "error: terminated", err
        assert "Traceback" not in err
    leftovers = [p for p in (tmp_path / "s").rglob("*") if p.name.endswith(".tmp")]
    if sig == signal.SIGTERM:
        assert leftovers == []
        return
    # whatever a kill left, a rerun finishes and leaves no temporaries of its own targets
    p = run_module("experiments.sweep", "--quick", "--jobs", "1", "--no-figures", "--out", str(tmp_path / "s"))
    assert p.returncode == 0, p.stderr
    assert not [p for p in (tmp_path / "s" / "points").iterdir() if p.name.endswith(".tmp")]


# ---- a wrong result that looks right ------------------------------------------------------------
def test_tokens_counted_are_the_tokens_asked_for(small_shape):
    from traces.workloads.synthetic import synthesize
    t = synthesize(small_shape, gen_length=50, prompt_length=40, seed=0)  # 90 tokens: the last block has 6 extra
    assert int(t.forwards["tokens_committed"].sum()) > 50
    assert t.tokens_generated == 50
    two = synthesize(small_shape, gen_length=50, prompt_length=40, seed=0, requests=2)
    assert two.tokens_generated == 100


def test_runtime_and_its_trace_count_the_same_tokens(tmp_path, tiny_ckpt):
    from runtime.generate import main
    out = tmp_path / "t.parquet"
    assert main(["--checkpoint", str(tiny_ckpt), "--prompt-ids", "1,2,3,4,5", "--gen-length", "20",
                 "--trace-out", str(out)]) == 0
    tr = read_trace(out)
    assert tr.tokens_generated == 20 < int(tr.forwards["tokens_committed"].sum())


# ---- bf16 against the published model -----------------------------------------------------------
def test_expert_bias_is_rounded_to_the_model_dtype_as_published(tmp_path):
    import torch
    from safetensors.torch import load_file

    from runtime.checkpoint import load_model
    from runtime.make_checkpoint import preset_config, write_checkpoint
    ck = write_checkpoint(tmp_path / "ck", preset_config("tiny"), seed=1, dtype="float32", router_skew=0.25)
    raw = load_file(str(ck / "model.safetensors"))
    name = next(n for n in raw if n.endswith("expert_bias"))
    layer = int(name.split(".")[2])
    published = raw[name].to(torch.bfloat16).float()  # what torch_dtype=bfloat16 computes with
    assert not torch.equal(published, raw[name].float())
    m = load_model(ck, dtype="bfloat16")
    assert torch.equal(m.model.layers[layer].mlp.gate.expert_bias.data, published)
    assert m.model.layers[layer].mlp.gate.expert_bias.dtype == torch.float32
    full = load_model(ck, dtype="bfloat16", bias_fp32=True)
    assert torch.equal(full.model.layers[layer].mlp.gate.expert_bias.data, raw[name].float())
    assert torch.equal(load_model(ck).model.layers[layer].mlp.gate.expert_bias.data, raw[name].float())


# ---- a finished run never lost to a figure ------------------------------------------------------
def test_figures_with_nothing_to_show_are_skipped_with_a_note(tmp_path):
    import pandas as pd

    from experiments.sweep_figures import draw_all
    from experiments.sweep_points import Point, evaluate_group
    points = [Point("s", "a100-40gb", "llada2-mini", gen_length=32, gpu_mem_gb=16, pcie=x, cpu_cores=c,
                    policies=("cpu", "plan"), taus=(1,)) for x in (1.0, 2.0) for c in (0.5, 1.0)]
    rows = evaluate_group(points)  # one replay of the shared workload for the four boxes
    df = pd.concat([rows[p.key()] for p in points], ignore_index=True)
    drawn, skipped = draw_all(df, tmp_path)
    assert "speedup_heatmap.png" in drawn  # a panel for cpu only: swap, static and tide were not priced
    assert any("tokens_vs_memory.png" in s for s in skipped) and any("best_tau.png" in s for s in skipped)
    empty = df[df["policy"] == "nothing"]
    drawn, skipped = draw_all(empty, tmp_path / "e")
    assert drawn == [] and len(skipped) == 6
    broken = df.assign(tokens_per_s="fast")  # drawing fails: reported, not raised
    drawn, skipped = draw_all(broken, tmp_path / "b")
    assert len(drawn) + len(skipped) == 6


# ---- predictions from a profile taken under another load --------------------------------------
def test_validation_says_when_the_profile_is_from_another_box_or_load(small_shape):
    from experiments.validate import box_check
    plan = Plan.for_shape(small_shape, tau=1, budget=4)
    _, warn = box_check(plan)
    assert any("not measured here" in w for w in warn)
    import socket

    import torch

    from runtime.profile_tables import memory_bandwidth_gbps
    bw = memory_bandwidth_gbps(torch.device("cpu"))
    plan.provenance["profile"] = {"name": "p", "origin": {"host": "elsewhere", "created": "2026-01-01T00:00:00+00:00",
                                                          "host_mem_bw_gbps": bw * 10}}
    lines, warn = box_check(plan)
    assert any("measured on elsewhere" in w for w in warn) and any("another load" in w for w in warn)
    assert any("days ago" in line for line in lines)
    plan.provenance["profile"]["origin"].update(host=socket.gethostname(), host_mem_bw_gbps=bw)
    _, warn = box_check(plan, tolerance=10.0)
    assert warn == []


# ---- the README's main command, as a newcomer runs it ------------------------------------------
def test_the_main_job_runs_from_an_empty_folder(tmp_path):
    """Its quick form, from a working folder with no ``out/`` (the default ``--out out/sweep``)."""
    proc = subprocess.run([sys.executable, "-m", "experiments.sweep", "--quick"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "sweep" / "sweep.parquet").is_file()
    assert "4 points (4 evaluated, 0 reused)" in proc.stdout
    assert not [p for p in (tmp_path / "out").rglob("*.tmp")]


# ---- the batched and serving surfaces: one check per kind of value, shared by every command ----
@pytest.mark.parametrize("module,argv,fragment", [
    ("sim.replay", ["--trace", "T", "--profile", "h200", "--policy", "all", "--seed", "-1"], "--seed must be at least 0"),
    ("sim.plan", ["--trace", "T", "--profile", "h200", "--gpu-mem-gb", "40", "--seed", "-1", "--out", "p.json"],
     "--seed must be at least 0"),
    ("sim.replay", ["--trace", "T", "--profile", "h200", "--policy", "all", "--arrival-rate", "1e-320"],
     "--arrival-rate must be a finite number of requests per second"),
    ("sim.plan", ["--trace", "T", "--profile", "h200", "--gpu-mem-gb", "40", "--arrival-rate", "1e-320",
                  "--out", "p.json"], "--arrival-rate must be a finite number of requests per second"),
    ("sim.replay", ["--trace", "T", "--profile", "h200", "--policy", "all", "--batch-size", "100000"],
     "--batch-size must be at most"),
    ("sim.replay", ["--trace", "T", "--profile", "h200", "--policy", "all", "--requests-out", ""], "--requests-out"),
    ("sim.replay", ["--trace", "T", "--profile", "h200", "--policy", "all", "--timeline", ""], "--timeline"),
    ("sim.replay", ["--trace", "T", "--profile", "h200", "--policy", "lru"], "--policy: unknown policy 'lru'"),
])
def test_serving_flags_are_refused_before_any_work(tmp_path, small_trace, module, argv, fragment):
    """Each refused in one line before anything runs (``sim.plan`` before its planning) and
    nothing written."""
    import importlib
    small_trace.write(tmp_path / "T")
    argv = [str(tmp_path / a) if a in ("T", "p.json") else a for a in argv]
    _raises(lambda: importlib.import_module(module).main(argv), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["T"]


@pytest.mark.parametrize("offset", ["1e9", "1e12"])
def test_arrival_offsets_past_any_stream_are_refused(tmp_path, small_trace, tiny_ckpt, offset):
    """An offset of decades would have the runtime sleep for decades (or overflow ``time.sleep``)."""
    arr = tmp_path / "arr.txt"
    arr.write_text(f"0\n{offset}\n")
    p = run_module("runtime.generate", "--checkpoint", str(tiny_ckpt), "--prompt-ids", "1,2,3", "--gen-length", "8",
                   "--arrivals", str(arr))
    assert_clean_error(p, f"{arr}:2: an arrival offset must be a finite number of seconds at least 0 and at most")
    small_trace.write(tmp_path / "t.parquet")
    p = run_module("sim.replay", "--trace", str(tmp_path / "t.parquet"), "--profile", "h200", "--policy", "all",
                   "--arrivals", str(arr))
    assert_clean_error(p, "an arrival offset must be")


def test_a_stream_with_more_offsets_than_requests_is_refused():
    """(It used to loop forever in the serving simulator.)"""
    from sim.simulate import simulate
    from traces.policies.spec import Policy
    from traces.serving.arrivals import Arrivals
    from traces.workloads.synthetic import synthesize
    s = ModelShape.named("llada2-mini")
    trace = synthesize(s, 32, 32, seed=0, requests=2)
    stream = Arrivals(offsets=(0.0, 0.1, 0.2), label="three")
    _raises(lambda: simulate(trace, Profile.load("h200"), Policy.make("all", s.n_moe_layers, s.experts),
                             batch_size=2, arrivals=stream), "3 arrival offsets for 2 requests")


def test_a_request_listed_with_no_forwards_is_refused_when_the_trace_loads(tmp_path, small_trace):
    path = _with_meta(tmp_path, small_trace, lambda m: m["requests"].append(
        {"request": 7, "prompt_length": 8, "gen_length": 8}))
    _raises(lambda: read_trace(path), "metadata lists request 7, which no forward runs")


def test_a_signed_profile_cost_past_its_bound_is_refused(tmp_path):
    """A large negative ``batch_segment_s`` would price tasks below zero (a faster box)."""
    path = _profile_edit(tmp_path / "p.json", lambda d: d["host"].update(
        batch_segment_s={"value": -1.0, "source": "measured"}))
    _raises(lambda: Profile.load(path), "host.batch_segment_s must be at least")


@pytest.mark.parametrize("fmt", ["trace", "plan", "profile"])
def test_a_version_of_true_is_refused_in_every_format(tmp_path, small_trace, small_shape, fmt):
    """The one header reader: ``"version": true`` is not version 1 in any format."""
    if fmt == "trace":
        path = _with_meta(tmp_path, small_trace, lambda m: m.__setitem__("version", True))
        load = lambda: read_trace(path)  # noqa: E731
    elif fmt == "plan":
        path = tmp_path / "p.json"
        path.write_text(json.dumps({**Plan.for_shape(small_shape, 2, 8).to_json(), "version": True}))
        load = lambda: Plan.read(path)  # noqa: E731
    else:
        path = _profile_edit(tmp_path / "p.json", lambda d: d.__setitem__("version", True))
        load = lambda: Profile.load(path)  # noqa: E731
    _raises(load, "version True is not supported")


def test_prompts_that_carry_their_own_lengths_need_no_gen_length(tmp_path, tiny_ckpt):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2, 3], "gen_length": 8}\n{"prompt_ids": [4, 5], "gen_length": 4}\n')
    p = run_module("runtime.generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(prompts), "--json")
    assert p.returncode == 0, p.stderr
    assert [len(r["tokens"]) for r in json.loads(p.stdout)["requests"]] == [8, 4]
    prompts.write_text('{"prompt_ids": [1, 2, 3], "gen_length": 8}\n{"prompt_ids": [4, 5]}\n')
    p = run_module("runtime.generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(prompts))
    assert_clean_error(p, "--gen-length is required", "p.jsonl:2")


@pytest.mark.parametrize("args, says", [
    (["--tokens", "0"], "--tokens"), (["--dtypes", "float8"], "--dtypes"), (["--batch-sizes", "x"], "--batch-sizes"),
    (["--reps", "0"], "--reps"), (["--model", "nope"], "nope"),
])
def test_bench_cpu_flags_are_one_line(args, says):
    assert_clean_error(run_module("experiments.bench_cpu", *args), says)
