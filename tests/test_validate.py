"""Capture, profile, plan, validate on the tiny checkpoint (CPU), and the lossless rule."""
import json

from conftest import assert_clean_error, run_module

from runtime.decoding import Result
from runtime.lossless import agree


def test_capture_profile_plan_validate_end_to_end(validated, tiny_ckpt, tmp_path):
    assert "tokens agree with the reference (all)" in validated["stdout"]
    d = json.loads(validated["result"].read_text())
    runs = {r["policy"]: r for r in d["runs"]}
    assert set(runs) == {"all", "plan", "cpu", "static", "swap", "tide_tau1"}
    assert all(r["tokens_identical"] for r in runs.values())  # the fast device is the CPU: exactly equal
    assert runs["plan"]["predicted_s"] > 0 and runs["plan"]["measured_s"] > 0
    assert runs["cpu"]["gpu_tokens"] == 0 and runs["all"]["cpu_tokens"] == 0
    prov = d["provenance"]
    assert prov["torch"] and prov["device"] == "cpu" and len(prov["traces"][0]["sha256"]) == 64
    assert prov["profile"]["sha256"] and prov["plan"]["sha256"]

    plan = json.loads(validated["plan"].read_text())  # a plan whose trace has changed since: refused
    plan["provenance"]["traces"][0]["sha256"] = "0" * 64
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(plan))
    assert_clean_error(run_module("experiments.validate", "--checkpoint", str(tiny_ckpt), "--plan", str(stale)),
                       "has changed since the plan was made")


def test_error_is_predicted_over_measured_per_round_with_drift_beside(validated):
    """The figure a user reads: each round's error is predicted over measured seconds, minus
    one (raw seconds, no rescaling); a run's error is the median of its rounds'; the drift
    since the plan's profile sits in its own columns, saved with the rounds."""
    import numpy as np
    d = json.loads(validated["result"].read_text())
    rounds = d["rounds"]
    assert rounds and {"round", "policy", "predicted_s", "measured_s", "error", "reference_s"} <= set(rounds[0])
    for r in rounds:
        assert abs(r["error"] - (r["predicted_s"] / r["measured_s"] - 1)) < 1e-12
    for run in d["runs"]:
        mine = [r for r in rounds if r["policy"] == run["policy"]]
        assert abs(run["error"] - float(np.median([r["error"] for r in mine]))) < 1e-12
        assert abs(run["measured_s"] - float(np.median([r["measured_s"] for r in mine]))) < 1e-12
        assert "normalised_s" not in run and "drift" in run and "reference_drift" in run
        if run["policy"] != "all":  # the plan priced its runs on its own profile: how far the box moved since
            assert run["planned_s"] > 0 and abs(run["drift"] - (run["planned_s"] / run["predicted_s"] - 1)) < 1e-12
    assert "error per round" in validated["stdout"] and "median |error|" in validated["stdout"]


def test_a_mixed_plan_runs_for_real_batched_with_the_tokens_of_all(validated, tiny_ckpt, tmp_path):
    """A plan mixing kinds (a swap, a cpu and a tide layer, chosen by hand; budgets and taus
    planned) through the real engine, three requests two at a time (``--batch-size 2``):
    each request's tokens exactly those of ``all`` at that batch, predicted (over the same
    batched forwards) and measured printed for every run; the plan's own batch-1 prediction
    is not compared."""
    from runtime.config import ModelConfig
    from traces.workloads.synthetic import synthesize
    d = validated["result"].parent
    plan = tmp_path / "mixed.json"
    p = run_module("sim.plan", "--trace", str(d / "t.parquet"), "--profile", str(d / "box.json"), "--gpu-mem-gb",
                   "0.0012", "--layer-kinds", "swap,cpu,tide", "--jobs", "1", "--out", str(plan))
    assert p.returncode == 0, p.stderr
    assert "kind per layer:   swap cpu tide" in p.stdout
    three = tmp_path / "three.parquet"
    synthesize(ModelConfig.load(tiny_ckpt).shape, 32, [24, 40, 56], seed=1, requests=3, dtype="float32").write(three)
    out = tmp_path / "v.json"
    p = run_module("experiments.validate", "--checkpoint", str(tiny_ckpt), "--plan", str(plan), "--rounds", "1",
                   "--trace", str(three), "--batch-size", "2", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "tokens agree with the reference (all)" in p.stdout and "swap x1" in p.stdout
    runs = {r["policy"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["plan"]["tokens_identical"] and runs["plan"]["kinds"] == "cpu x1, swap x1, tide x1"
    assert runs["plan"]["predicted_s"] > 0 and runs["plan"]["measured_s"] > 0
    assert runs["plan"]["planned_s"] != runs["plan"]["planned_s"]  # NaN: the plan priced one request per forward
    assert runs["plan"]["cpu_tokens"] > 0 and runs["plan"]["gpu_tokens"] > 0  # both paths ran


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
