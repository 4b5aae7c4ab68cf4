import pandas as pd
from conftest import assert_clean_error, run_module


def test_capture_then_replay_elsewhere(tmp_path):
    d = tmp_path / "acc"
    cap = run_module("experiments.accuracy", "--capture-only", str(d), "--device", "cpu", "--gen-length", "32",
                     "--prompt-length", "32", "--batch-requests", "5",
                     "--rounds", "1", "--quick")
    assert cap.returncode == 0, cap.stderr
    assert (d / "runs.json").is_file() and (d / "profile.json").is_file()
    rep = run_module("experiments.accuracy", "--replay-only", str(d))
    assert rep.returncode == 0, rep.stderr
    df = pd.read_parquet(d / "accuracy.parquet")
    one = df[df["batch_size"] == 1]
    assert len(one) == 14 and one["counters_agree"].all()  # nine uniform settings, a plan mixing kinds, four
    hosted = one[one["host"] != "-"]  # with a host tier: experts read from the checkpoint's files, counted alike
    assert len(hosted) == 4 and "with a host tier" in rep.stdout
    assert "mixed" in set(df["policy"])
    # batched settings: batch 4 and 8, own router and replayed traffic, and a stream spread in time
    batched = df[df["batch_size"] > 1]
    assert set(batched["batch_size"]) == {4, 8} and set(batched["traffic"]) == {"replay", "own", "arrivals"}
    steady = batched[batched["traffic"] != "arrivals"]
    assert steady["counters_agree"].all()  # the recorded batched forwards replay exactly
    assert batched.loc[batched["traffic"] == "arrivals", "latency_p50_error"].notna().all()
    assert "batched: median |error|" in rep.stdout and "p50 latency of the run with arrivals" in rep.stdout
    assert (df["predicted_s"] > 0).all() and (df["measured_s"] > 0).all()
    plain_all = (df["policy"] == "all") & (df["host"] == "-")
    assert (df["spread"] >= 0).all() and df.loc[plain_all, "speedup_error"].abs().max() < 1e-12
    assert "median |error|" in rep.stdout and "error per round" in rep.stdout
    # the error's definition: predicted over measured seconds, minus one, per round; the median over rounds
    rounds = pd.read_parquet(d / "accuracy-rounds.parquet")
    assert ((rounds["error"] - (rounds["predicted_s"] / rounds["measured_s"] - 1)).abs() < 1e-12).all()
    per_run = rounds.groupby("run")["error"].median()
    assert ((df.set_index("run")["error"] - per_run).abs() < 1e-12).all()
    assert "drift" in df and "normalised_s" not in df  # the speed reference's drift beside the error, never in it


def test_replay_only_needs_a_capture(tmp_path):
    assert_clean_error(run_module("experiments.accuracy", "--replay-only", str(tmp_path)), "no runs.json")


def test_a_preset_checkpoints_seed_and_skew_are_flags_checked_before_work(tmp_path):
    out = str(tmp_path / "acc")
    assert_clean_error(run_module("experiments.accuracy", "--router-skew", "-1", "--out", out), "--router-skew")
    assert_clean_error(run_module("experiments.accuracy", "--seed", "-2", "--out", out), "--seed")
    assert_clean_error(run_module("experiments.accuracy", "--seed", "3", "--checkpoint", str(tmp_path), "--out", out),
                       "with --checkpoint they do not apply")
