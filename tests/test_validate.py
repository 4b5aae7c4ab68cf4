"""Capture, profile, plan, validate on the tiny checkpoint (CPU), and the lossless rule."""
import json

from conftest import assert_clean_error, run_module
from runtime.generate import Result
from runtime.lossless import agree

PROMPT = ",".join(str(i) for i in range(1, 41))


def test_capture_profile_plan_validate_end_to_end(tmp_path, tiny_ckpt, tiny_profile):
    trace, plan, out = tmp_path / "t.parquet", tmp_path / "plan.json", tmp_path / "v.json"
    p = run_module("runtime.generate", "--checkpoint", str(tiny_ckpt), "--prompt-ids", PROMPT, "--gen-length", "48",
                   "--trace-out", str(trace))
    assert p.returncode == 0, p.stderr
    # 1.2 MB: the tiny model's 0.66 MB of non-expert weights and KV cache leave room for about 20 of its 96 experts
    p = run_module("sim.plan", "--trace", str(trace), "--profile", str(tiny_profile), "--gpu-mem-gb", "0.0012",
                   "--jobs", "1", "--out", str(plan))
    assert p.returncode == 0, p.stderr
    p = run_module("experiments.validate", "--checkpoint", str(tiny_ckpt), "--plan", str(plan), "--repeats", "1",
                   "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "tokens agree with the reference (all)" in p.stdout
    d = json.loads(out.read_text())
    runs = {r["policy"]: r for r in d["runs"]}
    assert set(runs) == {"all", "plan", "cpu", "static", "swap", "tide_tau1"}
    assert all(r["tokens_identical"] for r in runs.values())  # the fast device is the CPU: exactly equal
    assert runs["plan"]["predicted_s"] > 0 and runs["plan"]["measured_s"] > 0
    assert runs["cpu"]["gpu_tokens"] == 0 and runs["all"]["cpu_tokens"] == 0
    prov = d["provenance"]
    assert prov["torch"] and prov["device"] == "cpu" and len(prov["traces"][0]["sha256"]) == 64
    assert prov["profile"]["sha256"] and prov["plan"]["sha256"]

    trace.write_bytes(trace.read_bytes() + b"x")  # the plan's trace changed since: refuse
    assert_clean_error(run_module("experiments.validate", "--checkpoint", str(tiny_ckpt), "--plan", str(plan)),
                       "has changed since the plan was made")


def _result(tokens, margin, at=None):
    return Result(tokens=tokens, margin=margin, committed_at=at or list(range(len(tokens))))


def test_lossless_rule_exact_and_near_ties():
    ref = _result([5, 6, 7, 8], [0.5, 0.004, 0.3, 0.3])
    assert agree(ref, _result([5, 6, 7, 8], [0.5] * 4), exact=True).identical
    assert not agree(ref, _result([5, 9, 7, 8], [0.5] * 4), exact=True).ok  # on the CPU: any difference fails
    near = agree(ref, _result([5, 9, 1, 2], [0.5] * 4), exact=False)  # flips at a near-tie, then diverges
    assert near.ok and not near.identical and "near-tie" in near.detail
    far = agree(ref, _result([5, 6, 1, 8], [0.5] * 4), exact=False)  # flips where the model was sure
    assert not far.ok and "position 2" in far.detail
    # the first difference is the one committed first, not the leftmost
    late = _result([5, 6, 7, 8], [0.5, 0.5, 0.004, 0.5], at=[0, 3, 1, 2])
    assert agree(late, _result([5, 1, 2, 8], [0.5] * 4), exact=False).ok
