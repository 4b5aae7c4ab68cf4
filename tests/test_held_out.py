import pandas as pd
import pytest
from conftest import assert_clean_error, run_module


def test_one_profile_predicts_a_grid_it_never_saw(tmp_path):
    """Profiled once on the preset's own checkpoint; every cell (another seed and skew, each
    batch size) runs every policy, interleaved by round, and is predicted from its trace."""
    d = tmp_path / "ho"
    p = run_module("experiments.held_out", "--skews", "0", "--seeds", "1", "--gen-lengths", "32",
                   "--batch-sizes", "1,2", "--requests", "2", "--rounds", "2", "--spread-s", "0", "--quick", "--out", str(d))
    assert p.returncode == 0, p.stderr
    cells = pd.read_parquet(d / "held-out.parquet")
    assert len(cells) == 2 * 3 and set(cells["batch_size"]) == {1, 2}
    assert set(cells["policy"]) == {"all", "tide", "static"} and set(cells["seed"]) == {1}
    assert (cells["predicted_s"] > 0).all() and (cells["measured_s"] > 0).all()
    assert (cells.loc[cells["policy"] == "all", "speedup_error"].abs() < 1e-12).all()
    runs = pd.read_parquet(d / "held-out-rounds.parquet")
    assert sorted(runs["round"].unique()) == [0, 1] and len(runs) == 2 * len(cells)
    assert ((runs["error"] - (runs["predicted_s"] / runs["measured_s"] - 1)).abs() < 1e-12).all()
    med = runs.groupby(["batch_size", "policy"])["error"].median()
    assert ((cells.set_index(["batch_size", "policy"])["error"] - med).abs() < 1e-12).all()
    assert (runs["flagged"] == (runs["drift"].abs() > runs["error"].abs())).all()
    assert "steadying the box" in p.stdout and "median |error| per round" in p.stdout and "smoke run" in p.stdout
    assert "the box's own floor" in p.stdout
    # the same capture predicted again on another profile (a what-if on the pricing), no runs
    again = run_module("experiments.held_out", "--replay-only", str(d), "--profile", str(d / "profile.json"))
    assert again.returncode == 0, again.stderr
    assert pd.read_parquet(d / "held-out.parquet")["predicted_s"].tolist() == cells["predicted_s"].tolist()


@pytest.mark.parametrize("args, says", [
    (["--skews", "-1"], "--skews"), (["--batch-sizes", "0"], "--batch-sizes"), (["--seeds", "x"], "--seeds"),
    (["--rounds", "0"], "--rounds"), (["--profile", "h200"], "--profile goes with --replay-only"),
    (["--spread-s", "-1"], "--spread-s"), (["--threads", "0"], "--threads"),
])
def test_bad_flags_are_one_line(tmp_path, args, says):
    assert_clean_error(run_module("experiments.held_out", *args, "--out", str(tmp_path / "o")), says)


def test_replay_only_needs_a_capture(tmp_path):
    assert_clean_error(run_module("experiments.held_out", "--replay-only", str(tmp_path)), "no measured.parquet")


def test_accuracy_has_the_held_out_mode(tmp_path):
    """``experiments.accuracy --held-out`` is the held-out grid, with its flags; elsewhere in
    the line it is one error line."""
    assert_clean_error(run_module("experiments.accuracy", "--held-out", "--rounds", "0", "--out", str(tmp_path / "o")),
                       "--rounds")
    assert_clean_error(run_module("experiments.accuracy", "--device", "cpu", "--held-out"), "--held-out goes first")


def test_the_box_floor_is_how_far_two_halves_of_the_rounds_disagree_past_their_shift():
    """Odd rounds twice as slow everywhere (a slow phase: no floor), but one run 2.4x: 1/6 off."""
    from experiments.held_out import box_floor
    rows = [{"seed": 1, "skew": 0.0, "gen_length": 48, "batch_size": b, "policy": p, "round": r,
             "measured_s": 1.0 if r % 2 == 0 else (2.4 if (b, p) == (8, "tide") else 2.0)}
            for b in (1, 4, 8) for p in ("all", "tide", "static") for r in range(3)]
    med, worst = box_floor(pd.DataFrame(rows))
    assert med == 0.0 and abs(worst - (1 - (1 / 2.4) / 0.5)) < 1e-12
    assert box_floor(pd.DataFrame(rows).query("round == 0")) is None
