"""Installed as users install it: a wheel built from the checkout carries every file a command
reads, and its commands run from an empty folder (no checkout on the path)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_installed_elsewhere_runs_its_commands_from_an_empty_folder(tmp_path):
    src = tmp_path / "src"  # the checkout's own files, so the build leaves nothing behind in it
    for name in ("traces", "runtime", "sim", "experiments"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(src)], check=True, capture_output=True, timeout=300)
    env_dir = tmp_path / "env"  # a fresh environment; what the wheel needs comes from this Python's packages
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    wheel = next(wheels.glob("tide-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run([str(py), "-c", "import traces, experiments; print(traces.__file__, experiments.__file__)"],
                           cwd=empty, capture_output=True, text=True, check=True).stdout
    assert str(env_dir) in where and str(ROOT) not in where, where  # the installed copy, not the checkout
    synth = subprocess.run([str(py), "-m", "traces.synth", "--model", "llada2-mini", "--gen-length", "32",
                            "--prompt-length", "32", "--out", "t.parquet"], cwd=empty, capture_output=True, text=True)
    assert synth.returncode == 0, synth.stderr
    replay = subprocess.run([str(py), "-m", "sim.replay", "--trace", "t.parquet", "--profile", "rtx4090",
                             "--policy", "tide", "--gpu-mem-gb", "8", "--json"], cwd=empty, capture_output=True, text=True)
    assert replay.returncode == 0, replay.stderr
    assert (empty / "t.parquet").is_file()
    shutil.rmtree(src)
