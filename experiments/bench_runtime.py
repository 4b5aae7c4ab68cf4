"""Benchmark of plain generation (every expert where the model runs): ms per forward and
tokens/s with and without the KV cache.

``python -m experiments.bench_runtime [--preset tiny|mini|flash] [--layers N] [--device cpu|cuda]
[--dtype D] [--prompt-length 32] [--gen-length 64] [--checkpoint-dir DIR]``

A random checkpoint of the preset is written once under ``--checkpoint-dir`` (default
``out/checkpoints``) and reused. Prints one table; ``--json`` prints the rows instead.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from runtime.checkpoint import load_model
from runtime.decoding import Generator, warm_up
from runtime.device import check_device, timed
from runtime.make_checkpoint import preset_config, write_checkpoint
from traces.cli import ArgumentParser, integer, print_json, run_cli
from traces.trace import Decoding


def ensure_checkpoint(folder: Path, preset: str, layers: int | None, seed: int = 0) -> Path:
    name = f"{preset}-{layers}l" if layers else preset
    path = folder / name
    if not (path / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        dtype = "float32" if preset == "tiny" else "bfloat16"
        write_checkpoint(path, preset_config(preset, layers), seed=seed, dtype=dtype, router_skew=0.25, progress=True)
    return path


def bench(model, prompt_length: int, gen_length: int, kv: bool, device: torch.device) -> dict:
    prompt = list(range(1, prompt_length + 1))
    dec = Decoding(32, 32, 0.95, kv)
    warm_up(model, dec, prompt)
    r, s = timed(device, lambda: Generator(model, dec).generate(prompt, gen_length))
    return {"kv_cache": kv, "forwards": r.forwards, "seconds": s, "ms_per_forward": 1e3 * s / r.forwards,
            "tokens": len(r.tokens), "tokens_per_s": len(r.tokens) / s}


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m experiments.bench_runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=integer, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--prompt-length", type=integer, default=32)
    ap.add_argument("--gen-length", type=integer, default=64)
    ap.add_argument("--checkpoint-dir", default="out/checkpoints")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    device = check_device(a.device)
    path = ensure_checkpoint(Path(a.checkpoint_dir), a.preset, a.layers)
    t0 = time.perf_counter()
    model = load_model(path, device=device, dtype=a.dtype, experts_device=device)
    load_s = time.perf_counter() - t0
    rows = [dict(preset=a.preset, layers=model.cfg.shape.layers, dtype=str(model.dtype).removeprefix("torch."),
                 device=str(device), load_s=load_s, **bench(model, a.prompt_length, a.gen_length, kv, device))
            for kv in (True, False)]
    if a.json:
        print_json(rows)
    else:
        print(pd.DataFrame(rows).round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
