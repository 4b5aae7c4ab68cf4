"""The C kernels for bf16 weights on the CPU: torch's numbers up to a sum's order, a row's
result independent of what shares its call, and torch's kernels where none can be built."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.cpu_kernel import library, linear_bf16
from runtime.experts import ExpertWeights, choose_kernel, fused_experts, run_experts
from runtime.model import Linear

pytestmark = pytest.mark.skipif(library() is None, reason="no C compiler on this machine")


def _experts(E=6, H=40, I=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.2).to(torch.bfloat16)  # noqa: E731
    return ExpertWeights(mk(E, I, H), mk(E, I, H), mk(E, H, I)), mk(64, H) * 5


def test_fused_experts_are_torchs_up_to_rounding_and_each_row_its_own():
    """Odd sizes (tails past the 8-wide vectors), experts with 0, 1, 5 and 13 rows (a block of
    four, three of eight), listed out of order, with a stack index that is not the identity."""
    w, x = _experts(E=12)
    counts = np.array([5, 0, 13, 1, 7, 2, 3, 40, 1, 1, 2, 6])  # 40: two blocks of the expert's tokens
    bounds = np.concatenate([[0], np.cumsum(counts)])
    tokens = torch.cat([x, x])[: bounds[-1]].contiguous()
    experts = np.array([4, 0, 2, 3, 1, 6, 7, 8, 9, 10, 11])  # 11 listed: each thread runs whole experts
    index = np.array([5, 1, 0, 3, 2, 4, 11, 10, 9, 8, 7, 6])
    got = torch.full_like(tokens, 7.0)
    fused_experts(tokens, got, bounds, experts, w, index)
    want = torch.full_like(tokens, 7.0)
    run_experts(tokens, want, bounds, experts, w, index)
    assert (got[bounds[5]:bounds[6]] == 7.0).all()  # expert 5 was not listed: its rows untouched
    diff = (got.float() - want.float()).abs().max()
    assert diff <= 0.02 * want.float().abs().max()  # bf16 rounding of sums taken in another order
    assert (got == want).float().mean() > 0.9
    for e in experts:  # every row alone (threads split the one expert) gives what it got beside the others
        for r in range(bounds[e], bounds[e + 1]):
            alone = torch.empty(1, tokens.shape[1], dtype=torch.bfloat16)
            fused_experts(tokens[r:r + 1], alone, np.array([0, 1]), np.array([0]), w, np.array([index[e]]))
            assert torch.equal(alone[0], got[r])


def test_fused_falls_back_to_torch_where_it_does_not_apply():
    w, x = _experts()
    w32 = ExpertWeights(w.gate.float(), w.up.float(), w.down.float())
    tokens = x[:6].float()
    bounds, idx = np.array([0, 4, 6]), np.array([0, 1])
    got, want = torch.empty_like(tokens), torch.empty_like(tokens)
    fused_experts(tokens, got, bounds, idx, w32, idx)
    run_experts(tokens, want, bounds, idx, w32, idx)
    assert torch.equal(got, want)  # fp32: the matmul chain itself (row-exact mode's numbers)
    assert choose_kernel(torch.device("cpu"), torch.float32, 40, 24)[0] == "loop"


@pytest.mark.parametrize("bias", [False, True])
def test_linear_is_torchs_up_to_rounding(bias):
    g = torch.Generator().manual_seed(1)
    lin = Linear(37, 300, bias=bias, dtype=torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(300, 37, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(300, generator=g))
    x = torch.randn(2, 45, 37, generator=g).to(torch.bfloat16)
    got = linear_bf16(x, lin.weight, lin.bias)
    want = F.linear(x, lin.weight, lin.bias)
    assert got.shape == want.shape == (2, 45, 300) and got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()
    assert torch.equal(linear_bf16(x[1, 3:4], lin.weight, lin.bias)[0], got[1, 3])  # a row is its own


def test_without_a_compiler_torchs_kernels_run(tmp_path):
    code = ("from runtime.cpu_kernel import library; from runtime.experts import choose_kernel; import torch; "
            "print(library(), choose_kernel(torch.device('cpu'), torch.bfloat16, 16, 8)[0])")
    for env in ({"CC": "/bin/false"}, {"TIDE_C_KERNELS": "0"}):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "TIDE_CACHE": str(tmp_path / "cache"), **env})
        assert out.returncode == 0, out.stderr
        lib, kernel = out.stdout.split()
        assert lib == "None" and kernel in ("loop", "grouped")


def test_bench_cpu_prints_every_kernel_against_the_read_bandwidth():
    from conftest import run_module
    p = run_module("experiments.bench_cpu", "--tokens", "1", "--dtypes", "bfloat16", "--batch-sizes", "1",
                   "--gen-lengths", "8", "--reps", "1", "--json")
    assert p.returncode == 0, p.stderr
    import json
    d = json.loads(p.stdout)
    assert d["box"]["read_gbps"] > 0 and d["box"]["fma_gflops"] > 0 and d["box"]["matmul_gflops"] > 0
    assert {r["kernel"] for r in d["experts"]} == {"loop", "grouped", "fused"}
    assert all(r["gbps"] > 0 and 0 < r["of_roofline"] for r in d["experts"])
    assert d["head"][0]["rows"] == 32 and d["head"][0]["head_ms"] > 0 and d["generate"][0]["tokens_per_s"] > 0
