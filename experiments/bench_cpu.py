"""Benchmark of the CPU side: expert FFN kernels against the memory's read bandwidth, the head
and sampling per batch size, and tiny generation at one thread.

``python -m experiments.bench_cpu [--model llada2-mini] [--tokens 1,4,16,64] [--dtypes bfloat16,float32]
[--batch-sizes 1,8] [--gen-lengths 128,512] [--threads N] [--json]``

A decoding step reads each routed expert's weights once for a few tokens, so on the CPU the
expert FFN is bound by the memory's read bandwidth, until the tokens' FMAs outrun it. First
the box: its read bandwidth (a sum over 512 MB), its fp32 multiply-add peak (independent FMA
chains in the C library: the compute roof) and torch's fp32 matmul rate (2048^3; MKL on an
AMD CPU sits well under the roof). Then, per
dtype, every expert kernel the CPU runs (``loop``: torch's matmul chain, what ran before the
``fused`` C kernel; ``grouped``: ``torch._grouped_mm``; ``fused``: :mod:`runtime.cpu_kernel`)
over 64 experts of the model's shape (more than the caches hold) at each tokens-per-expert:
milliseconds per expert, GB/s of weights read, the fraction of the read bandwidth, and the
fraction of the roofline (the larger of bytes over bandwidth and FMAs over the FMA peak). Then the
head (final norm and ``lm_head`` over the block's 32 rows per request) and the sampling of
those rows, per batch size; then tiny ``runtime.generate`` tokens/s (KV cache) at each
generation length. Medians of ``--reps`` timings.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from runtime.checkpoint import torch_dtype
from runtime.cpu_kernel import fma_peak_gflops
from runtime.decoding import Generator, Sampling, sample
from runtime.experts import KERNELS, ExpertWeights, fused_available
from runtime.make_checkpoint import preset_config, random_model
from runtime.model import Linear
from runtime.profile_tables import expert_bytes_read, read_bandwidth_gbps, timer
from traces.common.cli import ArgumentParser, comma_list, integer, print_json, run_cli
from traces.common.values import need_int, need_str
from traces.formats.shapes import ModelShape
from traces.formats.trace_file import Decoding


def median_s(fn, reps: int) -> float:
    """The profiler's own timing: the median of ``reps`` runs after one warm-up."""
    return timer(torch.device("cpu"))(fn, reps)


def matmul_gflops(reps: int) -> float:
    """torch's fp32 matmul rate (2048^3, MKL): what a library reaches of the FMA peak."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048 ** 3 / median_s(lambda: a @ b, reps) / 1e9


def kernels_for(dtype: torch.dtype) -> list[str]:
    """The kernels the CPU runs for this dtype (``fused`` only for bf16, where it was built)."""
    return [k for k in KERNELS if k != "fused" or (dtype == torch.bfloat16 and fused_available())]


def expert_rows(shape: ModelShape, dtypes: list[str], tokens: list[int], read: float, peak: float,
                reps: int, experts: int = 64) -> list[dict]:
    H, I = shape.hidden, shape.moe_intermediate
    g = torch.Generator().manual_seed(0)
    rows = []
    for dt in dtypes:
        d = torch_dtype(dt)
        mk = lambda *s: torch.empty(*s, dtype=d).uniform_(-0.03, 0.03, generator=g)  # noqa: E731  (timing only)
        w = ExpertWeights(mk(experts, I, H), mk(experts, I, H), mk(experts, H, I))
        nbytes = expert_bytes_read(H, I, d)
        idx = np.arange(experts)
        for t in tokens:
            x = mk(experts * t, H) * 30
            out = torch.empty_like(x)
            bounds = np.arange(experts + 1) * t
            bound_s = max(nbytes / (read * 1e9), 3 * H * I * t * 2 / (peak * 1e9))  # per expert
            for name in kernels_for(d):
                s = median_s(lambda: KERNELS[name](x, out, bounds, idx, w, idx), reps) / experts
                rows.append({"dtype": dt, "kernel": name, "tokens_per_expert": t, "ms_per_expert": 1e3 * s,
                             "gbps": nbytes / s / 1e9, "of_read": nbytes / s / 1e9 / read, "of_roofline": bound_s / s})
    return rows


def head_rows(shape: ModelShape, dtypes: list[str], batch_sizes: list[int], reps: int) -> list[dict]:
    """The head over 32 rows per request (a block's first step) and the greedy sampling of them."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for dt in dtypes:
        d = torch_dtype(dt)
        lm_head = Linear(shape.hidden, shape.vocab, bias=False, dtype=d).requires_grad_(False)  # the model's own
        with torch.no_grad():
            lm_head.weight.uniform_(-0.03, 0.03, generator=g)
        norm = torch.ones(shape.hidden, dtype=d)
        for b in batch_sizes:
            h = torch.empty(32 * b, shape.hidden, dtype=d).uniform_(-1, 1, generator=g)
            head = lambda: lm_head(F.rms_norm(h, (shape.hidden,), norm, 1e-6)).float()  # noqa: E731
            logits = head()
            s_head = median_s(head, reps)
            s_sample = median_s(lambda: sample(logits, Sampling(), None), reps)
            rows.append({"dtype": dt, "batch_size": b, "rows": 32 * b, "head_ms": 1e3 * s_head,
                         "sample_ms": 1e3 * s_sample})
    return rows


def generate_rows(gen_lengths: list[int], dtypes: list[str], reps: int) -> list[dict]:
    """Tiny ``runtime.generate`` tokens/s, KV cache, 32-token prompt."""
    rows = []
    for dt in dtypes:
        model = random_model(preset_config("tiny"), seed=0, dtype=dt, router_skew=0.25)
        prompt = list(range(1, 33))
        for n in gen_lengths:
            gen = Generator(model, Decoding(32, 32, 0.95, True))
            s = median_s(lambda: gen.generate(prompt, n), reps)
            rows.append({"dtype": dt, "gen_length": n, "tokens_per_s": n / s, "seconds": s})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.bench_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llada2-mini", help="a model shape (traces/data/models)")
    ap.add_argument("--tokens", default="1,4,16,64", help="tokens per expert")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--batch-sizes", default="1,8", help="of the head and sampling (32 rows per request)")
    ap.add_argument("--gen-lengths", default="128,512", help="of tiny runtime.generate")
    ap.add_argument("--threads", type=integer, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--reps", type=integer, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    shape = ModelShape.named(a.model)
    tokens = comma_list(a.tokens, "--tokens", integer, "integers")
    for t in tokens:
        need_int(t, "--tokens", lo=1, hi=4096)
    dtypes = comma_list(a.dtypes, "--dtypes", lambda v: need_str(v, "--dtypes", ("bfloat16", "float32")))
    batch_sizes = comma_list(a.batch_sizes, "--batch-sizes", integer, "integers")
    for b in batch_sizes:
        need_int(b, "--batch-sizes", lo=1, hi=256)
    gens = comma_list(a.gen_lengths, "--gen-lengths", integer, "integers")
    for n in gens:
        need_int(n, "--gen-lengths", lo=1, hi=4096)
    need_int(a.reps, "--reps", lo=1, hi=1000)
    if a.threads is not None:
        need_int(a.threads, "--threads", lo=1, hi=1024)
        torch.set_num_threads(a.threads)
    read = read_bandwidth_gbps(torch.device("cpu"), 1 << 29, a.reps)
    matmul = matmul_gflops(a.reps)
    peak = fma_peak_gflops(a.reps) or matmul  # without the C library, the best rate torch shows
    experts = pd.DataFrame(expert_rows(shape, dtypes, tokens, read, peak, a.reps))
    head = pd.DataFrame(head_rows(shape, dtypes, batch_sizes, a.reps))
    gen = pd.DataFrame(generate_rows(gens, dtypes, a.reps))
    box = {"threads": torch.get_num_threads(), "read_gbps": read, "fma_gflops": peak, "matmul_gflops": matmul}
    if a.json:
        print_json({"box": box, "experts": experts.to_dict("records"), "head": head.to_dict("records"),
                    "generate": gen.to_dict("records")})
        return 0
    print(f"box: {box['threads']} threads, read bandwidth {read:.1f} GB/s, fp32 FMA peak {peak:.0f} GFLOP/s, "
          f"torch fp32 matmul {matmul:.0f} GFLOP/s")
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(f"\nexpert FFN, {shape.name} shape (hidden {shape.hidden}, intermediate {shape.moe_intermediate}), "
              "64 experts a call")
        print(experts.to_string(index=False))
        print("\nhead (norm + lm_head over 32 rows per request) and greedy sampling")
        print(head.to_string(index=False))
        print("\ntiny runtime.generate, KV cache, 32-token prompt")
        print(gen.to_string(index=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
