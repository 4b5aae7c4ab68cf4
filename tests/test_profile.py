import json

import numpy as np
import pytest
from conftest import run_module

from traces.common.errors import TideError
from traces.formats.profile_file import Profile, list_profiles
from traces.formats.shapes import ModelShape
from traces.formats.tables import interp1


def test_bundled_profiles_load_and_cover_both_models():
    assert set(list_profiles()) >= {"h200", "a100-40gb", "rtx4090"}
    for name in list_profiles():
        p = Profile.load(name)
        for m in ("llada2-mini", "llada2-flash"):
            s = ModelShape.named(m)
            assert p.has_model(s.model_key)
            assert p.cpu_expert_s(s.expert_shape_key, "bfloat16", 32) > 0
            assert p.gpu_experts_s(s.expert_shape_key, "bfloat16", 64, 4) > 0


def test_h200_keeps_the_measured_values_and_marks_them():
    p = Profile.load("h200")
    d = p.data
    assert d["h2d"]["pinned"]["source"][3] == "measured"  # the 6.29 MB point: one mini expert
    assert d["h2d"]["pinned"]["gbps"][3] == pytest.approx(51.99)
    assert d["cpu_expert_ffn"]["2048x512"]["bfloat16"]["source"] == "measured"
    assert p.cpu_expert_s("2048x512", "bfloat16", 256) == pytest.approx(0.0010163629999979662)
    assert p.gpu_experts_s("4096x1024", "bfloat16", 256, 4) == pytest.approx(0.001449392020702362)
    assert d["overheads"]["launch_s"]["source"] == "derived"
    # one mini expert crosses PCIe gen5 pinned in about 0.12 ms
    assert p.transfer_s("h2d", 6291456) == pytest.approx(6291456 / 51.99e9)


def test_every_value_is_marked(tmp_path):
    for name in list_profiles():
        d = Profile.load(name).data
        for group in ("capacities", "overheads"):
            assert all(v["source"] in ("measured", "derived") for v in d[group].values())


def test_bundled_profiles_are_what_derive_builds():
    proc = run_module("traces.derive", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_interpolation_rules():
    xs, ys = np.array([1.0, 4.0, 16.0]), np.array([10.0, 10.0, 40.0])
    assert interp1(0.5, xs, ys) == 10.0  # clamped below
    assert interp1(10.0, xs, ys) == pytest.approx(25.0)  # linear between
    assert interp1(28.0, xs, ys) == pytest.approx(70.0)  # last slope continues


def test_lookups_interpolate_between_measured_points():
    p = Profile.load("h200")
    a, b = p.cpu_expert_s("2048x512", "bfloat16", [64, 256])
    mid = p.cpu_expert_s("2048x512", "bfloat16", 160)
    assert a < mid < b
    assert p.cpu_expert_s("2048x512", "bfloat16", 0) == 0.0


def _broken(data, path):
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d.pop("h2d"), "lacks the 'h2d' section"),
    (lambda d: d.update(fast_device="tpu"), "fast_device"),
    (lambda d: d["capacities"].pop("cpu_cores"), "capacities.cpu_cores missing"),
    (lambda d: d["capacities"]["gpu_mem_bytes"].update(value=-1), "capacities.gpu_mem_bytes must be positive"),
    (lambda d: d["overheads"]["launch_s"].update(value=-1), "overheads.launch_s must be at least 0"),
    (lambda d: d["overheads"]["launch_s"].update(source="guessed"), "source"),
    (lambda d: d["cpu_expert_ffn"]["2048x512"]["bfloat16"].update(tokens=[4, 1, 16, 64, 256, 1024]), "increasing"),
    (lambda d: d["cpu_expert_ffn"]["2048x512"]["bfloat16"]["seconds"].pop(), "shape"),
    (lambda d: d.update(version=7), "version 7"),
])
def test_malformed_profiles_are_refused(tmp_path, edit, fragment):
    d = Profile.load("h200").data
    d = json.loads(json.dumps(d))
    edit(d)
    path = _broken(d, tmp_path / "p.json")
    with pytest.raises(TideError, match=fragment) as exc:
        Profile.load(path)
    assert str(path) in str(exc.value)


def test_not_json_and_unknown_names(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("{nope")
    with pytest.raises(TideError, match="not valid JSON"):
        Profile.load(bad)
    with pytest.raises(TideError, match="bundled profiles"):
        Profile.load("h300")


def test_profile_lacking_a_model_shape_says_so():
    p = Profile.load("h200")
    with pytest.raises(TideError, match="no non-expert times for model shape"):
        p.non_expert_s("h64-other", "moe_layer", 32, 64)
