"""LLaDA2.0 MoE in plain PyTorch, with a block-level KV cache per request and batches of requests.

Same parameter names and math as the published ``modeling_llada2_moe.py``: fused QKV with
GQA, per-head RMSNorm on q and k, rotary on the first ``rope_dim`` dims of each head,
dense first layer(s), MoE layers with a sigmoid group-limited top-k router whose
``expert_bias`` only chooses, weights normalised then scaled, shared experts, RMSNorm in
fp32, untied ``lm_head``. Routed experts are stacked per layer (``[E, I, H]``) and computed
by an *expert executor* so the offload engine can take over without touching the model.

A batched forward (:meth:`LLaDA2.forward_batch`) runs several requests' segments (:class:`Segment`):
everything but the routed experts runs per request, each at its own positions with its own
KV cache (ragged contexts, no padding), exactly as that request alone; the MoE layers route
every request's tokens and hand them to the executor as one batch (one policy decision,
one dispatch). On the CPU a matmul rounds differently with more rows, so there each
expert's rows of each request are computed in a call of their own
(:func:`run_by_request`): a request's tokens are bit for bit those of its batch-1 run.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import ModelConfig
from runtime.cpu_kernel import linear_bf16, linear_is_faster, on_host_bf16
from runtime.experts import ExpertExecutor, ExpertWeights, local_experts, row_exact
from traces.common.errors import TideError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dt)


def rope(cfg: ModelConfig, pos0: int, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[n, rope_dim]`` for positions ``pos0..pos0+n`` (computed in fp32, then cast)."""
    d = cfg.rope_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    pos = torch.arange(pos0, pos0 + n, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of each head of ``x [heads, T, head_dim]``."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class Linear(nn.Linear):
    """``nn.Linear`` (the same parameters, names and numbers up to a sum's order) whose bf16
    forward on a CPU runs TIDE's C kernel (:func:`runtime.cpu_kernel.linear_bf16`) where it
    measured faster than torch's: on a CPU without AVX-512 BF16, torch converts each weight
    once per token (the mini head over 32 rows took 1.34 s, 0.37 s here)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and on_host_bf16(w, self.bias)
                and not (torch.is_grad_enabled() and w.requires_grad) and linear_is_faster()):
            return linear_bf16(x, w, self.bias)
        return F.linear(x, w, self.bias)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` (dense layers and shared experts)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        s = cfg.shape
        self.heads, self.kv_heads, self.head_dim = s.heads, s.kv_heads, s.head_dim
        self.query_key_value = Linear(s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim, bias=cfg.use_qkv_bias)
        self.dense = Linear(s.heads * s.head_dim, s.hidden, bias=cfg.use_bias)
        self.use_qk_norm = cfg.use_qk_norm
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(s.head_dim, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(s.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos0: int,
                cache: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None) -> torch.Tensor:
        return self.dense(self.attend(self.query_key_value(x), cos, sin, pos0, cache, mask))

    def forward_rows(self, x: torch.Tensor, rows: list[int], segs: list["Segment"], ropes: list, i: int) -> torch.Tensor:
        """Several requests' rows, one after another: the projections over all of them at
        once, attention per request (its positions, its cache ``i``, its mask)."""
        parts = self.query_key_value(x).split(rows)
        o = [self.attend(q, cos, sin, sg.pos0, sg.cache.layers[i] if sg.cache is not None else None, sg.mask)
             for q, sg, (cos, sin) in zip(parts, segs, ropes)]
        return self.dense(torch.cat(o))

    def attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos0: int,
               cache: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None) -> torch.Tensor:
        """One request's attention from its projected rows ``[T, (heads + 2 kv_heads) head_dim]``."""
        T = qkv.shape[0]
        qkv = qkv.view(T, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write this forward's keys and values, attend to everything before them too
            ck, cv = cache
            ck[:, pos0:pos0 + T] = k
            cv[:, pos0:pos0 + T] = v
            k, v = ck[:, :pos0 + T], cv[:, :pos0 + T]
        rep = self.heads // self.kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=self.head_dim ** -0.5)[0]
        return o.transpose(0, 1).reshape(T, self.heads * self.head_dim)


class Router(nn.Module):
    """Sigmoid scores in fp32; ``expert_bias`` added for choosing only; group-limited top-k."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        s = cfg.shape
        self.experts, self.top_k, self.n_group, self.topk_group = s.experts, s.top_k, s.n_group, s.topk_group
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(s.experts, s.hidden))
        self.use_bias = cfg.use_expert_bias
        self.expert_bias = nn.Parameter(torch.zeros(s.experts, dtype=torch.float32))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(x.float(), self.weight.float()))

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        s = scores + self.expert_bias if self.use_bias else scores
        T = s.shape[0]
        if self.n_group > 1:
            group = s.view(T, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
            keep = torch.topk(group, k=self.topk_group, dim=-1, sorted=False)[1]
            gmask = torch.zeros_like(group).scatter_(1, keep, 1)
            emask = gmask.unsqueeze(-1).expand(T, self.n_group, self.experts // self.n_group).reshape(T, -1)
            s = s.masked_fill(~emask.bool(), float("-inf"))
        return torch.topk(s, k=self.top_k, dim=-1)[1]

    def weights(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The chosen experts' unbiased scores, normalised to sum 1 (top-k > 1), times the scaling factor."""
        w = scores.gather(1, idx)
        if self.top_k > 1:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.scores(x)
        idx = self.choose(scores)
        return idx, self.weights(scores, idx)



class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        s = cfg.shape
        self.layer = layer
        self.gate = Router(cfg)
        self.shared_experts = MLP(s.hidden, s.moe_intermediate * s.shared_experts) if s.shared_experts else None
        self.experts: ExpertWeights | None = None  # filled by the loader; not module parameters
        # loaded straight onto the fast device (runtime.checkpoint.build_model's on_device): those
        # experts' stack and ids; the host stack then holds the others, host_row maps expert -> row
        self.resident: ExpertWeights | None = None
        self.resident_ids: np.ndarray | None = None
        self.host_row: np.ndarray | None = None
        self.on_drive = False  # its routed experts stay on the drive (runtime.host_tier reads them)
        self.executor: ExpertExecutor = local_experts
        self.override: Callable[[int], torch.Tensor] | None = None  # replayed choices instead of the router's
        self.observer: Callable[[int, torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_batch([x])[0]

    def forward_batch(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Row-exact: each request's tokens routed by its own router call, the routed experts
        of all of them in one executor call (which computes each request's rows of an expert
        apart), shared experts per request."""
        scores = [self.gate.scores(x) for x in xs]
        # the router chooses even when a replay overrides it: a replay does a real run's work
        # (skipping it made the profiler's replays 16% cheaper than runs in the MoE layers' own work)
        idx = torch.cat([self.gate.choose(sc) for sc in scores]) if len(xs) > 1 else self.gate.choose(scores[0])
        if self.override is not None:
            idx = self.override(self.layer)
        one = len(xs) == 1
        sc = scores[0] if one else torch.cat(scores)
        x = xs[0] if one else torch.cat(xs)
        w = self.gate.weights(sc, idx)
        if self.observer is not None:
            self.observer(self.layer, idx)
        rows = [len(t) for t in xs]
        self._check_executor()
        y = self.executor(self.layer, x, idx, w, self.experts) if one else \
            self.executor(self.layer, x, idx, w, self.experts, rows)
        ys = [y] if one else list(y.split(rows))
        if self.shared_experts is not None:
            ys = [yi + self.shared_experts(xi) for yi, xi in zip(ys, xs)]
        return ys

    def _check_executor(self) -> None:
        if (self.host_row is not None or self.on_drive) and self.executor is local_experts:
            raise TideError(f"layer {self.layer}: some experts were loaded straight onto the fast device or left on "
                            "the drive; only the offload engine runs such a model (give a --policy)")

    def forward_rows(self, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Merged: several requests' rows (one after another) routed, computed by the executor
        (an expert's rows of every request together) and through the shared experts at once."""
        scores = self.gate.scores(x)
        idx = self.gate.choose(scores)  # chosen even under a replay's override, as above
        if self.override is not None:
            idx = self.override(self.layer)
        w = self.gate.weights(scores, idx)
        if self.observer is not None:
            self.observer(self.layer, idx)
        self._check_executor()
        y = self.executor(self.layer, x, idx, w, self.experts, rows)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        s = cfg.shape
        self.attention = Attention(cfg)
        self.mlp = MoE(cfg, layer) if layer >= s.first_k_dense else MLP(s.hidden, s.intermediate)
        self.input_layernorm = RMSNorm(s.hidden, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, pos0, cache, mask):
        h = h + self.attention(self.input_layernorm(h), cos, sin, pos0, cache, mask)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_batch(self, hs: list[torch.Tensor], segs: list["Segment"], ropes: list, i: int) -> list[torch.Tensor]:
        """Row-exact: everything per request as it runs alone, the MoE block's experts batched."""
        hs = [h + self.attention(self.input_layernorm(h), cos, sin, sg.pos0,
                                 sg.cache.layers[i] if sg.cache is not None else None, sg.mask)
              for h, sg, (cos, sin) in zip(hs, segs, ropes)]
        xs = [self.post_attention_layernorm(h) for h in hs]
        ys = self.mlp.forward_batch(xs) if isinstance(self.mlp, MoE) else [self.mlp(x) for x in xs]
        return [h + y for h, y in zip(hs, ys)]

    def forward_rows(self, h: torch.Tensor, rows: list[int], segs: list["Segment"], ropes: list, i: int) -> torch.Tensor:
        """Merged: the requests' rows together through every projection, norm and expert;
        attention per request."""
        h = h + self.attention.forward_rows(self.input_layernorm(h), rows, segs, ropes, i)
        x = self.post_attention_layernorm(h)
        return h + (self.mlp.forward_rows(x, rows) if isinstance(self.mlp, MoE) else self.mlp(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        s = cfg.shape
        self.word_embeddings = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(s.layers)])
        self.norm = RMSNorm(s.hidden, cfg.rms_norm_eps)


class KVCache:
    """Per layer keys and values ``[kv_heads, max_tokens, head_dim]``, written in place."""

    def __init__(self, cfg: ModelConfig, max_tokens: int, device: torch.device, dtype: torch.dtype):
        s = cfg.shape
        self.layers = [(torch.zeros(s.kv_heads, max_tokens, s.head_dim, device=device, dtype=dtype),
                        torch.zeros(s.kv_heads, max_tokens, s.head_dim, device=device, dtype=dtype))
                       for _ in range(s.layers)]


def block_causal_mask(n: int, block_length: int, device: torch.device) -> torch.Tensor:
    """``[n, n]`` True where a query may attend: keys in its own or an earlier block."""
    b = torch.arange(n, device=device) // block_length
    return b[None, :] <= b[:, None]


@dataclass
class Segment:
    """One request's part of a batched forward: its tokens ``ids`` at positions ``pos0..``,
    its own KV cache and attention mask, and the rows whose logits it needs
    (``logits_from``; None: no logits), or only some of them (``logit_rows``, offsets from
    ``logits_from``: a step's still-masked positions, the only ones it samples)."""

    ids: torch.Tensor
    pos0: int = 0
    cache: "KVCache | None" = None
    mask: torch.Tensor | None = None
    logits_from: int | None = 0
    logit_rows: torch.Tensor | None = None

    def head_rows(self, h: torch.Tensor) -> torch.Tensor:
        """This segment's rows of ``h`` that need logits."""
        h = h[self.logits_from:]
        return h if self.logit_rows is None else h[self.logit_rows]


class _Clock:
    """Adds the wall time of its ``with`` block to ``spent[part]``."""

    def __init__(self, spent: dict[str, float], part: str):
        self.spent, self.part = spent, part

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.spent[self.part] = self.spent.get(self.part, 0.0) + time.perf_counter() - self.t0


class LLaDA2(nn.Module):
    """The whole model. ``forward`` runs ``ids`` at positions ``pos0..`` and returns fp32 logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.shape.hidden, cfg.shape.vocab, bias=False)
        self._parts = ["dense" if i < cfg.shape.first_k_dense else "moe" for i in range(cfg.shape.layers)]
        self._spent: dict[str, float] | None = None  # seconds per part while :meth:`timed_parts` is on

    @contextlib.contextmanager
    def timed_parts(self) -> Iterator[dict[str, float]]:
        """Clock the parts of every forward run inside: ``dense`` and ``moe`` (each decoder
        layer), ``head`` (the final norm, the head and the sampling of their logits). The hook
        the profiler's calibration reads (:mod:`runtime.calibrate`); off, a part costs one test."""
        self._spent = spent = {}
        try:
            yield spent
        finally:
            self._spent = None

    def clock(self, part: str) -> contextlib.AbstractContextManager:
        """A context that adds its wall time to ``part`` while :meth:`timed_parts` is on."""
        return _Clock(self._spent, part) if self._spent is not None else contextlib.nullcontext()

    @property
    def row_exact(self) -> bool:
        """Whether a batch computes each request apart, bit-equal to its batch-1 run
        (:func:`row_exact`: fp32 on the CPU, the reference mode)."""
        return row_exact(self.lm_head.weight)

    @property
    def moe_blocks(self) -> list[MoE]:
        return [l.mlp for l in self.model.layers if isinstance(l.mlp, MoE)]

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, pos0: int = 0, cache: KVCache | None = None, mask: torch.Tensor | None = None,
                logits_from: int | None = 0) -> torch.Tensor | None:
        """Logits ``[T - logits_from, vocab]`` in fp32, or None when ``logits_from`` is None.

        ``ids`` is ``[T]``, or ``[1, T]`` as Hugging Face callers pass it (logits then ``[1, ...]``).
        """
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError("LLaDA2.forward runs one sequence (batch size 1)")
            out = self.forward(ids[0], pos0, cache, mask.reshape(mask.shape[-2:]) if mask is not None else None,
                               logits_from)
            return None if out is None else out[None]
        return self.forward_batch([Segment(ids, pos0, cache, mask, logits_from)])[0]

    @torch.no_grad()
    def forward_batch(self, segments: list[Segment]) -> list[torch.Tensor | None]:
        """Several requests in one forward: per segment, its logits (fp32) or None.

        Row-exact (:attr:`row_exact`, the default in fp32 on the CPU, the reference mode):
        each request's numbers are those of :meth:`forward` on it alone, bit for bit; only
        the routed experts run as one batch. Otherwise (bf16, GPUs) the requests' rows go
        through every projection, norm and expert together (each weight read once per
        forward, the point of batching), attention per request; a request's numbers may
        then differ from its batch-1 run in the last bits, as on any GPU, while every
        placement policy still computes exactly the same numbers."""
        if self.row_exact or len(segments) == 1:
            hs = [self.model.word_embeddings(sg.ids) for sg in segments]
            ropes = [rope(self.cfg, sg.pos0, sg.ids.shape[0], h.dtype, h.device) for sg, h in zip(segments, hs)]
            for i, layer in enumerate(self.model.layers):
                with self.clock(self._parts[i]):
                    hs = layer.forward_batch(hs, segments, ropes, i)
            with self.clock("head"):
                return [None if sg.logits_from is None else self.lm_head(self.model.norm(sg.head_rows(h))).float()
                        for sg, h in zip(segments, hs)]
        rows = [sg.ids.shape[0] for sg in segments]
        h = self.model.word_embeddings(torch.cat([sg.ids for sg in segments]))
        ropes = [rope(self.cfg, sg.pos0, n, h.dtype, h.device) for sg, n in zip(segments, rows)]
        for i, layer in enumerate(self.model.layers):
            with self.clock(self._parts[i]):
                h = layer.forward_rows(h, rows, segments, ropes, i)
        starts = np.concatenate([[0], np.cumsum(rows)])
        want = [(k, sg.head_rows(h[int(starts[k]):int(starts[k + 1])])) for k, sg in enumerate(segments)
                if sg.logits_from is not None]
        out: list[torch.Tensor | None] = [None] * len(segments)
        if want:
            picked = torch.cat([r for _, r in want])
            with self.clock("head"):
                logits = self.lm_head(self.model.norm(picked)).float().split([len(r) for _, r in want])
            for (k, _), lg in zip(want, logits):
                out[k] = lg
        return out
