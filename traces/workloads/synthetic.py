"""Synthetic LLaDA2.0 workloads: traces that route like a trained model.

Random-weight routers send a block's identical mask tokens to a few experts; a trained
LLaDA2.0 spreads a 32-token block over about 70 experts per layer, with skewed
popularity and routing that drifts slowly across a block's denoising steps. This module
generates that behaviour. Per request and MoE layer, a token's router logits are

    z = popularity (per layer, skew varying by layer, nudged per request)
      + block context (first-order autoregressive across blocks)
      + token state (first-order autoregressive across denoising steps, partly redrawn
        when the token is committed)

and its experts are chosen by LLaDA2.0's group-limited top-k. Committed tokens per
denoising step follow threshold decoding: ``1 + Poisson`` with the published mean tokens
per forward, never more than remain and never fewer than the step schedule needs.

Calibrated (``CALIBRATION``) to the published figures for LLaDA2.0-mini and -flash; the
tests check them. Any architecture config works (tests use reduced shapes).

Its command line is :mod:`traces.synth`:
``python -m traces.synth --model llada2-mini --gen-length 1024 --prompt-length 64 --seed 0 --out t.parquet``"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from traces.common.checks import check_seed
from traces.common.errors import TideError
from traces.common.values import need_float, need_int
from traces.formats.shapes import DTYPE_BYTES, ModelShape
from traces.formats.trace_file import Decoding, Trace
from traces.workloads.routing import group_limited_topk


@dataclass(frozen=True)
class WorkloadParams:
    """Knobs of the generator (logit scales are in units of the router's logits)."""

    sigma_pop: float  # spread of per-layer expert popularity
    layer_skew: tuple[float, float]  # per-layer multiplier of sigma_pop, uniform in this range
    sigma_req: float  # per-request deviation of popularity
    sigma_ctx: float  # spread of the per-block context
    rho_ctx: float  # correlation of the context between consecutive blocks
    sigma_tok: float  # spread of a token's own state
    rho_tok: tuple[float, float]  # per-layer correlation of a token's state between steps
    commit_keep: float  # correlation of a token's state across its commit
    tokens_per_step: float  # mean tokens committed per denoising step


CALIBRATION: dict[str, WorkloadParams] = {
    "llada2-mini": WorkloadParams(sigma_pop=0.9, layer_skew=(0.8, 1.2), sigma_req=0.2, sigma_ctx=1.0, rho_ctx=0.5,
                                  sigma_tok=1.1, rho_tok=(0.985, 0.995), commit_keep=0.9, tokens_per_step=2.55),
    "llada2-flash": WorkloadParams(sigma_pop=0.9, layer_skew=(0.8, 1.2), sigma_req=0.2, sigma_ctx=1.0, rho_ctx=0.5,
                                   sigma_tok=1.1, rho_tok=(0.985, 0.995), commit_keep=0.9, tokens_per_step=3.18),
}


#: The published figures a calibrated workload must reproduce (prompt 64, 1024 generated
#: tokens): (statistic, KV cache on, low, high). See ../shared/reference/README.md.
TARGETS: tuple[tuple[str, bool, float, float], ...] = (
    ("cosine_gap[1]", True, 0.975, 0.995),
    ("cosine_gap[5]", True, 0.95, 1.0),
    ("distinct_experts_per_forward", True, 55.0, 85.0),
    *((f"tide_hit_ratio[B=128,tau={t}]", False, 0.92, 0.96) for t in range(1, 6)),
)


def calibration_checks(stats_kv: dict, stats_nokv: dict) -> list[dict]:
    """Each target with its value from :func:`traces.stats.summarize` output and whether it holds."""
    def value(name: str, s: dict) -> float:
        if name.startswith("cosine_gap"):
            return s["cosine_gap"][name[11:-1]]
        if name == "distinct_experts_per_forward":
            return s[name]["mean"]
        return s["tide_hit_ratio"]["128"][name.split("tau=")[1][:-1]]

    rows = []
    for name, kv, lo, hi in TARGETS:
        v = value(name, stats_kv if kv else stats_nokv)
        rows.append({"check": name, "kv_cache": kv, "value": v, "low": lo, "high": hi, "ok": bool(lo <= v <= hi)})
    hits = [stats_nokv["tide_hit_ratio"]["128"][str(t)] for t in range(1, 9)]
    falling = all(b <= a + 1e-12 for a, b in zip(hits, hits[1:])) and hits[0] - hits[-1] < 0.05
    rows.append({"check": "tide_hit_ratio[B=128] falls slowly with tau", "kv_cache": False,
                 "value": hits[0] - hits[-1], "low": 0.0, "high": 0.05, "ok": falling})
    return rows


def params_for(shape: ModelShape) -> WorkloadParams:
    """The calibrated knobs for a named model; others get LLaDA2.0-mini's."""
    return CALIBRATION.get(shape.name, CALIBRATION["llada2-mini"])


def _hist(choices: np.ndarray, experts: int) -> np.ndarray:
    """``[L, E]`` counts of the choices ``[n, L, k]``."""
    n, L, k = choices.shape
    flat = np.arange(L)[None, :, None] * experts + choices.astype(np.int64)
    return np.bincount(flat.reshape(-1), minlength=L * experts).reshape(L, experts)


def _commit_schedule(rng: np.random.Generator, masked: int, steps: int, extra: float) -> list[int]:
    """Tokens accepted per denoising step until none are masked: ``1 + Poisson(extra)``,
    never more than remain, never fewer than finishing within ``steps`` needs."""
    out, left = [], masked
    for s in range(steps):
        if left == 0:
            break
        need = math.ceil(left / (steps - s))
        k = min(left, max(1 + int(rng.poisson(extra)), need))
        out.append(k)
        left -= k
    return out


@functools.lru_cache(maxsize=64)
def _poisson_extra(tokens_per_step: float, block_length: int, steps: int) -> float:
    """The Poisson mean whose clipped schedule commits ``tokens_per_step`` per step on average
    over a whole block (bisection on a fixed-seed simulation, so it is deterministic)."""
    lo, hi = 0.0, float(block_length)
    for _ in range(30):
        mid = (lo + hi) / 2
        rng = np.random.default_rng(12345)
        n_steps = sum(len(_commit_schedule(rng, block_length, steps, mid)) for _ in range(400))
        if 400 * block_length / n_steps < tokens_per_step:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class _Layerwise:
    """Per-layer routing state of one run: popularity and the AR(1) processes."""

    def __init__(self, shape: ModelShape, p: WorkloadParams, rng: np.random.Generator):
        L, E = shape.n_moe_layers, shape.experts
        self.shape, self.p, self.rng = shape, p, rng
        skew = rng.uniform(*p.layer_skew, size=(L, 1))
        self.base_pop = (rng.standard_normal((L, E)) * p.sigma_pop * skew).astype(np.float32)
        self.rho_tok = rng.uniform(*p.rho_tok, size=L)
        self.pop = self.base_pop
        self.ctx = np.zeros((L, E), dtype=np.float32)

    def new_request(self) -> None:
        L, E = self.base_pop.shape
        self.pop = self.base_pop + self.rng.standard_normal((L, E), dtype=np.float32) * self.p.sigma_req
        self.ctx = self.rng.standard_normal((L, E), dtype=np.float32) * self.p.sigma_ctx

    def next_block(self) -> None:
        r = self.p.rho_ctx
        self.ctx = r * self.ctx + math.sqrt(1 - r * r) * self.p.sigma_ctx * self.rng.standard_normal(self.ctx.shape, dtype=np.float32)

    def new_tokens(self, n: int) -> np.ndarray:
        L, E = self.base_pop.shape
        return self.rng.standard_normal((n, L, E), dtype=np.float32) * self.p.sigma_tok

    def drift(self, u: np.ndarray, just_committed: np.ndarray) -> np.ndarray:
        """One AR(1) step of token states ``u [n, L, E]``; tokens just committed move more."""
        keep = np.where(just_committed[:, None], self.p.commit_keep * self.rho_tok[None, :], self.rho_tok[None, :])
        keep = keep[:, :, None].astype(np.float32)
        noise = self.rng.standard_normal(u.shape, dtype=np.float32) * np.float32(self.p.sigma_tok)
        return keep * u + np.sqrt(1 - keep * keep) * noise

    def route(self, u: np.ndarray) -> np.ndarray:
        s = self.shape
        return group_limited_topk(self.pop[None] + self.ctx[None] + u, s.top_k, s.n_group, s.topk_group).astype(np.int16)


def request_lengths(spec: str, n: int, seed: int, flag: str) -> list[int]:
    """Per-request lengths from a flag: one number (every request), a list ``a,b,c`` (each
    request draws one), or a range ``lo:hi`` (uniform integers, both ends included); seeded."""
    rng = np.random.default_rng([seed, 7 if flag == "--gen-length" else 11])
    text = str(spec).strip()
    try:
        if ":" in text:
            lo, hi = (int(v) for v in text.split(":"))
            vals = rng.integers(lo, hi + 1, size=n).tolist() if lo <= hi else None
        elif "," in text:
            choices = [int(v) for v in text.split(",") if v.strip()]
            vals = [choices[i] for i in rng.integers(0, len(choices), size=n)]
        else:
            vals = [int(text)] * n
    except ValueError:
        raise TideError(f"{flag}: expected an integer, a list a,b,c or a range lo:hi, got {spec!r}") from None
    if vals is None:
        raise TideError(f"{flag}: range {text} runs backwards")
    return [need_int(v, flag, lo=1, hi=1 << 20) for v in vals]


def synthesize(shape: ModelShape, gen_length: int | Sequence[int], prompt_length: int | Sequence[int], seed: int,
               kv_cache: bool = True, decoding: Decoding | None = None, requests: int = 1,
               params: WorkloadParams | None = None, dtype: str = "bfloat16", progress: bool = False) -> Trace:
    """Generate a trace of ``requests`` prompts run one after another; ``gen_length`` and
    ``prompt_length`` are one value for all, or one per request."""
    decoding, gens, prompts = _check_workload(gen_length, prompt_length, seed, kv_cache, decoding, requests, dtype)
    p = params or params_for(shape)
    rng = np.random.default_rng(seed)
    lw = _Layerwise(shape, p, rng)
    out = _Rows(shape.experts)
    bl = decoding.block_length
    total_blocks = sum(math.ceil((q + g) / bl) - q // bl for q, g in zip(prompts, gens))
    bar = tqdm(total=total_blocks, desc=f"synth {shape.name}", unit="block", disable=not progress)
    for r in range(requests):
        _request(out, lw, rng, p, shape, decoding, r, prompts[r], gens[r], bar)
    bar.close()
    source = {"generator": "traces.synth", "seed": seed, "params": asdict(p), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    req = [{"request": r, "prompt_length": prompts[r], "gen_length": gens[r]} for r in range(requests)]
    return Trace(shape=shape, dtype=dtype, decoding=decoding, requests=req, forwards=pd.DataFrame(out.rows),
                 counts=np.stack(out.counts), choices=np.concatenate(out.choices).astype(np.int16), source=source)


def _check_workload(gen_length: int | Sequence[int], prompt_length: int | Sequence[int], seed: int, kv_cache: bool,
                    decoding: Decoding | None, requests: int, dtype: str) -> tuple[Decoding, list[int], list[int]]:
    """The workload's settings checked: decoding (with ``kv_cache``), each request's lengths."""
    decoding = decoding or Decoding(kv_cache=kv_cache)
    if decoding.kv_cache != kv_cache:
        decoding = Decoding(decoding.block_length, decoding.steps, decoding.threshold, kv_cache)
    need_int(requests, "--requests", lo=1, hi=1 << 16)
    gens = [gen_length] * requests if isinstance(gen_length, (int, np.integer)) else list(gen_length)
    prompts = [prompt_length] * requests if isinstance(prompt_length, (int, np.integer)) else list(prompt_length)
    if len(gens) != requests or len(prompts) != requests:
        raise TideError(f"--requests {requests}: give one generation and prompt length each")
    for g in gens:
        need_int(g, "--gen-length", lo=1, hi=1 << 20)
    for q in prompts:
        need_int(q, "--prompt-length", lo=1, hi=1 << 20)
    check_seed(seed)
    need_int(decoding.block_length, "--block-length", lo=1, hi=1 << 16)
    need_int(decoding.steps, "--steps", lo=1)
    need_float(decoding.threshold, "--threshold", lo=0.0, hi=1.0)
    if dtype not in DTYPE_BYTES:
        raise TideError(f"--dtype: unknown dtype {dtype!r}")
    return decoding, gens, prompts


class _Rows:
    """The trace's rows as they are emitted: per forward member, its columns, counts and choices."""

    def __init__(self, experts: int):
        self.E = experts
        self.rows: list[dict] = []
        self.counts: list[np.ndarray] = []
        self.choices: list[np.ndarray] = []

    def emit(self, request: int, kind: str, block: int, step: int, run: int, committed: int, context: int,
             start: int, ch: np.ndarray, extra: np.ndarray | None) -> None:
        c = _hist(ch, self.E)
        if extra is not None:
            c = c + extra
        self.rows.append(dict(request=request, kind=kind, block=block, step=step, tokens_run=run,
                              tokens_committed=committed, context=context, choice_start=start, choice_tokens=len(ch)))
        self.counts.append(c.astype(np.int32))
        self.choices.append(ch.transpose(1, 0, 2).reshape(-1))


def _request(out: _Rows, lw: _Layerwise, rng: np.random.Generator, p: WorkloadParams, shape: ModelShape,
             decoding: Decoding, r: int, prompt_length: int, gen_length: int, bar: tqdm) -> None:
    """One request's forwards: a prefill of its prompt's whole blocks (KV cache), then per
    block its denoising steps (each routing the block's tokens as they drift and commit) and a
    commit forward."""
    L, E, bl, kv_cache = shape.n_moe_layers, shape.experts, decoding.block_length, decoding.kv_cache
    steps = min(decoding.steps, gen_length)  # as the published generate() caps them
    extra = _poisson_extra(p.tokens_per_step, bl, steps)
    lw.new_request()
    n_blocks = math.ceil((prompt_length + gen_length) / bl)  # every block is whole, as published
    first = prompt_length // bl
    prefix = np.zeros((L, E), dtype=np.int64)  # final choices of finished tokens (no-KV forwards)
    # prompt blocks before the first block with masks: one prefill forward
    prompt_choices = []
    for b in range(first):
        if b:
            lw.next_block()
        prompt_choices.append(lw.route(lw.new_tokens(bl)))
        prefix += _hist(prompt_choices[-1], E)
    if kv_cache and first:
        out.emit(r, "prefill", 0, 0, first * bl, 0, first * bl, 0, np.concatenate(prompt_choices), None)
    for b in range(first, n_blocks):
        if b:
            lw.next_block()
        start, end = b * bl, (b + 1) * bl
        n = bl
        u = lw.new_tokens(n)
        masked = np.arange(start, end) >= prompt_length
        schedule = _commit_schedule(rng, int(masked.sum()), steps, extra)
        just_committed = np.zeros(n, dtype=bool)
        for s, k in enumerate(schedule):
            if s:
                u = lw.drift(u, just_committed)
            ch = lw.route(u)
            if kv_cache:
                out.emit(r, "step", b, s, n, k, end, start, ch, None)
            else:
                out.emit(r, "step", b, s, end, k, end, start, ch, prefix)
            idx = np.flatnonzero(masked)
            pick = rng.choice(idx, size=k, replace=False)
            masked[pick] = False
            just_committed[:] = False
            just_committed[pick] = True
        u = lw.drift(u, just_committed)
        final = lw.route(u)
        if kv_cache and b < n_blocks - 1:
            out.emit(r, "commit", b, 0, n, 0, end, start, final, None)
        prefix += _hist(final, E)
        bar.update(1)
