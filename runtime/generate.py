"""Block-diffusion generation as LLaDA2.0 decodes, with an exact block-level KV cache.

The answer is laid out in whole blocks after the prompt, all ``mask_id``. Block by block,
each denoising step predicts every masked position of the current block; positions whose
confidence exceeds ``threshold`` are accepted, or, if fewer than the step's scheduled count
pass, the most confident ones. Greedy by default; temperature / top-k / top-p sampling
with a seed. Generation stops after a block that holds ``eos``; the answer ends at the
first ``eos`` (kept) or at ``gen_length``. These are the published ``generate()``'s
semantics.

With the KV cache (default) a prefill forward caches the prompt's whole blocks, each step
runs only the current block against the cache, and one commit forward writes a finished
block's final keys and values. Attention is block-causal, so this is exact. Without it
(``--no-kv-cache``) every step re-runs the whole prefix, as the published code does.

``python -m runtime.generate --checkpoint DIR (--prompt TEXT | --prompt-ids 1,2,3 |
--prompts FILE.jsonl) --gen-length N [--block-length 32 --steps 32 --threshold 0.95]
[--no-kv-cache] [--device cpu|cuda] [--dtype bfloat16|float32] [--seed S] [--trace-out FILE]
[--json]``
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from runtime.capture import TraceRecorder
from runtime.checkpoint import dtype_name, load_model
from runtime.model import LLaDA2, KVCache, block_causal_mask
from runtime.offload import OffloadEngine
from runtime.replay import ChoiceReplay, check_replayable, replay_prompt
from runtime.tokenizer import load_tokenizer
from traces.cli import ArgumentParser, check_out_path, integer, number, print_json, run_cli
from traces.errors import TideError
from traces.memory import DEVICE_HEADROOM, kv_tokens_for
from traces.policies import POLICIES
from traces.settings import parse_budget, resolve_policy
from traces.trace import Decoding, Trace, load_popularity, read_trace
from traces.values import need_float, need_int, need_ints


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self, vocab: int) -> "Sampling":
        """Values torch would reject mid-run, refused before any work."""
        need_float(self.temperature, "--temperature", lo=0.0)
        need_int(self.top_k, "--top-k", lo=0, hi=vocab)
        need_float(self.top_p, "--top-p", hi=1.0, positive=True)
        need_int(self.seed, "--seed", lo=0)
        return self


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """Tokens each step must accept at least: ``block_length / steps``, remainder first."""
    base, rem = divmod(block_length, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and its probability per row of ``logits [n, vocab]``."""
    if s.temperature == 0:
        tok = logits.argmax(dim=-1, keepdim=True)
        return tok[:, 0], F.softmax(logits, dim=-1).gather(-1, tok)[:, 0]
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, s.top_k)[0][..., -1, None]
        logits = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
    if s.top_p < 1.0:
        srt, order = torch.sort(logits, descending=True)
        drop = torch.cumsum(F.softmax(srt, dim=-1), dim=-1) > s.top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    tok = torch.multinomial(probs, 1, generator=gen)
    return tok[:, 0], probs.gather(-1, tok)[:, 0]


def accept(block: torch.Tensor, tok: torch.Tensor, prob: torch.Tensor, mask_id: int, n: int,
           threshold: float | None = None) -> int:
    """Unmask positions of ``block`` (in place) with their sampled tokens: every masked position
    whose confidence exceeds ``threshold`` if at least ``n`` do, else the ``n`` most confident
    (fewer if fewer are masked). Returns how many were accepted."""
    active = block == mask_id
    conf = torch.where(active, prob, torch.full_like(prob, float("-inf")))
    transfer = conf > threshold if threshold is not None else None
    if transfer is None or int(transfer.sum()) < n:
        transfer = torch.zeros_like(active)
        transfer[torch.topk(conf, k=min(n, int(active.sum()))).indices] = True
    block.copy_(torch.where(transfer, tok, block))
    return int(transfer.sum())


@dataclass
class Result:
    tokens: list[int]
    forwards: int = 0
    step_forwards: int = 0
    committed: int = 0
    seconds: float = 0.0
    #: with ``Generator(margins=True)``, per generated position: the forward that committed
    #: it and its logits' top-2 gap relative to the largest |logit| then (near-tie checks)
    committed_at: list[int] | None = None
    margin: list[float] | None = None


@dataclass
class Generator:
    """Runs prompts one after another on one model (the offload engine keeps its state across them)."""

    model: LLaDA2
    decoding: Decoding = field(default_factory=Decoding)
    sampling: Sampling = field(default_factory=Sampling)
    recorder: TraceRecorder | None = None
    engine: "OffloadEngine | None" = None
    margins: bool = False

    def _forward(self, ids, pos0, cache, mask, logits_from, request, kind, block, step, choice_from):
        if self.engine is not None:
            self.engine.begin(kind, step)
        if self.recorder is not None:
            T = ids.shape[0]
            self.recorder.begin(request, kind, block, step, T, pos0 + T, pos0 + choice_from, T - choice_from)
        return self.model(ids, pos0, cache, mask, logits_from)

    def _accept(self, res: Result, x: torch.Tensor, s0: int, logits: torch.Tensor, n: int,
                threshold: float | None = None) -> int:
        """Sample and commit in ``x[s0:s0 + rows]``; with ``margins``, note each committed
        position's forward and top-2 logit gap (relative to the largest |logit|)."""
        block = x[s0:s0 + logits.shape[0]]
        masked = block == self.model.cfg.mask_id if self.margins else None
        tok, prob = sample(logits, self.sampling, self._gen)
        n = accept(block, tok, prob, self.model.cfg.mask_id, n, threshold)
        if masked is not None:
            lf = logits.float()
            top2 = lf.topk(2, dim=-1).values
            rel = ((top2[:, 0] - top2[:, 1]) / lf.abs().amax(dim=-1).clamp_min(1e-30)).tolist()
            for i in (masked & (block != self.model.cfg.mask_id)).nonzero().flatten().tolist():
                self._notes[s0 + i] = (res.forwards, rel[i])
        return n

    def _finish(self, res: Result, start: int, length: int) -> None:
        if self.margins:
            notes = [self._notes.get(p, (-1, float("inf"))) for p in range(start, start + length)]
            res.committed_at = [f for f, _ in notes]
            res.margin = [m for _, m in notes]

    def _end(self, committed: int) -> None:
        counters = self.engine.end() if self.engine is not None else None
        if self.recorder is not None:
            self.recorder.end(committed, counters)

    @torch.no_grad()
    def generate(self, prompt: list[int], gen_length: int, request: int = 0) -> Result:
        d, cfg = self.decoding, self.model.cfg
        if not prompt:
            raise TideError("empty prompt")
        if gen_length < 1:
            raise TideError(f"--gen-length must be at least 1, got {gen_length}")
        if d.block_length < 1 or d.steps < 1:
            raise TideError("--block-length and --steps must be at least 1")
        need_float(d.threshold, "--threshold", lo=0.0, hi=1.0)
        max_pos = cfg.shape.config.get("max_position_embeddings")
        if isinstance(max_pos, int) and not isinstance(max_pos, bool) and len(prompt) + gen_length > max_pos:
            raise TideError(f"--gen-length {gen_length}: the prompt's {len(prompt)} tokens plus {gen_length} exceed the "
                            f"model's max_position_embeddings ({max_pos})")
        bad = [t for t in prompt if not 0 <= t < cfg.shape.vocab]
        if bad:
            raise TideError(f"prompt token id {bad[0]} is outside the vocabulary of {cfg.shape.vocab}")
        dev = self.model.device
        bl, P = d.block_length, len(prompt)
        steps = min(d.steps, gen_length)
        n_blocks = math.ceil((P + gen_length) / bl)
        total = n_blocks * bl
        x = torch.full((total,), cfg.mask_id, dtype=torch.long, device=dev)
        x[:P] = torch.tensor(prompt, dtype=torch.long, device=dev)
        schedule = transfer_schedule(bl, steps)
        self._gen = torch.Generator(device=dev).manual_seed(self.sampling.seed + request) if self.sampling.temperature > 0 else None
        self._notes: dict[int, tuple[int, float]] = {}
        cache = KVCache(cfg, total, dev, self.model.dtype) if d.kv_cache else None
        rec = self.recorder
        if rec is not None:
            rec.add_request(request, P, gen_length)
        res = Result(tokens=[])
        first = P // bl
        if d.kv_cache and first:
            self._forward(x[:first * bl], 0, cache, block_causal_mask(first * bl, bl, dev), None,
                          request, "prefill", 0, 0, 0)
            res.forwards += 1
            self._end(0)
        for b in range(first, n_blocks):
            s0, e = b * bl, (b + 1) * bl
            for step in range(steps):
                if not bool((x[s0:e] == cfg.mask_id).any()):
                    break
                if d.kv_cache:
                    logits = self._forward(x[s0:e], s0, cache, None, 0, request, "step", b, step, 0)
                else:
                    logits = self._forward(x[:e], 0, None, block_causal_mask(e, bl, dev), s0, request, "step", b, step, s0)
                n = self._accept(res, x, s0, logits, schedule[step], d.threshold)
                res.forwards += 1
                res.step_forwards += 1
                res.committed += n
                self._end(n)
            stop = bool((x[P:e] == cfg.eos_id).any())
            if d.kv_cache and not stop and b < n_blocks - 1:
                self._forward(x[s0:e], s0, cache, None, None, request, "commit", b, 0, 0)
                res.forwards += 1
                self._end(0)
            if stop:
                break
        self._finish(res, P, gen_length)
        out = x[P:P + gen_length].tolist()
        if cfg.eos_id in out:
            if res.margin is not None:
                cut = out.index(cfg.eos_id) + 1
                res.committed_at, res.margin = res.committed_at[:cut], res.margin[:cut]
            out = out[:out.index(cfg.eos_id) + 1]
        res.tokens = out
        return res

    @torch.no_grad()
    def replay(self, trace: Trace, request: int = 0) -> Result:
        """Run one request of a KV-cache trace: its forwards in order, its commit counts
        (most confident first), its experts (``runtime.replay``); no early stop at eos."""
        cfg = self.model.cfg
        check_replayable(trace, self.model)
        req = next((r for r in trace.requests if r["request"] == request), None)
        if req is None:
            raise TideError(f"--replay-trace: no request {request} in the trace")
        bl = trace.decoding.block_length
        P, G = req["prompt_length"], req["gen_length"]
        dev = self.model.device
        total = math.ceil((P + G) / bl) * bl
        x = torch.full((total,), cfg.mask_id, dtype=torch.long, device=dev)
        x[:P] = torch.tensor(replay_prompt(P, cfg.shape.vocab, (cfg.mask_id, cfg.eos_id)), device=dev)
        cache = KVCache(cfg, total, dev, self.model.dtype)
        chooser = ChoiceReplay(trace, self.model).attach()
        if self.recorder is not None:
            self.recorder.add_request(request, P, G)
        res = Result(tokens=[])
        self._gen = None
        self._notes = {}
        fw = trace.forwards
        try:
            for f in fw.index[fw["request"] == request]:
                kind, b, step, n = fw.at[f, "kind"], int(fw.at[f, "block"]), int(fw.at[f, "step"]), int(fw.at[f, "tokens_committed"])
                chooser.set_forward(f)
                s0, e = b * bl, (b + 1) * bl
                res.forwards += 1
                if kind == "prefill":
                    P0 = (P // bl) * bl
                    self._forward(x[:P0], 0, cache, block_causal_mask(P0, bl, dev), None, request, kind, 0, 0, 0)
                    self._end(0)
                elif kind == "commit":
                    self._forward(x[s0:e], s0, cache, None, None, request, kind, b, 0, 0)
                    self._end(0)
                else:
                    logits = self._forward(x[s0:e], s0, cache, None, 0, request, kind, b, step, 0)
                    n = self._accept(res, x, s0, logits, n)
                    res.step_forwards += 1
                    res.committed += n
                    self._end(n)
        finally:
            chooser.detach()
        self._finish(res, P, G)
        res.tokens = x[P:P + G].tolist()
        return res


def read_prompts(args: argparse.Namespace, tokenizer: Any) -> list[list[int]]:
    """Token ids of every prompt given on the command line."""
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
        return [encode(args.prompt)]
    if args.prompt_ids is not None:
        return [parse_ids(args.prompt_ids, "--prompt-ids")]
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
        if isinstance(obj, dict) and "prompt_ids" in obj:
            prompts.append(need_ints(obj["prompt_ids"], f"{path}:{i}: prompt_ids", lo=0))
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append(encode(obj["prompt"]))
        else:
            raise TideError(f"{path}:{i}: each line needs \"prompt\" (text) or \"prompt_ids\" (list of ids)")
    if not prompts:
        raise TideError(f"{path}: no prompts")
    return prompts


def add_generation_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--checkpoint", required=True, help="folder with config.json and safetensors")
    ap.add_argument("--prompt", help="text (needs the checkpoint's tokenizer)")
    ap.add_argument("--prompt-ids", help="comma-separated token ids")
    ap.add_argument("--prompts", help="JSONL file, one {\"prompt\": ...} or {\"prompt_ids\": [...]} per line")
    ap.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    ap.add_argument("--gen-length", type=integer, required=True)
    ap.add_argument("--block-length", type=integer, default=32)
    ap.add_argument("--steps", type=integer, default=32)
    ap.add_argument("--threshold", type=number, default=0.95)
    ap.add_argument("--temperature", type=number, default=0.0)
    ap.add_argument("--top-k", type=integer, default=0)
    ap.add_argument("--top-p", type=number, default=1.0)
    ap.add_argument("--seed", type=integer, default=0)
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
    ap.add_argument("--plan", default=None, help="plan JSON (per-layer tau and budget) for --policy plan")
    ap.add_argument("--popularity", default=None, help="trace whose total counts fill the slots at setup")
    ap.add_argument("--replay-trace", default=None, help="run a KV-cache trace's schedule and expert choices")


def check_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise TideError(f"--device: expected cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TideError("--device cuda: no CUDA device available (install a CUDA build of torch on a GPU box)")
    return torch.device(name)


def make_engine(args: argparse.Namespace, model: LLaDA2, device: torch.device, kv_tokens: int) -> OffloadEngine | None:
    """The offload engine the flags ask for (None without ``--policy``); budget checks included."""
    if args.policy is None:
        for flag in ("tau", "gpu_experts", "gpu_mem_gb", "plan", "popularity"):
            if getattr(args, flag) is not None:
                raise TideError(f"--{flag.replace('_', '-')} needs --policy")
        return None
    shape = model.cfg.shape
    limit = torch.cuda.get_device_properties(device).total_memory * DEVICE_HEADROOM if device.type == "cuda" else None
    policy = resolve_policy(args.policy, shape, dtype_name(model.dtype), tau=args.tau,
                            gpu_experts=parse_budget(args.gpu_experts), gpu_mem_gb=args.gpu_mem_gb, plan=args.plan,
                            kv_tokens=kv_tokens, mem_limit_bytes=limit)
    popularity = load_popularity(args.popularity, shape) if args.popularity else None
    return OffloadEngine(model, policy, device, setup_counts=popularity)




def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, warm up, generate every prompt, and report (the JSON fields)."""
    Sampling(args.temperature, args.top_k, args.top_p, args.seed).check(2**62)
    need_int(args.gen_length, "--gen-length", lo=1)
    need_int(args.block_length, "--block-length", lo=1)
    need_int(args.steps, "--steps", lo=1)
    need_float(args.threshold, "--threshold", lo=0.0, hi=1.0)
    if args.trace_out:
        check_out_path(args.trace_out, "--trace-out")
    if args.policy is not None and args.policy not in POLICIES:
        raise TideError(f"--policy: unknown policy {args.policy!r} (expected one of {', '.join(POLICIES)})")
    device = check_device(args.device)
    replay = read_trace(args.replay_trace) if args.replay_trace else None
    offload = args.policy is not None
    model = load_model(args.checkpoint, device=device, dtype=args.dtype,
                       experts_device="cpu" if offload or device.type == "cpu" else device)
    tokenizer = load_tokenizer(args.checkpoint)
    if replay is not None:
        if any(a is not None for a in (args.prompt, args.prompt_ids, args.prompts)):
            raise TideError("--replay-trace takes its prompts from the trace; drop --prompt/--prompt-ids/--prompts")
        check_replayable(replay, model)
        prompts = [replay_prompt(r["prompt_length"], model.cfg.shape.vocab, (model.cfg.mask_id, model.cfg.eos_id))
                   for r in replay.requests]
        decoding = replay.decoding
        lengths = [r["gen_length"] for r in replay.requests]
    else:
        prompts = read_prompts(args, tokenizer)
        decoding = Decoding(args.block_length, args.steps, args.threshold, not args.no_kv_cache)
        lengths = [args.gen_length] * len(prompts)
    bl = decoding.block_length
    kv_tokens = kv_tokens_for([(len(p), g) for p, g in zip(prompts, lengths)], bl, decoding.kv_cache)
    dtype = dtype_name(model.dtype)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed).check(model.cfg.shape.vocab)
    engine = make_engine(args, model, device, kv_tokens)
    Generator(model, Decoding(bl, 1, decoding.threshold, decoding.kv_cache), sampling, engine=engine).generate(
        prompts[0][:bl], 1)  # warm-up, not timed
    if engine is not None:
        engine.reset()
    rec = TraceRecorder(model, decoding, dtype).attach() if args.trace_out else None
    gen = Generator(model, decoding, sampling, rec, engine)
    results = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i, p in enumerate(prompts):
        sync()
        t0 = time.perf_counter()
        r = gen.replay(replay, replay.requests[i]["request"]) if replay is not None else gen.generate(p, lengths[i], request=i)
        sync()
        r.seconds = time.perf_counter() - t0
        results.append(r)
    policy_meta = None
    if engine is not None:
        engine.detach()
        policy_meta = {**engine.policy.to_json(), "popularity": args.popularity}
    if rec is not None:
        rec.detach()
        rec.trace(source={"generator": "runtime.generate", "checkpoint": str(args.checkpoint),
                          "device": str(device), "seed": args.seed, "replay_trace": args.replay_trace},
                  policy=policy_meta).write(args.trace_out)
    seconds = sum(r.seconds for r in results)
    n_tokens = sum(len(r.tokens) for r in results)
    steps = sum(r.step_forwards for r in results)
    out: dict[str, Any] = {
        "tokens": results[0].tokens if len(results) == 1 else [r.tokens for r in results],
        "forwards": sum(r.forwards for r in results),
        "tokens_per_forward": sum(r.committed for r in results) / max(steps, 1),
        "seconds": seconds,
        "tokens_per_s": n_tokens / seconds if seconds > 0 else 0.0,
        "device": str(device), "dtype": dtype, "kv_cache": decoding.kv_cache,
    }
    if engine is not None:
        out["policy"] = policy_meta
        out.update(engine.totals())
        out.update(engine.timers)
    if tokenizer is not None and replay is None:
        texts = [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in results]
        out["text"] = texts[0] if len(texts) == 1 else texts
    return out


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
