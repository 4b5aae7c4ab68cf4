"""The device check in CPU mode (tiny preset, the CPU as the fast device): every run, the
token agreement with `all`, the cost model's bound, the table and the JSON."""
import json

from conftest import run_module


def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    p = run_module("experiments.gpu_check", "--quick", "--device", "cpu", "--out", str(out), timeout=900)
    assert p.returncode == 0, p.stderr
    d = json.loads(out.read_text())
    runs = d["runs"]
    cases = {(r["case"], r["kv_cache"], r["total_tokens"]) for r in runs}
    assert ("all", False, 64) in cases and ("all", True, 256) in cases and ("tide B=16 tau=4", False, 256) in cases
    assert {r["case"] for r in runs} >= {"all", "cpu", "static B=8", "swap B=16", "tide B=8 tau=1", "tide B=16 tau=4",
                                        "mixed B=8/16"}
    assert all(r["tokens_agree"] and r["tokens_identical"] for r in runs)  # exact on the CPU
    assert all(r["bound_ms_per_forward"] > 0 and r["measured_over_bound"] > 0 for r in runs)
    assert d["device"] == "cpu" and d["profile"]["format"] == "tide-profile"
    assert "measured_over_bound" in p.stdout


def test_device_check_batched_step_on_cpu(tmp_path):
    """The prepared GPU script's batched step, for real on the CPU (tiny preset, batch 1 and 8
    here; 1, 8 and 32 on the GPU) under all and tide, each request's tokens checked against all."""
    _device_check(tmp_path, STEPS="batches", BATCH_PRESET="tiny", BATCH_SIZES="1,8", BATCH_GEN="32")
    d = json.loads((tmp_path / "dev" / "batches.json").read_text())
    rows = d["rows"]
    assert {(r["batch_size"], r["policy"]) for r in rows} == {(b, p) for b in (1, 8) for p in ("all", "tide")}
    assert all(r["tokens_agree"] and r["tokens_identical"] for r in rows)
    assert all(r["tokens_per_s"] > 0 and r["ms_per_forward"] > 0 for r in rows)


def test_device_check_kernel_step_on_cpu(tmp_path):
    """The prepared GPU script's kernel step (which kernel the engine picks, each timed), on the
    CPU at one small size: it once imported choose_kernel from the wrong module."""
    _device_check(tmp_path, STEPS="kernels", KERNEL_MODELS="llada2-mini", KERNEL_SIZES="8x4")
    d = json.loads((tmp_path / "dev" / "kernels.json").read_text())
    assert d["llada2-mini 8x4"]["chosen"] == "loop" and d["llada2-mini 8x4"]["loop"] > 0  # fp32 on the CPU


def _device_check(tmp_path, **env: str) -> None:
    """``experiments/device_check.sh`` on the CPU with these settings, each step's status 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "experiments" / "device_check.sh"
    p = subprocess.run(["bash", str(script), str(tmp_path / "dev"), "cpu"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, **env, "PYTHON": sys.executable})  # this interpreter
    assert p.returncode == 0, p.stderr
    status = (tmp_path / "dev" / "status.txt").read_text().split()
    assert status == [w for step in env["STEPS"].split() for w in (step, "0")], p.stdout
