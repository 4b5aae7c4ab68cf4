"""Sweeps: points, resume after an interruption, the Dask executor, grids from TOML, what-if boxes."""
import numpy as np
import pandas as pd
import pytest
from conftest import assert_clean_error, run_module

from experiments import sweep_points
from experiments.sweep import Study, run_points, studies_from_toml, sweep
from traces.costs.whatif import scale_profile
from traces.formats.profile_file import Profile

GRID = [Study("t", models=["llada2-mini"], gen_lengths=[32], gpu_mem_gb=[8, 16], taus=[1, 4])]
VOLATILE = ["solve_s"]  # wall-clock seconds of the solver


def _stable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in VOLATILE if c in df]).sort_values(["key", "policy", "tau", "budget"]) \
        .reset_index(drop=True)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    df, stats = sweep(GRID, out, jobs=1, progress=False, figures=True)
    return out, df, stats


def test_a_point_prices_every_policy_and_the_plan_wins(first):
    out, df, stats = first
    assert stats == {**stats, "points": 2, "evaluated": 2, "reused": 0}
    assert set(df["policy"]) == {"cpu", "static", "swap", "tide_tau1", "tide tau=4", "plan"}
    for _, g in df.groupby("key"):
        s = g.set_index("policy")["seconds"]
        assert s["plan"] <= s[["static", "swap", "tide_tau1", "tide tau=4", "cpu"]].min() * 1.0001
        assert (g["speedup_vs_cpu"] == s["cpu"] / g["seconds"]).all()
        plan = g[g["policy"] == "plan"].iloc[0]
        assert plan["plan_vs_best"] >= 0.999 and plan["mixing_gain"] >= 0.999
        assert plan["program_s"] == pytest.approx(plan["seconds"], rel=1e-9)  # the program's price is the replay's
        assert len(plan["plan_kind"].split()) == len(plan["plan_budget"].split()) == 19
    assert (out / "plan_kinds.png").is_file()
    more_memory = df[df["policy"] == "plan"].sort_values("gpu_mem_gb")["tokens_per_s"].to_numpy()
    assert more_memory[1] > more_memory[0]
    assert (out / "sweep.parquet").is_file() and (out / "tokens_vs_memory.png").is_file()
    assert pd.read_parquet(out / "sweep.parquet").shape == df.shape


def test_a_point_gives_the_same_rows_alone_and_in_a_group_and_uniform_rows_equal_their_replay(first):
    """Points sharing a workload share one replay; each point's rows depend on its own inputs only,
    and a uniform setting read off the shared table is what replaying it gives."""
    from sim.simulate import simulate
    from traces.policies.spec import Policy
    _, df, _ = first
    points = [p for s in GRID for p in s.points()]
    alone = sweep_points.evaluate(points[1])
    in_sweep = df[df["key"] == points[1].key()].drop(columns="planned_batch_size")  # the sweep's, across points
    pd.testing.assert_frame_equal(_stable(alone), _stable(in_sweep), check_exact=False, rtol=1e-9)
    trace = sweep_points.workload("llada2-mini", 32, 64, 0)
    row = alone[alone["policy"] == "swap"].iloc[0]
    L, E = trace.shape.n_moe_layers, trace.shape.experts
    sim = simulate(trace, points[1].box(), Policy.make("swap", L, E, budget=int(row["budget"])))
    assert row["seconds"] == pytest.approx(sim.seconds, rel=1e-9)
    assert row["migrations"] == sim.totals()["migrations"] and row["cpu_tokens"] == 0


def test_resume_redoes_only_missing_points_and_leaves_no_half_written_file(first, tmp_path, monkeypatch):
    out, df, _ = first
    work = tmp_path / "sweep"
    work.mkdir()
    (work / "points").mkdir()
    for f in (out / "points").iterdir():
        (work / "points" / f.name).write_bytes(f.read_bytes())
    victim = sorted((work / "points").iterdir())[0]
    victim.unlink()
    calls = []
    real = sweep_points.point_rows

    def failing(point, *args):
        calls.append(point)
        raise KeyboardInterrupt  # interrupted mid-point

    monkeypatch.setattr("experiments.sweep.point_rows", failing)
    with pytest.raises(KeyboardInterrupt):
        run_points([p for s in GRID for p in s.points()], work, jobs=1, progress=False)
    assert len(calls) == 1 and not victim.exists()  # only the missing point is redone
    assert not [f for f in (work / "points").iterdir() if f.suffix != ".parquet"]
    monkeypatch.setattr("experiments.sweep.point_rows", real)
    df2, stats = sweep(GRID, work, jobs=1, progress=False, figures=False)
    assert stats["evaluated"] == 1 and stats["reused"] == 1
    pd.testing.assert_frame_equal(_stable(df2), _stable(df))


def test_dask_executor_gives_the_local_results(first, tmp_path):
    from distributed import LocalCluster
    _, df, _ = first
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        df2, stats = sweep(GRID, tmp_path / "dask", executor="dask", scheduler=cluster.scheduler_address,
                           progress=False, figures=False)
    assert stats["evaluated"] == 2
    pd.testing.assert_frame_equal(_stable(df2), _stable(df))


def test_grid_from_toml(tmp_path):
    f = tmp_path / "grid.toml"
    f.write_text('models = ["llada2-mini"]\ngen_lengths = 32\n\n[[study]]\nname = "mem"\ngpu_mem_gb = [8, 16]\n\n'
                 '[[study]]\nname = "link"\npcie = [0.5, 2.0]\ncpu_cores = [1.0, 2.0]\nprofiles = "h200"\n')
    mem, link = studies_from_toml(str(f))
    assert mem.name == "mem" and len(mem.points()) == 2 and mem.points()[0].gen_length == 32
    assert len(link.points()) == 4 and {p.profile for p in link.points()} == {"h200"}
    assert len({p.key() for p in mem.points() + link.points()}) == 6


def test_what_if_knobs_change_what_they_touch():
    p = Profile.load("a100-40gb")
    fast = scale_profile(p, pcie=2.0)
    assert fast.transfer_s("h2d", 6291456) == pytest.approx(p.transfer_s("h2d", 6291456) / 2)
    assert fast.cpu_expert_s("2048x512", "bfloat16", 16) == p.cpu_expert_s("2048x512", "bfloat16", 16)
    more = scale_profile(p, cpu_cores=4.0)
    one = p.cpu_expert_s("2048x512", "bfloat16", np.array([1, 256]))
    four = more.cpu_expert_s("2048x512", "bfloat16", np.array([1, 256]))
    assert (four < one).all() and four[1] > one[1] / 4 * 0.99  # compute scales, memory traffic bounds it
    floor = p.overhead("cpu_task_s") + 3 * 2048 * 512 * 2 / (p.capacity("host_mem_bw_gbps") * 1e9)
    assert four[0] >= floor * 0.999
    assert scale_profile(p, gpu_mem_gb=12).capacity("gpu_mem_bytes") == 12e9
    assert "PCIe x2" in fast.name


def test_command_quick_and_bad_input(tmp_path):
    p = run_module("experiments.sweep", "--quick", "--out", str(tmp_path / "q"), "--jobs", "2", "--gen-lengths", "32",
                   "--no-figures")
    assert p.returncode == 0, p.stderr
    assert "4 points (4 evaluated, 0 reused)" in p.stdout and "x_tide tau=1" in p.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[[study]]\nname = 'x'\nspeed = 3\n")
    assert_clean_error(run_module("experiments.sweep", "--grid", str(bad), "--out", str(tmp_path / "b")),
                       "--grid", "unknown key(s) speed")
    assert_clean_error(run_module("experiments.sweep", "--scheduler", "tcp://x:1", "--out", str(tmp_path / "b")),
                       "--scheduler needs --executor dask")
    assert_clean_error(run_module("experiments.sweep", "--policies", "magic", "--models", "llada2-mini",
                                  "--gen-lengths", "32", "--out", str(tmp_path / "b")), "--policies", "magic")


def test_where_swapping_wins_the_plan_swaps_and_no_uniform_setting_beats_it():
    """The default sweep's corner where the tide-only planner lost 3x to swap (flash, 16 GB,
    PCIe x2, CPU cores x0.25): the plan now swaps most layers, beats every uniform setting
    and the best tide-only plan."""
    point = sweep_points.Point("corner", "a100-40gb", "llada2-flash", gen_length=32, gpu_mem_gb=16, pcie=2.0,
                               cpu_cores=0.25)
    df = sweep_points.evaluate(point)
    plan = df[df["policy"] == "plan"].iloc[0]
    assert plan["plan_vs_best"] >= 0.999
    assert (df.loc[df["policy"] != "plan", "seconds"] >= plan["seconds"] * 0.999).all()
    kinds = plan["plan_kind"].split()
    assert kinds.count("swap") > len(kinds) // 2 and plan["mixing_gain"] > 1.5
