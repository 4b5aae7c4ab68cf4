"""The batched device check: tokens/s against the batch size, and the lossless rule in a batch.

``python -m experiments.batch_check [--preset mini --layers 3] [--device cuda] [--batch-sizes 1,8,32]
[--gen-length 64] [--out FILE.json]``

For each batch size ``b``, ``b`` requests (distinct prompts) decode together under ``all``
(every expert resident) and under ``tide`` (a quarter of the experts, tau 4, the model's own
router); each request's tokens under ``tide`` must agree with ``all``'s in the same batched
run, by the lossless rule (:mod:`runtime.lossless`: exactly on the CPU, differences only
from a near-tie on a GPU), and on the CPU also with the request's own batch-1 run. Prints
tokens/s, forwards/s and ms per forward per batch size and policy, the speedup over the
smallest batch, and fails with one line if a run's tokens disagree or if the trace recorded
of a ``tide`` batch (format v2) differs from the engine's counts. Needs only ``runtime``
and ``traces`` (the GPU box's own Python); ``experiments/device_check.sh`` runs it.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from traces.common.checks import check_batch_size
from traces.common.cli import ArgumentParser, comma_list, integer, run_cli
from traces.common.errors import TideError
from traces.common.files import atomic_write, check_out_path

if TYPE_CHECKING:
    import torch

    from runtime.model import LLaDA2


def main(argv: list[str] | None = None) -> int:
    from experiments.bench_runtime import ensure_checkpoint
    ap = ArgumentParser(prog="python -m experiments.batch_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--layers", type=integer, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--prompt-length", type=integer, default=32)
    ap.add_argument("--gen-length", type=integer, default=64)
    ap.add_argument("--checkpoint-dir", default="out/checkpoints")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    sizes = comma_list(a.batch_sizes, "--batch-sizes", lambda v: check_batch_size(integer(v), "--batch-sizes"),
                       "integer values")
    if a.out is not None:
        check_out_path(a.out)
    import torch

    from runtime.checkpoint import load_model
    from runtime.device import check_device
    device = check_device(a.device)
    path = ensure_checkpoint(Path(a.checkpoint_dir), a.preset, a.layers if a.preset != "tiny" else None)
    model = load_model(path, device=device, dtype="bfloat16" if device.type == "cuda" else "float32",
                       experts_device="cpu")
    vocab = model.cfg.shape.vocab - 3
    top = max(sizes)
    prompts = [[1 + (i * 997 + j) % vocab for j in range(a.prompt_length)] for i in range(top)]
    rows, failures = _batched_runs(model, device, sizes, prompts, a.gen_length)
    df = pd.DataFrame(rows)
    base = df[df["batch_size"] == min(sizes)].set_index("policy")["tokens_per_s"]
    df["speedup_vs_smallest"] = [r.tokens_per_s / base[r.policy] for r in df.itertuples()]
    print(df.round(3).to_string(index=False))
    if a.out is not None:
        meta = {"device": str(device), "torch": torch.__version__, "preset": a.preset, "checkpoint": str(path),
                "gen_length": a.gen_length, "prompt_length": a.prompt_length}
        text = json.dumps({**meta, "rows": df.to_dict(orient="records")}, indent=1) + "\n"
        atomic_write(a.out, lambda tmp: tmp.write_text(text))
    if failures:
        raise TideError("the lossless rule does not hold in a batch: " + "; ".join(failures))
    print("tokens agree with all in every batch" + (f"; wrote {a.out}" if a.out else ""))
    return 0


def _batched_runs(model: "LLaDA2", device: "torch.device", sizes: list[int], prompts: list[list[int]],
                  gen_length: int) -> tuple[list[dict], list[str]]:
    """At each batch size, ``all`` then ``tide``: tokens/s, forwards, and each request's tokens
    against ``all``'s (and, on the CPU, its batch-1 run's); the rows and any failures."""
    from runtime.capture import TraceRecorder
    from runtime.decoding import Generator, warm_up
    from runtime.device import timed
    from runtime.lossless import agree
    from runtime.offload import OffloadEngine
    from traces.formats.trace_file import Decoding
    from traces.policies.spec import Policy
    dec = Decoding(32, 32, 0.95, True)
    s = model.cfg.shape
    L, E = s.n_moe_layers, s.experts
    exact = device.type == "cpu"
    rows, failures, solo = [], [], {}
    for b in sizes:
        ref = None
        for name, policy in (("all", Policy.make("all", L, E)),
                             ("tide", Policy.make("tide", L, E, budget=max(1, E // 4), tau=4))):
            rec = TraceRecorder(model, dec, "bfloat16" if device.type == "cuda" else "float32") \
                if name == "tide" else None
            with OffloadEngine(model, policy, device) as eng, rec or nullcontext():
                gen = Generator(model, dec, engine=eng, margins=True, recorder=rec)
                warm_up(model, dec, prompts[0], engine=eng)
                res, sec = timed(device, lambda: gen.generate_batch(prompts[:b], [gen_length] * b, b))
            if rec is not None:  # the batched trace (format v2) holds what the engine routed, forward by forward
                trace = rec.trace()
                if not np.array_equal(trace.forward_counts(), np.stack(eng.forward_counts)):
                    failures.append(f"batch {b}: the recorded trace's counts differ from the engine's")
            if name == "all":
                ref = res
                if b == min(sizes):
                    solo.update({i: r for i, r in enumerate(res)} if b == 1 else {})
            checks = [agree(x, y, exact) for x, y in zip(ref, res)]
            if exact and b > 1 and solo:  # on the CPU a request's tokens are its batch-1 run's too
                checks.append(agree(solo[0], res[0], True))
            bad = [c.detail for c in checks if not c.ok]
            if bad:
                failures.append(f"batch {b} {name}: {bad[0]}")
            tokens = sum(len(r.tokens) for r in res)
            F = gen.forwards_run
            rows.append({"batch_size": b, "policy": name, "tokens": tokens, "forwards": F, "seconds": sec,
                         "tokens_per_s": tokens / sec, "forwards_per_s": F / sec, "ms_per_forward": 1e3 * sec / F,
                         "tokens_agree": not bad, "tokens_identical": all(c.identical for c in checks)})
    return rows, failures


if __name__ == "__main__":
    run_cli(main)
