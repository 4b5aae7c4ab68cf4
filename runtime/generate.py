"""The generation command: load a checkpoint, decode prompts (``runtime.decoding``), report.

``python -m runtime.generate --checkpoint DIR (--prompt TEXT | --prompt-ids 1,2,3 |
--prompts FILE.jsonl) --gen-length N [--batch-size B] [--block-length 32 --steps 32
--threshold 0.95] [--no-kv-cache] [--device cpu|cuda] [--dtype bfloat16|float32] [--seed S]
[--trace-out FILE] [--json] [--policy P ...]``

With ``--batch-size B`` up to ``B`` requests share every forward (continuous batching: a
finished request's seat goes to the next prompt at the very next forward); ``--json``
then lists each request (prompt order) with its tokens, the forwards it took part in and
its start and end seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from runtime.capture import TraceRecorder
from runtime.checkpoint import checkpoint_dtype, drive_files, dtype_name, load_model
from runtime.config import ModelConfig
from runtime.decoding import Decoding, Generator, Sampling, warm_up
from runtime.device import check_device, host_memory_bytes, timed
from runtime.experts import KERNELS
from runtime.offload import OffloadEngine
from runtime.tokenizer import load_tokenizer
from runtime.trace_replay import check_replayable, replay_prompt
from traces.common import checks
from traces.common.checks import resolve_batch_size
from traces.common.cli import ArgumentParser, integer, number, print_json, run_cli
from traces.common.errors import TideError
from traces.common.files import check_out_path
from traces.common.values import need_float, need_int, need_ints
from traces.costs.memory import DEVICE_HEADROOM, MemoryBudget, kv_tokens_for
from traces.formats.plan_file import Plan
from traces.formats.shapes import ModelShape
from traces.formats.trace_file import Trace
from traces.formats.trace_read import load_popularity, read_trace
from traces.policies.kernels import device_only
from traces.policies.spec import Policy, check_policy
from traces.serving.arrivals import read_arrivals
from traces.settings import add_host_flags, parse_budget, resolve_policy


def read_prompts(args: argparse.Namespace, tokenizer: Any) -> list[tuple[list[int], int, str]]:
    """Token ids of every prompt given on the command line, each with its generation length
    (a ``--prompts`` line's own ``gen_length``, else ``--gen-length``) and where it came from."""
    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise TideError(f"--prompt: {args.checkpoint} has no tokenizer; give --prompt-ids instead")
        if args.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise TideError(f"--chat: {args.checkpoint}'s tokenizer has no chat template")
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return list(tokenizer(text)["input_ids"])

    def parse_ids(text: str, where: str) -> list[int]:
        try:
            ids = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise TideError(f"{where}: token ids must be integers separated by commas") from None
        if not ids:
            raise TideError(f"{where}: no token ids")
        return need_ints(ids, where, lo=0)

    given = [a for a in (args.prompt, args.prompt_ids, args.prompts) if a is not None]
    if len(given) != 1:
        raise TideError("give exactly one of --prompt, --prompt-ids, --prompts")
    if args.prompt is not None:
        return [(encode(args.prompt), args.gen_length, "--prompt")]
    if args.prompt_ids is not None:
        return [(parse_ids(args.prompt_ids, "--prompt-ids"), args.gen_length, "--prompt-ids")]
    path = Path(args.prompts)
    if not path.is_file():
        raise TideError(f"--prompts {path}: file not found")
    prompts = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise TideError(f"{path}: not UTF-8 text") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise TideError(f"{path}:{i}: not a JSON object") from None
        if not isinstance(obj, dict):
            raise TideError(f"{path}:{i}: each line needs \"prompt\" (text) or \"prompt_ids\" (list of ids)")
        g = args.gen_length if obj.get("gen_length") is None else need_int(obj["gen_length"], f"{path}:{i}: gen_length", lo=1)
        if "prompt_ids" in obj:
            prompts.append((need_ints(obj["prompt_ids"], f"{path}:{i}: prompt_ids", lo=0), g, f"{path}:{i}"))
        elif isinstance(obj.get("prompt"), str):
            prompts.append((encode(obj["prompt"]), g, f"{path}:{i}"))
        else:
            raise TideError(f"{path}:{i}: each line needs \"prompt\" (text) or \"prompt_ids\" (list of ids)")
    if not prompts:
        raise TideError(f"{path}: no prompts")
    return prompts


def add_generation_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--checkpoint", required=True, help="folder with config.json and safetensors")
    ap.add_argument("--prompt", help="text (needs the checkpoint's tokenizer)")
    ap.add_argument("--prompt-ids", help="comma-separated token ids")
    ap.add_argument("--prompts", help="JSONL file, one {\"prompt\": ...} or {\"prompt_ids\": [...]} per line "
                    "(optionally with its own \"gen_length\")")
    ap.add_argument("--batch-size", type=checks.batch_size, default=None,
                    help="requests sharing each forward (continuous batching; default: the plan's with --policy "
                         "plan, else 1: one after another; with --replay-trace, the trace's recorded forwards)")
    ap.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    ap.add_argument("--gen-length", type=integer, default=None,
                    help="tokens to generate per prompt (not with --replay-trace: the trace's)")
    ap.add_argument("--block-length", type=integer, default=32)
    ap.add_argument("--steps", type=integer, default=32)
    ap.add_argument("--threshold", type=number, default=0.95)
    ap.add_argument("--temperature", type=number, default=0.0)
    ap.add_argument("--top-k", type=integer, default=0)
    ap.add_argument("--top-p", type=number, default=1.0)
    ap.add_argument("--seed", type=checks.seed, default=0)
    ap.add_argument("--no-kv-cache", action="store_true", help="re-run the whole prefix each step")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: the checkpoint's)")
    ap.add_argument("--trace-out", help="record the run as a trace (Parquet)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--policy", default=None, help="offload policy: all, cpu, static, swap, tide or plan "
                    "(default: no offload engine, every expert where the model runs)")
    ap.add_argument("--tau", type=integer, default=None, help="tide: refresh interval in denoising steps")
    ap.add_argument("--gpu-experts", default=None, help="expert slots per MoE layer on the fast device (one number, or one per layer)")
    ap.add_argument("--gpu-mem-gb", type=number, default=None, help="fast-device memory limit; the budget is what fits")
    ap.add_argument("--plan", default=None, help="plan JSON (per-layer kind, budget and tau) for --policy plan")
    add_host_flags(ap)
    ap.add_argument("--popularity", default=None, help="trace whose total counts fill the slots at setup")
    ap.add_argument("--replay-trace", default=None, help="run a KV-cache trace's schedule and expert choices")
    ap.add_argument("--arrivals", default=None, help="file of arrival offsets (seconds, one per line, one per "
                    "request): each request is held until its offset from the run's start")
    ap.add_argument("--expert-kernel", default="auto", choices=("auto", *KERNELS),
                    help="the fast device's expert kernel: one matmul chain per expert (loop), or grouped matmuls "
                         "(torch._grouped_mm); auto measures which is faster, once per process and shape")


def placement(args: argparse.Namespace, shape: ModelShape, dtype: str, device: torch.device,
              kv_tokens: int) -> tuple[Policy, np.ndarray | None, dict[int, list[int]]] | None:
    """The policy the flags ask for (None without ``--policy``), its popularity counts, and
    the experts to load straight onto the fast device (model layer id -> ids: those that
    never leave it, :func:`traces.policies.kernels.device_only`); the GPU budget and the host
    memory the rest needs are checked here, before anything loads."""
    if args.policy is None:
        if args.expert_kernel != "auto":
            raise TideError("--expert-kernel needs --policy (it is the offload engine's)")
        for flag in ("tau", "gpu_experts", "gpu_mem_gb", "plan", "popularity", "host_mem_gb", "host_policy", "host_tau"):
            if getattr(args, flag) is not None:
                raise TideError(f"--{flag.replace('_', '-')} needs --policy")
        return None
    limit = torch.cuda.get_device_properties(device).total_memory * DEVICE_HEADROOM if device.type == "cuda" else None
    policy = resolve_policy(args.policy, shape, dtype, tau=args.tau, gpu_experts=parse_budget(args.gpu_experts),
                            gpu_mem_gb=args.gpu_mem_gb, plan=args.plan, kv_tokens=kv_tokens, mem_limit_bytes=limit,
                            host_mem_gb=args.host_mem_gb, host_policy=args.host_policy, host_tau=args.host_tau,
                            host_bytes=host_memory_bytes())
    popularity = load_popularity(args.popularity, shape) if args.popularity else None
    check_host_memory(policy, shape, dtype, f"--policy {args.policy}")
    drive = policy.drive_layers(shape.experts)
    on = {l: ids for l, ids in device_only(policy, shape.experts, popularity).items() if not drive[l]}
    return policy, popularity, {shape.moe_layers[l]: ids for l, ids in on.items()}


def check_host_memory(policy: Policy, shape: ModelShape, dtype: str, what: str) -> None:
    """The experts the placement keeps in host memory (at most its host budgets, with a host
    tier) fit this machine's memory, or one line naming the budget to give."""
    host = host_memory_bytes()
    mem = MemoryBudget(shape, dtype, float("inf"), host_limit_bytes=host)
    budgets = None if policy.host is None else policy.host.budget
    need = mem.host_need_bytes(policy.kinds, policy.budget, budgets)
    if need > host:
        raise TideError(f"{what}: its experts in host memory need {need / 1e9:.1f} GB, this machine has "
                        f"{host / 1e9:.1f} GB: give --host-mem-gb (at most {host / 1e9:.0f}) to keep only what fits "
                        "there and read the rest from the checkpoint's files")




def _check_flags(args: argparse.Namespace, cfg: ModelConfig) -> Sampling:
    """Every flag checked before anything loads; the sampling settings."""
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed).check(cfg.shape.vocab)
    if args.gen_length is not None:
        need_int(args.gen_length, "--gen-length", lo=1)
    need_int(args.block_length, "--block-length", lo=1)
    need_int(args.steps, "--steps", lo=1)
    need_float(args.threshold, "--threshold", lo=0.0, hi=1.0)
    if args.trace_out is not None:
        check_out_path(args.trace_out, "--trace-out")
    if args.policy is not None:
        check_policy(args.policy)
    return sampling


def _requests(args: argparse.Namespace, replay: Trace | None, tokenizer: Any) -> tuple[Decoding, list, list[tuple[int, int]]]:
    """The decoding settings, the prompts given (none for a replay: the trace's requests) and
    each request's (prompt length, generation length)."""
    if replay is not None:
        if any(a is not None for a in (args.prompt, args.prompt_ids, args.prompts)):
            raise TideError("--replay-trace takes its prompts from the trace; drop --prompt/--prompt-ids/--prompts")
        return replay.decoding, [], [(r["prompt_length"], r["gen_length"]) for r in replay.requests]
    given = read_prompts(args, tokenizer)
    lacking = next((w for _, g, w in given if g is None), None)
    if lacking is not None:
        raise TideError(f"--gen-length is required: {lacking} has no gen_length of its own (with --replay-trace, "
                        "the trace's requests say theirs)")
    decoding = Decoding(args.block_length, args.steps, args.threshold, not args.no_kv_cache)
    return decoding, given, [(len(p), g) for p, g, _ in given]


def _batch_size(args: argparse.Namespace, replay: Trace | None, n_requests: int) -> tuple[int | None, int]:
    """The batch size asked for (the flag, else the plan's; None: a replayed trace's recorded
    forwards) and the one the run uses (:func:`traces.serving.admission.resolve_batch_size`)."""
    plan_batch = Plan.read(args.plan).batch_size if args.plan is not None and args.policy == "plan" else None
    asked = args.batch_size if args.batch_size is not None else plan_batch
    batch_size = resolve_batch_size(asked, trace=replay.batch_size if replay is not None else None)
    if asked is not None and asked > n_requests > 0 and asked > 1:
        print(f"note: batch size {asked} is above the {n_requests} prompts: all run at once", file=sys.stderr)
    return asked, batch_size


def _report(args: argparse.Namespace, device: torch.device, results: list, seconds: float, gen: Generator, engine: OffloadEngine | None,
            policy_meta: dict | None, batch_size: int, decoding: Decoding, tokenizer: Any, replayed: bool) -> dict[str, Any]:
    """The run's figures and tokens (the JSON fields)."""
    n_tokens = sum(len(r.tokens) for r in results)
    steps = sum(r.step_forwards for r in results)
    forwards = gen.forwards_run
    out: dict[str, Any] = {
        "tokens": results[0].tokens if len(results) == 1 else [r.tokens for r in results],
        "forwards": forwards,
        "tokens_per_forward": sum(r.committed for r in results) / max(steps, 1),
        "seconds": seconds,
        "tokens_per_s": n_tokens / seconds if seconds > 0 else 0.0,
        "forwards_per_s": forwards / seconds if seconds > 0 else 0.0,
        "batch_size": batch_size,
        "requests": [{"request": i, "tokens": r.tokens, "forwards": r.forwards, "batch_forwards": r.batch_forwards,
                      "arrival_s": r.arrival_s, "start_s": r.start_s, "end_s": r.end_s,
                      "latency_s": r.end_s - r.arrival_s} for i, r in enumerate(results)],
        "device": str(device), "dtype": dtype_name(gen.model.dtype), "kv_cache": decoding.kv_cache,
        "peak_rss_gb": peak_rss_bytes() / 1e9,
    }
    if engine is not None:
        out["policy"] = policy_meta
        out["expert_kernel"] = engine.kernel
        out.update(engine.totals())
        out.update(engine.timers)
    if tokenizer is not None and not replayed:
        texts = [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in results]
        out["text"] = texts[0] if len(texts) == 1 else texts
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (the page cache not counted)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, warm up, generate every prompt, and report (the JSON fields)."""
    cfg = ModelConfig.load(args.checkpoint)
    sampling = _check_flags(args, cfg)
    device = check_device(args.device)
    replay = read_trace(args.replay_trace) if args.replay_trace else None
    tokenizer = load_tokenizer(args.checkpoint)
    decoding, given, sizes = _requests(args, replay, tokenizer)
    asked, batch_size = _batch_size(args, replay, len(sizes))
    kv_tokens = kv_tokens_for(sizes, decoding.block_length, decoding.kv_cache, batch_size)
    # the policy, checked against the memory with the batch's KV cache, before anything loads
    planned = placement(args, cfg.shape, args.dtype or checkpoint_dtype(args.checkpoint), device, kv_tokens)
    drive_layers = [] if planned is None else \
        [cfg.shape.moe_layers[l] for l in np.flatnonzero(planned[0].drive_layers(cfg.shape.experts))]
    model = load_model(args.checkpoint, device=device, dtype=args.dtype,
                       experts_device="cpu" if args.policy is not None or device.type == "cpu" else device,
                       on_device=planned[2] if planned else None, drive_layers=drive_layers)
    if replay is not None:
        check_replayable(replay, model)
        prompts = [replay_prompt(r["prompt_length"], model.cfg.shape.vocab, (model.cfg.mask_id, model.cfg.eos_id))
                   for r in replay.requests]
        lengths = [r["gen_length"] for r in replay.requests]
    else:
        prompts, lengths = [p for p, _, _ in given], [g for _, g, _ in given]
        Generator(model, decoding).check_prompts(prompts, lengths, [w for _, _, w in given])
    arrivals = read_arrivals(args.arrivals, len(prompts)).offsets if args.arrivals else None
    engine = None
    if planned is not None:
        policy, popularity, _ = planned
        drive = drive_files(args.checkpoint, cfg, set(drive_layers)) if drive_layers else None
        engine = OffloadEngine(model, policy, device, setup_counts=popularity, kernel=args.expert_kernel, drive=drive)
    warm_up(model, decoding, prompts[0], sampling, engine)
    rec = TraceRecorder(model, decoding, dtype_name(model.dtype)) if args.trace_out else None
    total = replay.n_batched if replay is not None and asked is None else None
    bar = tqdm(total=total, desc="generating", unit="forward", disable=not sys.stderr.isatty(), leave=False)
    with engine or nullcontext(), rec or nullcontext(), bar:
        gen = Generator(model, decoding, sampling, rec, engine, progress=bar)
        if replay is not None:
            results, seconds = timed(device, lambda: gen.replay_batch(
                replay, [r["request"] for r in replay.requests], asked, arrivals))
        else:
            results, seconds = timed(device, lambda: gen.generate_batch(prompts, lengths, batch_size, arrivals=arrivals))
    policy_meta = {**engine.policy.to_json(), "popularity": args.popularity} if engine is not None else None
    if rec is not None:
        rec.trace(source={"generator": "runtime.generate", "checkpoint": str(args.checkpoint),
                          "device": str(device), "seed": args.seed, "replay_trace": args.replay_trace},
                  policy=policy_meta).write(args.trace_out)
    return _report(args, device, results, seconds, gen, engine, policy_meta, batch_size, decoding, tokenizer, replay is not None)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m runtime.generate", description=__doc__.split("\n\n")[0])
    add_generation_args(ap)
    args = ap.parse_args(argv)
    out = run(args)
    if args.json:
        print_json(out)
    else:
        texts = out.get("text", out["tokens"])
        for t in (texts if isinstance(texts, list) and texts and isinstance(texts[0], (list, str)) else [texts]):
            print(t)
        print(f"[{out['forwards']} forwards, {out['tokens_per_forward']:.2f} tokens/forward, "
              f"{out['tokens_per_s']:.2f} tokens/s]")
    return 0


if __name__ == "__main__":
    run_cli(main)
