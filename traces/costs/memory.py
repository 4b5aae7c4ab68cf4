"""Memory: what a run holds on the fast device, in host memory and on the drive, and whether
a placement fits. Asked by every part (runtime flags, simulator, planner, sweeps, validation), so all
count it one way.

The fast device holds the non-expert weights (plus the fp32 ``expert_bias``), the KV cache
of the batch (KV-cache runs only: its requests' caches at once, each up to the last whole
block of the longest) and ``B`` expert slots per MoE layer. The host holds only the experts
that can be missing from the fast device: a layer whose budget is every expert needs no
host copy, a ``static`` layer needs its non-resident experts only, and ``tide``, ``swap``
and ``cpu`` layers need every expert there. A uniform budget ``B`` fits the device iff
``B <= largest_uniform()``. With a host tier (:mod:`traces.policies.host`) host memory holds at
most each layer's host budget of those, plus staging for one layer's reads from the drive,
and the drive holds every expert (the checkpoint).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from traces.common.checks import resolve_batch_size
from traces.common.errors import TideError
from traces.common.values import need_float
from traces.formats.shapes import ModelShape
from traces.policies.host import HostPolicy

if TYPE_CHECKING:
    from traces.formats.trace_file import Trace
    from traces.policies.spec import Policy

#: Of a real device's memory, what a run may plan to use: the rest goes to the CUDA
#: context, the allocator's fragmentation and activations.
DEVICE_HEADROOM = 0.9


def kv_tokens(traces: Sequence["Trace"], batch_size: int | None = None) -> int:
    """KV-cache tokens a run of these traces holds: the longest context of any KV-cache trace,
    times the requests held at once (``batch_size``, default each trace's own, at most its requests)."""
    return max((int(t.forwards["context"].max()) * min(resolve_batch_size(batch_size, trace=t.batch_size), len(t.requests))
                for t in traces if t.decoding.kv_cache), default=0)


def kv_tokens_for(lengths: Sequence[tuple[int, int]], block_length: int, kv_cache: bool = True,
                  batch_size: int = 1) -> int:
    """KV-cache tokens of requests ``(prompt, gen)`` decoded in whole blocks (before the run):
    a batch holds up to ``batch_size`` requests' caches at once, each as long as the longest."""
    if not kv_cache or not lengths:
        return 0
    return min(batch_size, len(lengths)) * max(math.ceil((p + g) / block_length) * block_length for p, g in lengths)


def host_experts(shape: ModelShape, kinds: Sequence[str], budget: Sequence[int] | np.ndarray) -> np.ndarray:
    """Experts each MoE layer keeps in host memory (see module doc): none at a budget of every
    expert, a static layer's non-resident ones, every expert otherwise."""
    b = np.broadcast_to(np.asarray(budget, dtype=np.int64), (len(kinds),))
    E = shape.experts
    static = np.array([k == "static" for k in kinds], dtype=bool)
    return np.where(b >= E, 0, np.where(static, E - b, E))


@dataclass(frozen=True)
class MemoryBudget:
    """Memory as one run uses it: on the fast device ``limit_bytes`` in all, ``fixed_bytes``
    for weights and KV cache, the rest for expert slots; in host memory ``host_limit_bytes``
    for the experts that can be missing from the device (:func:`host_experts`)."""

    shape: ModelShape
    dtype: str
    limit_bytes: float
    kv_tokens: int = 0
    host_limit_bytes: float = float("inf")
    drive_bytes: float | None = None  # the drive's capacity, when the box has one: the third tier

    @classmethod
    def for_traces(cls, traces: Sequence["Trace"], limit_bytes: float, batch_size: int | None = None,
                   host_limit_bytes: float = float("inf")) -> "MemoryBudget":
        return cls(traces[0].shape, traces[0].dtype, float(limit_bytes), kv_tokens(traces, batch_size),
                   float(host_limit_bytes))

    @classmethod
    def on_device(cls, shape: ModelShape, dtype: str, gpu_mem_gb: float | None, device_bytes: float | None,
                  kv_tokens: int = 0, host_limit_bytes: float = float("inf"), device: str = "the device",
                  drive_bytes: float | None = None) -> "MemoryBudget":
        """The budget a run may use: ``--gpu-mem-gb`` (default: the whole ``device_bytes``,
        unbounded where that is unknown), refused with one line when it is more than the
        device's memory (``device`` names it) or not a positive number."""
        if gpu_mem_gb is not None:
            need_float(gpu_mem_gb, "--gpu-mem-gb", positive=True)
            if device_bytes is not None and gpu_mem_gb * 1e9 > device_bytes:
                raise TideError(f"--gpu-mem-gb {gpu_mem_gb:g}: more than the memory of {device} ({device_bytes / 1e9:.1f} GB)")
        limit = gpu_mem_gb * 1e9 if gpu_mem_gb is not None else device_bytes
        return cls(shape, dtype, float("inf") if limit is None else float(limit), int(kv_tokens), float(host_limit_bytes),
                   drive_bytes)

    @staticmethod
    def host_limit(host_mem_gb: float | None, host_bytes: float | None, where: str = "the host") -> float:
        """Host memory a run may use: ``--host-mem-gb`` (default: all of ``host_bytes``, unbounded
        where unknown), refused with one line when not a positive number or above ``host_bytes``."""
        if host_mem_gb is None:
            return float("inf") if host_bytes is None else float(host_bytes)
        need_float(host_mem_gb, "--host-mem-gb", positive=True)
        if host_bytes is not None and host_mem_gb * 1e9 > host_bytes:
            raise TideError(f"--host-mem-gb {host_mem_gb:g}: more than the memory of {where} ({host_bytes / 1e9:.1f} GB)")
        return host_mem_gb * 1e9

    def host_need_bytes(self, kinds: Sequence[str], budget: Sequence[int] | np.ndarray,
                        host_budget: Sequence[int] | np.ndarray | None = None) -> int:
        """Host memory the experts of a placement (a kind and budget per MoE layer) take; with a
        host tier (``host_budget`` per layer), at most that many per layer, plus the staging
        rows that reads from the drive land in (:meth:`staging_experts`)."""
        need = host_experts(self.shape, kinds, budget)
        if host_budget is None:
            return int(need.sum()) * self.expert_bytes
        held = np.minimum(need, np.broadcast_to(np.asarray(host_budget, np.int64), need.shape))
        return (int(held.sum()) + self.staging_experts(bool((held < need).any()))) * self.expert_bytes

    def staging_experts(self, reads: bool = True) -> int:
        """Host rows that a layer's reads from the drive land in (one layer's experts at most:
        layers run one after another), when any layer reads the drive."""
        return self.shape.experts if reads else 0

    def uniform_host_budget(self, kinds: Sequence[str], budget: Sequence[int] | np.ndarray) -> int:
        """The largest host budget, the same for every layer, whose need fits host memory
        (every expert when all fit without the drive; 0 when not even the staging fits)."""
        E = self.shape.experts
        if self.host_need_bytes(kinds, budget) <= self.host_limit_bytes:
            return E
        fits = [h for h in range(E) if self.host_need_bytes(kinds, budget, [h] * len(kinds)) <= self.host_limit_bytes]
        return max(fits, default=0)

    def lru_host(self, policy: "Policy") -> "Policy | None":
        """``policy`` with a host cache evicting the least recently used expert (what mapping the
        checkpoint gives people today) at the largest uniform host budget that fits beside it;
        None where host memory holds everything it needs, or not even the staging for reads."""
        E, L = self.shape.experts, policy.n_layers
        h = self.uniform_host_budget(policy.kinds, policy.budget)
        if h >= E or self.host_need_bytes(policy.kinds, policy.budget, [h] * L) > self.host_limit_bytes:
            return None
        return policy.with_host(HostPolicy.make("lru", L, E, h))

    def check_holds(self, what: str) -> None:
        """A TideError unless the box can hold the model's experts between its memories, naming
        the tier that falls short. With a drive (the third tier) every expert lives there, so
        only the drive's size and the host's staging for reads from it can fall short; without
        one, the fast device's room beside weights and KV cache and host memory must hold them:
        the least any placement keeps in host memory is what the device cannot take."""
        E, L = self.shape.experts, self.shape.n_moe_layers
        room = max(0.0, self.limit_bytes - self.fixed_bytes) // self.expert_bytes  # slots the device can hold
        least_host = max(0, L * E - int(min(room, L * E))) * self.expert_bytes
        if self.drive_bytes is not None and least_host > self.host_limit_bytes:
            total = L * E * self.expert_bytes
            if total > self.drive_bytes:
                raise TideError(f"{what}: the drive falls short: {self.shape.name}'s experts ({total / 1e9:.0f} GB) "
                                f"do not fit on it ({self.drive_bytes / 1e9:.0f} GB)")
            staging = self.staging_experts() * self.expert_bytes
            if staging > self.host_limit_bytes:
                raise TideError(f"{what}: host memory falls short: reading experts from the drive needs "
                                f"{staging / 1e9:.1f} GB of host memory to land in, {self.host_limit_bytes / 1e9:.1f} GB available")
            return
        if least_host > self.host_limit_bytes:
            raise TideError(f"{what}: {self.shape.name}'s experts ({L * E * self.expert_bytes / 1e9:.0f} GB) do not fit "
                            f"between the GPU's room for them ({room * self.expert_bytes / 1e9:.0f} GB) and host memory "
                            f"({self.host_limit_bytes / 1e9:.0f} GB)")

    def check_host(self, kinds: Sequence[str], budget: Sequence[int] | np.ndarray, what: str = "the placement",
                   host_budget: Sequence[int] | np.ndarray | None = None) -> None:
        """A TideError unless the experts the host must hold (at most ``host_budget`` per layer
        with a host tier) fit in its memory."""
        need = self.host_need_bytes(kinds, budget, host_budget)
        if host_budget is not None and need > self.host_limit_bytes:
            raise TideError(f"{what} does not fit in host memory: its host budgets need {need / 1e9:.1f} GB "
                            f"(with {self.staging_experts()} experts' staging for drive reads), "
                            f"{self.host_limit_bytes / 1e9:.1f} GB available: lower the host budget")
        if need > self.host_limit_bytes:
            raise TideError(f"{what} does not fit in host memory: its layers need {need / 1e9:.1f} GB of experts there "
                            f"(tide, swap and cpu layers every expert, static layers their non-resident ones), "
                            f"{self.host_limit_bytes / 1e9:.1f} GB available")

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
