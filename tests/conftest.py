"""Shared fixtures: reduced LLaDA2.0 shapes and small synthetic traces (fast on 2 cores)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# One thread per test process: pytest-xdist runs a worker per core, and two workers whose
# OpenMP threads spin on the same two cores slow each other to a crawl. Set before torch
# starts its thread pool; subprocesses the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from traces.formats.shapes import ModelShape
from traces.workloads.synthetic import synthesize


@pytest.fixture(scope="session")
def small_shape() -> ModelShape:
    """LLaDA2.0-mini's layout, reduced: 3 layers (1 dense), 32 experts, top-4 of 4 groups."""
    return ModelShape.named("llada2-mini").replace(
        name="small", num_hidden_layers=3, num_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        moe_intermediate_size=32, vocab_size=300)


@pytest.fixture(scope="session")
def small_trace(small_shape):
    return synthesize(small_shape, gen_length=96, prompt_length=40, seed=3, requests=2)


@pytest.fixture(scope="session")
def small_trace_nokv(small_shape):
    return synthesize(small_shape, gen_length=96, prompt_length=40, seed=3, kv_cache=False)


def run_module(*args: str, timeout: float = 300, real: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m MODULE ARGS`` as a user would and capture its output: its ``main``
    through :func:`traces.common.cli.run_cli` in this process (what the command line does, less
    the interpreter's start-up), or with ``real=True`` in a new process, for the few tests
    where the process itself is under test."""
    if real:
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)
    import contextlib
    import importlib
    import io
    import signal

    from traces.common.cli import run_cli
    main = importlib.import_module(args[0]).main
    out, err = io.StringIO(), io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)
    code: int = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_cli(main, list(args[1:]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """One ``error:`` line on stderr naming what is wrong, non-zero exit, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random checkpoint (fp32, router skew 0.25), made once per test session."""
    from runtime.make_checkpoint import preset_config, write_checkpoint
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    return write_checkpoint(out, preset_config("tiny"), seed=0, dtype="float32", router_skew=0.25)


@pytest.fixture(scope="session")
def tiny_profile(tiny_ckpt, tmp_path_factory):
    """This box measured quickly for the tiny checkpoint's shapes (fast device: the CPU)."""
    import torch

    from runtime.config import ModelConfig
    from runtime.profile import profile_box
    prof = profile_box(ModelConfig.load(tiny_ckpt), torch.device("cpu"), "float32", quick=True, progress=False)
    path = tmp_path_factory.mktemp("prof") / "tiny-cpu.json"
    prof.write(path)
    return path


@pytest.fixture(scope="session")
def validated(tmp_path_factory, worker_id):
    """The whole loop on a tiny checkpoint, once per test session (``experiments.loop``:
    checkpoint, capture, profile, plan, validate, each through its command's own ``main``):
    the first xdist worker to ask runs it into the session's shared folder, the others wait
    on a lock and read it (its tests only read it). Paths of its files, and what it printed."""
    import contextlib
    import fcntl
    import io
    import json

    from experiments.loop import run
    shared = worker_id != "master"  # under xdist: the workers' base folders share a parent
    root = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.mktemp("loop")
    done = root / "loop-shared.json"
    with open(root / "loop-shared.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                paths = run(root / "loop-shared", rounds=1)
            done.write_text(json.dumps({"paths": {k: str(v) for k, v in paths.items()}, "stdout": printed.getvalue()}))
    got = json.loads(done.read_text())
    return {**{k: Path(v) for k, v in got["paths"].items()}, "stdout": got["stdout"]}
