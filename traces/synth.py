"""Synthetic workloads from the command line (the generator: :mod:`traces.workloads.synthetic`).

``python -m traces.synth --model llada2-mini --gen-length 1024 --prompt-length 64 --seed 0 --out t.parquet``
"""
from __future__ import annotations

import time

from traces.common import checks
from traces.common.cli import ArgumentParser, integer, number, run_cli
from traces.common.files import check_out_path
from traces.common.values import need_int
from traces.formats.shapes import ModelShape
from traces.formats.trace_file import Decoding
from traces.workloads.synthetic import request_lengths, synthesize


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m traces.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="llada2-mini, llada2-flash, or a config.json / checkpoint folder")
    ap.add_argument("--gen-length", default="1024", help="one length, a list a,b,c or a range lo:hi "
                    "(each request draws its own, seeded)")
    ap.add_argument("--prompt-length", default="64", help="as --gen-length")
    ap.add_argument("--seed", type=checks.seed, default=0)
    ap.add_argument("--requests", type=integer, default=1, help="prompts (a batch-1 trace: the simulator "
                    "composes them at any batch size)")
    ap.add_argument("--block-length", type=integer, default=32)
    ap.add_argument("--steps", type=integer, default=32)
    ap.add_argument("--threshold", type=number, default=0.95)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-kv-cache", action="store_true", help="re-run the whole prefix each step (published generate())")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    check_out_path(a.out)
    shape = ModelShape.load(a.model)
    dec = Decoding(a.block_length, a.steps, a.threshold, not a.no_kv_cache)
    t0 = time.perf_counter()
    need_int(a.requests, "--requests", lo=1, hi=1 << 16)
    gens = request_lengths(a.gen_length, a.requests, a.seed, "--gen-length")
    prompts = request_lengths(a.prompt_length, a.requests, a.seed, "--prompt-length")
    trace = synthesize(shape, gens, prompts, a.seed, kv_cache=not a.no_kv_cache, decoding=dec,
                       requests=a.requests, dtype=a.dtype, progress=True)
    trace.write(a.out)
    print(f"wrote {a.out}: {trace.n_forwards} forwards, {shape.n_moe_layers} MoE layers, "
          f"{trace.tokens_generated} tokens in {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
