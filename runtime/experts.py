"""The routed experts' math and its kernels: stacked weights, one expert's SwiGLU FFN, the
weighted combine, the kernels that run a batch of experts (a chain per expert, or
``torch._grouped_mm`` over a whole stack, bit-equal on the CPU) and the measured choice
between them; the row-exact mode's calls per request. The model (:mod:`runtime.model`), the
offload engine and the profiler all run experts through here."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from runtime.device import timed, to_device


@dataclass
class ExpertWeights:
    """One MoE layer's routed experts, stacked: gate and up ``[E, I, H]``, down ``[E, H, I]``."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


def expert_ffn(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def combine(outputs: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Put expert outputs (in ``order`` of the flattened assignments) back in routing order and
    sum each token's ``k`` outputs weighted, in the weights' dtype, as the published code does."""
    T, k = weights.shape
    full = torch.empty_like(outputs)
    full[order] = outputs
    return full.view(T, k, -1).to(weights.dtype).mul_(weights.unsqueeze(-1)).sum(dim=1).to(dtype)


def local_experts(layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, ew: ExpertWeights,
                  rows: "Sequence[int] | None" = None) -> torch.Tensor:
    """All experts where ``ew`` lives (on ``x``'s device): tokens sorted by expert, through the
    device's expert kernel (:func:`kernel_for`, the engine's, so both compute the same numbers).
    ``rows``: each request's token count when ``x`` holds a batch (see :func:`run_by_request`)."""
    T, k = idx.shape
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    tokens = x[order // k]
    counts = torch.bincount(flat, minlength=ew.gate.shape[0]).cpu().numpy()
    out = torch.empty_like(tokens)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    active = np.flatnonzero(counts)
    kernel = kernel_for(ew.gate.device, ew.gate.dtype, ew.gate.shape[2], ew.gate.shape[1])
    run_by_request(kernel, tokens, out, bounds, active, ew, np.arange(len(counts)), request_of(order, k, rows, x))
    return combine(out, order, w, x.dtype)


def row_exact(t: torch.Tensor) -> bool:
    """Batches of requests computed each apart, bit-equal to batch 1: in fp32 on the CPU (the
    reference mode the tests hold to); in bf16 or on a GPU rows go together (faster)."""
    return t.device.type == "cpu" and t.dtype == torch.float32


def request_of(order: torch.Tensor, k: int, rows: "Sequence[int] | None", x: torch.Tensor) -> np.ndarray | None:
    """The request of each expert-sorted row (``order`` of the flattened ``[T, k]`` choices of
    the tokens ``x``) where a row-exact batch of several requests needs it; else None."""
    if rows is None or len(rows) < 2 or not row_exact(x):
        return None
    return np.searchsorted(np.cumsum(rows), order.numpy() // k, side="right")


def run_by_request(kernel, tokens: torch.Tensor, out: torch.Tensor, bounds: np.ndarray, experts: np.ndarray,
                   weights: ExpertWeights, index: np.ndarray, request: np.ndarray | None) -> None:
    """``kernel`` over ``experts``, each request's rows of an expert in a call of their own when
    ``request`` (each sorted row's request) is given: in waves, the ``w``-th request of every
    expert in wave ``w``, gathered, computed and put back. A request's rows then go through
    exactly the calls of its batch-1 run (on the CPU, fp32 matmuls round differently with
    more rows), whatever shares the batch. Without ``request``: one call, as batch 1 does."""
    experts = np.asarray(experts)
    rows, sizes = segment_rows(bounds, experts)
    if request is None or not len(rows):
        kernel(tokens, out, bounds, experts, weights, index)
        return
    owner = np.repeat(np.arange(len(experts)), sizes)  # which of ``experts`` each row belongs to
    req = request[rows]
    first = np.concatenate([[True], (owner[1:] != owner[:-1]) | (req[1:] != req[:-1])])
    seg = np.cumsum(first) - 1  # each row's (expert, request) segment
    seg_owner = owner[first]
    rank = np.arange(len(seg_owner)) - np.searchsorted(seg_owner, seg_owner, side="left")  # place in its expert
    if rank.max() == 0:  # no expert holds rows of two requests: one call, as batch 1 does
        kernel(tokens, out, bounds, experts, weights, index)
        return
    for wv in range(int(rank.max()) + 1):
        in_wave = rank[seg] == wv
        segs, seg_sizes = np.unique(seg[in_wave], return_counts=True)
        rows_t = torch.from_numpy(rows[in_wave]).to(tokens.device)
        part = tokens[rows_t]
        res = torch.empty_like(part)
        kernel(part, res, np.concatenate([[0], np.cumsum(seg_sizes)]), np.arange(len(segs)), weights,
               np.asarray(index)[experts[seg_owner[segs]]])
        out[rows_t] = res


def run_experts(tokens: torch.Tensor, out: torch.Tensor, bounds: np.ndarray, experts: np.ndarray,
                weights: ExpertWeights, index: np.ndarray) -> None:
    """Expert ``e``'s rows ``bounds[e]:bounds[e+1]`` of ``tokens`` through the weights at
    ``index[e]`` of the stacks ``weights``, into ``out``: the expert kernel of the model, the
    engine and the profiler (so a token's expert output is the same number wherever it is
    computed). One matmul chain per expert, issued from Python: a few kernel launches each,
    which the CPU absorbs and a GPU does not (see :func:`grouped_experts`)."""
    for e in np.asarray(experts).tolist():
        a, b = int(bounds[e]), int(bounds[e + 1])
        s = int(index[e])
        out[a:b] = expert_ffn(tokens[a:b], weights.gate[s], weights.up[s], weights.down[s])


def segment_rows(bounds: np.ndarray, experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows ``bounds[e]:bounds[e+1]`` of each expert in ``experts``, concatenated in that
    order, and each expert's row count (vectorised: no Python loop over experts)."""
    sizes = (bounds[experts + 1] - bounds[experts]).astype(np.int64)
    starts = np.repeat(bounds[experts] - (np.cumsum(sizes) - sizes), sizes)
    return starts + np.arange(len(starts)), sizes


def grouped_experts(tokens: torch.Tensor, out: torch.Tensor, bounds: np.ndarray, experts: np.ndarray,
                    weights: ExpertWeights, index: np.ndarray) -> None:
    """What :func:`run_experts` computes, in three grouped matmuls over the whole weight stack
    (``torch._grouped_mm``): each stack entry is a group holding its expert's rows, zero rows
    when it has none. Eight launches per call instead of about six per expert; the weights are
    read in place (no gather)."""
    experts = np.asarray(experts)
    if not len(experts):
        return
    slots = np.asarray(index)[experts]
    by_slot = np.argsort(slots, kind="stable")
    ex, sl = experts[by_slot], slots[by_slot]
    rows, sizes = segment_rows(bounds, ex)
    rows = to_device(rows, tokens.device)
    per_slot = np.zeros(weights.gate.shape[0], dtype=np.int32)
    per_slot[sl] = sizes
    offs = to_device(np.cumsum(per_slot, dtype=np.int32), tokens.device)
    a = tokens[rows]
    h = torch._grouped_mm(a, weights.gate.transpose(1, 2), offs=offs)
    u = torch._grouped_mm(a, weights.up.transpose(1, 2), offs=offs)
    out[rows] = torch._grouped_mm(F.silu(h) * u, weights.down.transpose(1, 2), offs=offs)


def fused_experts(tokens: torch.Tensor, out: torch.Tensor, bounds: np.ndarray, experts: np.ndarray,
                  weights: ExpertWeights, index: np.ndarray) -> None:
    """What :func:`run_experts` computes, for bf16 weights in host memory, in one call of the C
    kernel (:mod:`runtime.cpu_kernel`): every weight row read once and multiplied into all its
    expert's tokens (torch's bf16 matmul on a CPU without AVX-512 BF16 converts each weight
    once per token: 16 tokens ran at 0.9 GB/s of weights read). Only experts with rows are
    walked. Each stage rounds to bf16 where torch's ops do; a row's numbers do not depend on
    the other rows of the call. Elsewhere (fp32, a GPU, strided stacks) :func:`run_experts`."""
    from runtime.cpu_kernel import experts_bf16, on_host_bf16
    experts = np.asarray(experts)
    if not len(experts):
        return
    if not on_host_bf16(tokens, out, weights.gate, weights.up, weights.down):
        run_experts(tokens, out, bounds, experts, weights, index)
        return
    rows = (bounds[experts + 1] - bounds[experts]).astype(np.int64)
    keep = rows > 0
    experts_bf16(tokens, out, bounds[experts][keep], rows[keep], np.asarray(index)[experts][keep],
                 weights.gate, weights.up, weights.down)


#: The expert kernels, by name (``--expert-kernel``): the fast device's, and on a GPU box the
#: host's (each measured by :func:`choose_kernel`; a kernel a device cannot run is left out).
KERNELS = {"loop": run_experts, "grouped": grouped_experts, "fused": fused_experts}


@functools.lru_cache(maxsize=None)  # once per process and shape: engines are made per run
def choose_kernel(device: torch.device, dtype: torch.dtype, hidden: int, inter: int, experts: int = 64,
                  tokens_per_expert: int = 4, reps: int = 5) -> tuple[str, dict[str, float]]:
    """The faster expert kernel on ``device`` for this expert shape, measured (seconds of each
    at ``experts`` experts with ``tokens_per_expert`` tokens each; a kernel the device cannot
    run is left out). In fp32 on the CPU (the row-exact reference mode, :func:`row_exact`) it is
    always ``loop``, whatever the times: ``torch._grouped_mm`` there rounds a group's rows
    differently depending on the other groups in the call (a 2-row group beside two others
    differed by 6e-7 from the same group alone), so only one matmul chain per expert (and per
    request) gives every request the numbers of its batch-1 run."""
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(device=device, dtype=dtype)  # noqa: E731
    w = ExpertWeights(mk(experts, inter, hidden), mk(experts, inter, hidden), mk(experts, hidden, inter))
    x = mk(experts * tokens_per_expert, hidden)
    out = torch.empty_like(x)
    bounds = np.arange(experts + 1) * tokens_per_expert
    idx = np.arange(experts)
    times = {}
    for name, fn in KERNELS.items():
        if name == "fused" and not (device.type == "cpu" and dtype == torch.bfloat16 and fused_available()):
            continue
        try:
            fn(x, out, bounds, idx, w, idx)  # warm-up; also finds out whether the device runs it
            times[name] = float(np.median([timed(device, lambda: fn(x, out, bounds, idx, w, idx))[1] for _ in range(reps)]))
        except (RuntimeError, NotImplementedError):
            continue
    if device.type == "cpu" and dtype == torch.float32:
        return "loop", times
    return min(times, key=times.get), times


def fused_available() -> bool:
    """Whether the C kernel of :func:`fused_experts` is built (or can be) on this machine."""
    from runtime.cpu_kernel import library
    return library() is not None


def host_kernel(dtype: torch.dtype, hidden: int, inter: int) -> str:
    """The host's expert kernel for this shape: the faster one measured on the CPU (in fp32
    the matmul chain, bit-exact per request)."""
    return choose_kernel(torch.device("cpu"), dtype, hidden, inter)[0]


def kernel_for(device: torch.device, dtype: torch.dtype, hidden: int, inter: int):
    """The expert kernel function :func:`choose_kernel` measures faster for this device and shape."""
    return KERNELS[choose_kernel(device, dtype, hidden, inter)[0]]


class ExpertExecutor(Protocol):
    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, ew: ExpertWeights,
                 rows: Sequence[int] | None = None) -> torch.Tensor: ...

