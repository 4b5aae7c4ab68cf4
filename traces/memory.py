"""GPU memory: what a run holds on the fast device, and whether a placement fits. Asked by
every part (runtime flags, simulator, planner, sweeps, validation), so all count it one way.

A run holds the non-expert weights (plus the fp32 ``expert_bias``), the KV cache of its
longest request (KV-cache runs only: tokens up to the last whole block) and ``B`` expert
slots per MoE layer. A uniform budget ``B`` fits iff ``B <= largest_uniform()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from traces.errors import TideError
from traces.shapes import ModelShape

if TYPE_CHECKING:
    from traces.trace import Trace

#: Of a real device's memory, what a run may plan to use: the rest goes to the CUDA
#: context, the allocator's fragmentation and activations.
DEVICE_HEADROOM = 0.9


def kv_tokens(traces: Sequence["Trace"], batch_size: int | None = None) -> int:
    """KV-cache tokens a run of these traces holds: the longest context of any KV-cache trace,
    times the requests held at once (``batch_size``, default each trace's own, at most its requests)."""
    return max((int(t.forwards["context"].max()) * min(batch_size or t.batch_size, len(t.requests))
                for t in traces if t.decoding.kv_cache), default=0)


def kv_tokens_for(lengths: Sequence[tuple[int, int]], block_length: int, kv_cache: bool = True,
                  batch_size: int = 1) -> int:
    """KV-cache tokens of requests ``(prompt, gen)`` decoded in whole blocks (before the run):
    a batch holds up to ``batch_size`` requests' caches at once, each as long as the longest."""
    if not kv_cache or not lengths:
        return 0
    return min(batch_size, len(lengths)) * max(math.ceil((p + g) / block_length) * block_length for p, g in lengths)


@dataclass(frozen=True)
class MemoryBudget:
    """The fast device's memory as one run uses it: ``limit_bytes`` in all, ``fixed_bytes``
    for weights and KV cache, the rest for expert slots."""

    shape: ModelShape
    dtype: str
    limit_bytes: float
    kv_tokens: int = 0

    @classmethod
    def for_traces(cls, traces: Sequence["Trace"], limit_bytes: float, batch_size: int | None = None) -> "MemoryBudget":
        return cls(traces[0].shape, traces[0].dtype, float(limit_bytes), kv_tokens(traces, batch_size))

    @property
    def expert_bytes(self) -> int:
        return self.shape.expert_bytes(self.dtype)

    @property
    def fixed_bytes(self) -> int:
        """Non-expert weights and the KV cache: held whatever the placement."""
        return self.shape.non_expert_bytes(self.dtype) + self.kv_tokens * self.shape.kv_bytes_per_token(self.dtype)

    def need_bytes(self, budget: Sequence[int] | np.ndarray | int) -> int:
        """Everything the run holds with ``budget`` slots per MoE layer (one value or one per layer)."""
        b = np.broadcast_to(np.asarray(budget, dtype=np.int64), (self.shape.n_moe_layers,))
        return int(self.fixed_bytes + int(b.sum()) * self.expert_bytes)

    def fits(self, budget: Sequence[int] | np.ndarray | int) -> bool:
        return self.need_bytes(budget) <= self.limit_bytes

    def fits_alone(self, budget: int) -> bool:
        """Whether one MoE layer can have ``budget`` slots with every other layer at 0 (a
        candidate budget the planner may give some layer)."""
        return self.fixed_bytes + budget * self.expert_bytes <= self.limit_bytes

    def largest_uniform(self) -> int:
        """The largest ``B`` (at most the experts) that every MoE layer can have at once."""
        free = self.limit_bytes - self.fixed_bytes
        return int(max(0, min(self.shape.experts, free // (self.expert_bytes * self.shape.n_moe_layers))))

    def check(self, budget: Sequence[int] | np.ndarray | int, what: str = "the budget") -> None:
        """A TideError unless ``budget`` fits, naming what it takes against what there is."""
        need = self.need_bytes(budget)
        if need > self.limit_bytes:
            raise TideError(f"{what} does not fit: {need / 1e9:.3f} GB of weights, KV cache and expert slots, "
                            f"{self.limit_bytes / 1e9:.3f} GB available")

    def check_one_each(self, what: str) -> None:
        """A TideError unless weights, KV cache and one expert per MoE layer fit (a plan's minimum)."""
        one_each = self.shape.n_moe_layers * self.expert_bytes
        if self.fixed_bytes + one_each > self.limit_bytes:
            raise TideError(f"{what}: cannot hold the non-expert weights and KV cache ({self.fixed_bytes / 1e9:.2f} GB) "
                            f"plus one expert per layer ({one_each / 1e9:.2f} GB)")
