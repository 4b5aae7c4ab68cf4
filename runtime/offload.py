"""The expert-offload engine: TIDE itself.

Every routed expert lives in host memory (pinned when a GPU is present); up to ``B`` per
MoE layer also have a slot on the fast device, in stacked slot tensors allocated once. As
each MoE layer routes, the engine asks the placement policy of ``traces.policies`` (never
deciding anything itself) what to copy where, copies those experts into their slots (on a
GPU, on a copy stream from pinned memory, ordered by events), computes the resident
experts' tokens on the fast device grouped by expert and the others on the CPU at the
same time, and combines the results in routing order. The fast device may be the CPU
itself: same path, same decisions, copies become host copies, and hits and misses then
run the same kernel on the same weights, so the output equals ``all`` exactly.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from runtime.checkpoint import dtype_name
from runtime.device import to_device
from runtime.drive import ExpertFiles
from runtime.experts import (
    KERNELS,
    ExpertWeights,
    choose_kernel,
    combine,
    host_kernel,
    request_of,
    run_by_request,
    segment_rows,
)
from runtime.host_tier import HostTier, expert_like
from runtime.model import LLaDA2
from traces.policies.host import HostPolicy
from traces.common.errors import TideError
from traces.formats.shapes import dtype_bytes
from traces.formats.vocabulary import COUNTERS
from traces.policies.counters import forward_counters
from traces.policies.runner import PolicyRunner
from traces.policies.spec import Policy

#: Host-side seconds issuing fast-device work, computing CPU experts, issuing copies, and
#: waiting (for routing, copies, activations). On a GPU, device work overlaps these.
#: Host seconds the engine spends, by what: expert math on the fast device and on the CPU,
#: issuing copies, waiting (routing to the host, copies, activations), the policy decision,
#: per-forward bookkeeping (counters), and all of ``_execute`` (``layer_s``: the rest of it is
#: issuing work: sorting tokens, gathers, combining).
TIMERS = ("fast_s", "cpu_s", "copy_s", "wait_s", "decide_s", "book_s", "layer_s")


@dataclass
class _Layer:
    host: ExpertWeights
    slots: ExpertWeights | None
    slot_of: np.ndarray  # [E] which slot holds each expert (-1: none), as the copies made it
    host_row: np.ndarray | None = None  # [E] each expert's row of ``host`` (-1: none), when it holds only some
    preloaded: np.ndarray | None = None  # the experts loaded straight into ``slots`` (never copied, never evicted)

    def rows(self, experts: np.ndarray) -> np.ndarray:
        """Rows of ``host`` holding ``experts``."""
        return np.asarray(experts) if self.host_row is None else self.host_row[experts]


@dataclass
class OffloadEngine:
    model: LLaDA2
    policy: Policy
    device: torch.device
    setup_counts: np.ndarray | None = None
    kernel: str = "auto"  # the fast device's expert kernel (runtime.experts.KERNELS); auto: the faster, measured
    timers: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMERS, 0.0))
    drive: ExpertFiles | None = None  # the checkpoint's experts on the drive, for a policy with a host tier

    def __post_init__(self) -> None:
        s = self.model.cfg.shape
        if self.policy.n_layers != s.n_moe_layers:
            raise TideError(f"policy has {self.policy.n_layers} MoE layers, the model {s.n_moe_layers}")
        self.cuda = self.device.type == "cuda"
        self.kernel_times: dict[str, float] = {}
        if self.kernel == "auto":
            self.kernel, self.kernel_times = choose_kernel(self.device, self.model.dtype, s.hidden, s.moe_intermediate)
        elif self.kernel not in KERNELS:
            raise TideError(f"--expert-kernel: expected auto, {' or '.join(KERNELS)}, got {self.kernel!r}")
        self._run_fast = KERNELS[self.kernel]
        # the CPU path: on a GPU box the host's faster kernel for this shape (the profile's CPU
        # table is timed on it); when the fast device is the CPU, the fast device's kernel
        # itself (hits and misses are then the same computation on the same cores, one table)
        self._run_cpu = self._run_fast if not self.cuda else KERNELS[host_kernel(self.model.dtype, s.hidden, s.moe_intermediate)]
        self.runner = PolicyRunner(self.policy, s.experts, setup_counts=self.setup_counts)
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None  # expert copies
        self.act_stream = torch.cuda.Stream(self.device) if self.cuda else None  # activations to and from the CPU
        self.layers: list[_Layer] = []
        self.host_tier = self._host_tier()
        for i, blk in enumerate(self.model.moe_blocks):
            host = blk.experts if not blk.on_drive else self.host_tier.stack
            if host.gate.device.type != "cpu":
                raise TideError("the offload engine needs the routed experts in host memory (load with experts_device='cpu')")
            b = int(self.policy.budget[i])
            slots = None
            if blk.resident is not None:  # loaded straight onto the fast device: those are the slots
                ids = blk.resident_ids
                kind = self.policy.kinds[i]
                if b != len(ids) or not (kind == "static" or b == s.experts):
                    raise TideError(f"layer {blk.layer}: {len(ids)} of its experts were loaded onto the fast device "
                                    f"for a static layer (or one wholly there); the policy runs it {kind} at budget {b}. "
                                    "Run the plan the model was loaded for")
                layer = _Layer(host, blk.resident, np.full(s.experts, -1, dtype=np.int64), blk.host_row, ids)
                layer.slot_of[ids] = np.arange(len(ids))
                self.layers.append(layer)
                blk.executor = self._execute
                continue
            if b:
                # zeroed now, not at the first copy: on a CPU fast device the first touch of fresh
                # memory faults page by page, a cost of making the engine, not of running it
                slots = ExpertWeights(*(torch.zeros((b, *t.shape[1:]), dtype=t.dtype, device=self.device)
                                        for t in (host.gate, host.up, host.down)))
            self.layers.append(_Layer(host, slots, np.full(s.experts, -1, dtype=np.int64)))
            blk.executor = self._execute
        self.expert_bytes = s.expert_bytes(dtype_name(self.model.dtype))
        self.act_bytes = 2 * s.hidden * dtype_bytes(dtype_name(self.model.dtype))
        self._counters: list[dict[str, np.ndarray]] = []
        self._pending: list[tuple[Any, np.ndarray, list[torch.Tensor]]] = []  # forwards not yet counted
        self.forward_counts: list[np.ndarray] = []  # each forward's [L, E] routed-token counts (the whole batch's)
        self._in_forward = False

    def _host_tier(self) -> HostTier | None:
        """The host tier: the layers whose experts the model left on the drive are read from the
        checkpoint's files as the policy's host tier says (a layer it keeps wholly in host memory
        is read in now); a policy whose host tier reads a layer the model holds is refused."""
        s = self.model.cfg.shape
        loaded = np.array([blk.on_drive for blk in self.model.moe_blocks])
        if (self.policy.drive_layers(s.experts) & ~loaded).any():
            raise TideError("the policy's host tier reads layers whose experts the model holds in memory (load with "
                            "drive_layers = at least the policy's drive layers)")
        if not loaded.any():
            return None
        if self.drive is None:
            raise TideError("a model whose experts stay on the drive needs the checkpoint's expert files "
                            "(drive=runtime.checkpoint.drive_files(...))")
        host = self.policy.host or HostPolicy.everything(s.n_moe_layers, s.experts)
        return HostTier(host, self.drive, s.moe_layers, s.experts, expert_like(s, self.model.dtype),
                        setup_counts=self.setup_counts, pin=self.cuda, loaded=loaded)

    def reset(self) -> None:
        """Forget placement, counters and timers (after a warm-up): the next forward sets up anew."""
        self.runner = PolicyRunner(self.policy, self.model.cfg.shape.experts, setup_counts=self.setup_counts)
        if self.host_tier is not None:
            self.host_tier.reset()
        for layer in self.layers:
            if layer.preloaded is None:
                layer.slot_of[:] = -1
        self._counters, self._pending, self.forward_counts = [], [], []
        self.timers = dict.fromkeys(TIMERS, 0.0)

    def detach(self) -> None:
        """Give the model back its own expert execution (all experts where the model runs), and
        the memory of the engine's slots and host tier back now, whatever still refers to the
        engine (its counters stay: :meth:`totals` still reports them)."""
        from runtime.experts import local_experts
        for blk in self.model.moe_blocks:
            blk.executor = local_experts
        if self.host_tier is not None:  # its stacks, mapped apart, go back to the OS (the counters stay)
            self.host_tier.release()
        for layer, blk in zip(self.layers, self.model.moe_blocks):
            if blk.resident is None:  # the engine's own slots (a model's resident experts stay the model's)
                layer.slots = None
            if blk.on_drive:  # rows of the host tier's stack
                layer.host = None

    def __enter__(self) -> "OffloadEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ---- one forward -------------------------------------------------------------------
    def begin(self, kind: str, step: int, more: Sequence[tuple[str, int]] = ()) -> None:
        """Start a forward: its (first) request's kind and step, a batch's others in ``more``."""
        self.runner.begin(kind, step, more)
        if self.host_tier is not None:
            self.host_tier.begin(kind, step, more)
        L, E = self.policy.n_layers, self.model.cfg.shape.experts
        self._counts = np.zeros((L, E), dtype=np.int64)
        self._choices: list[torch.Tensor | None] = [None] * L
        self._in_forward = True

    def end(self) -> Callable[[], dict[str, np.ndarray]]:
        """Finish the forward. Its counters (``[L]`` each, defined in ``traces.policies.counters``) are
        counted when first asked for (the returned callable, :attr:`forward_counters`,
        :meth:`totals`), not on the forward's path: no host work or device sync of their own."""
        t0 = time.perf_counter()
        self._pending.append((self.runner.end(), self._counts, self._choices))
        self.forward_counts.append(self._counts)
        i = len(self._counters) + len(self._pending) - 1
        self._in_forward = False
        self.timers["book_s"] += time.perf_counter() - t0
        return lambda: self.forward_counters[i]

    @property
    def forward_counters(self) -> list[dict[str, np.ndarray]]:
        """Every forward's counters so far, in order (counting what was deferred)."""
        for decision, counts, choices in self._pending:
            ch = torch.stack(choices, dim=1).cpu().numpy()  # [T, L, k]
            self._counters.append(forward_counters(decision, counts, self.expert_bytes, self.act_bytes, ch, ch.shape[0]))
        self._pending.clear()
        return self._counters

    def totals(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: int(sum(c[k].sum() for c in self.forward_counters)) for k in COUNTERS}
        if self.host_tier is not None:
            out.update(self.host_tier.totals())
        return out

    # ---- one layer ----------------------------------------------------------------------
    def _copy(self, layer: _Layer, copies: np.ndarray) -> None:
        """Copy experts into slots (on a GPU: on the copy stream, after every earlier use of the slots)."""
        if not len(copies):
            return
        if layer.preloaded is not None:  # already there since loading: the setup's copies are done
            missing = [int(e) for e in copies[:, 0] if layer.slot_of[e] < 0]
            if missing:
                raise TideError(f"expert {missing[0]} is to be copied to the fast device, but its layer's experts were "
                                "loaded there for another set of residents (no host copy to copy from)")
            return
        self._host_ready()
        t0 = time.perf_counter()
        stream = self.copy_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for e, slot in copies.tolist():
                row = int(layer.rows(e))
                for dst, src in ((layer.slots.gate, layer.host.gate), (layer.slots.up, layer.host.up),
                                 (layer.slots.down, layer.host.down)):
                    dst[slot].copy_(src[row], non_blocking=True)
                layer.slot_of[e] = slot
        self.timers["copy_s"] += time.perf_counter() - t0

    def _execute(self, l: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, ew: ExpertWeights,
                 rows: Sequence[int] | None = None) -> torch.Tensor:
        t_layer = time.perf_counter()
        try:
            return self._layer(l, x, idx, w, rows)
        finally:
            self.timers["layer_s"] += time.perf_counter() - t_layer

    def _layer(self, l: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
               rows: Sequence[int] | None = None) -> torch.Tensor:
        """One MoE layer of a forward: every request's tokens routed as one batch (``rows``:
        each request's token count), one decision, one dispatch."""
        if not self._in_forward:
            raise RuntimeError("OffloadEngine: forward run without begin()")
        i = l - self.model.cfg.shape.first_k_dense
        layer = self.layers[i]
        T, k = idx.shape
        flat = idx.reshape(-1)
        counts_t = torch.bincount(flat, minlength=self.model.cfg.shape.experts)
        t0 = time.perf_counter()
        counts = counts_t.cpu().numpy()  # the policy needs the routing on the host
        self.timers["wait_s"] += time.perf_counter() - t0
        self._counts[i] = counts
        self._choices[i] = idx
        t0 = time.perf_counter()
        setup, copies, waves = self.runner.layer(i, counts)
        self.timers["decide_s"] += time.perf_counter() - t0
        if self.host_tier is not None and layer.preloaded is None:
            layer.host_row = self.host_tier.prepare(i, counts, self._demand(i, counts, setup, copies, waves))
        try:
            return self._dispatch(layer, i, x, idx, w, rows, flat, counts, setup, copies, waves)
        finally:
            if self.host_tier is not None:
                if self.copy_stream is not None:  # copies read host rows the tier is about to reuse
                    self.copy_stream.synchronize()
                self.host_tier.finish()

    def _demand(self, i: int, counts: np.ndarray, setup: np.ndarray, copies: np.ndarray, waves) -> np.ndarray:
        """[E] the experts layer ``i`` needs from host memory this forward (the host tier's
        demand, :func:`traces.policies.host.demand`): those it computes on the CPU, those it copies."""
        need = np.zeros(len(counts), bool)
        if waves is None:
            need[(counts > 0) & (self.runner.state.slot_of[i] < 0)] = True
        else:
            for wave in waves:
                need[wave.copies[:, 0]] = True
        need[setup[:, 0]] = True
        need[copies[:, 0]] = True
        return need

    def _dispatch(self, layer: _Layer, i: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                  rows: Sequence[int] | None, flat: torch.Tensor, counts: np.ndarray, setup: np.ndarray,
                  copies: np.ndarray, waves) -> torch.Tensor:
        """The layer's decided work: copies, hits on the fast device, misses on the CPU, combined."""
        T, k = idx.shape
        if len(setup):  # the run's first forward: slots must be filled before anything reads them
            self._copy(layer, setup)
            self._wait_copies()
        order = flat.argsort(stable=True)
        tokens = x[order // k]
        out = torch.empty_like(tokens)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        req = request_of(order, k, rows, x)  # on the CPU: each request's rows of an expert in calls of their own
        if waves is None:
            self._copy(layer, copies)
            if layer.preloaded is None:
                layer.slot_of[:] = self.runner.state.slot_of[i]  # evictions
            active = np.flatnonzero(counts)
            on_fast = layer.slot_of[active] >= 0
            fresh = np.isin(active, copies[:, 0]) if len(copies) else np.zeros(len(active), dtype=bool)
            miss = self._send_misses(tokens, bounds, active[~on_fast], req)  # activations leave first ...
            self._fast(layer, tokens, out, bounds, active[on_fast & ~fresh], req)  # ... hits overlap copies and CPU
            if fresh.any():
                self._wait_copies()
                self._fast(layer, tokens, out, bounds, active[on_fast & fresh], req)
            self._cpu(layer, out, miss)
        else:
            for wave in waves:
                self._copy(layer, wave.copies)
                self._wait_copies()
                self._fast(layer, tokens, out, bounds, wave.gpu_experts, req)
            if layer.preloaded is None:
                layer.slot_of[:] = self.runner.state.slot_of[i]
        return combine(out, order, w, x.dtype)

    def _host_ready(self) -> None:
        """The host tier's reads for this layer have landed (before host rows are used)."""
        if self.host_tier is not None:
            self.host_tier.ready()

    def _wait_copies(self) -> None:
        if self.copy_stream is not None:
            t0 = time.perf_counter()
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self.timers["wait_s"] += time.perf_counter() - t0

    def _fast(self, layer: _Layer, tokens, out, bounds, experts: np.ndarray, req: np.ndarray | None = None) -> None:
        """Resident experts' tokens on the fast device."""
        if not len(experts):
            return
        t0 = time.perf_counter()
        run_by_request(self._run_fast, tokens, out, bounds, experts, layer.slots, layer.slot_of, req)
        self.timers["fast_s"] += time.perf_counter() - t0

    def _send_misses(self, tokens: torch.Tensor, bounds: np.ndarray, experts: np.ndarray, req: np.ndarray | None = None):
        """Start moving the missed experts' tokens to the host (on a GPU: on the activation
        stream, so the hits queued after it do not wait for it)."""
        if not len(experts):
            return None
        rows_np, sizes = segment_rows(bounds, experts)
        req = None if req is None else req[rows_np]
        rows = to_device(rows_np, tokens.device)
        picked = tokens[rows]
        if self.act_stream is None:
            return rows, picked, sizes, experts, None, req
        host = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
        self.act_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.act_stream):
            host.copy_(picked, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        picked.record_stream(self.act_stream)  # read on the activation stream after we drop it
        return rows, host, sizes, experts, done, req

    def _cpu(self, layer: _Layer, out: torch.Tensor, miss) -> None:
        """Missed experts' tokens on the CPU with the host weights; results back in one copy."""
        if miss is None:
            return
        rows, host_tokens, sizes, experts, done, req = miss
        self._host_ready()
        t0 = time.perf_counter()
        if done is not None:
            done.synchronize()
        t1 = time.perf_counter()
        self.timers["wait_s"] += t1 - t0
        res = torch.empty(host_tokens.shape, dtype=host_tokens.dtype, pin_memory=done is not None)
        run_by_request(self._run_cpu, host_tokens, res, np.concatenate([[0], np.cumsum(sizes)]), np.arange(len(experts)),
                       layer.host, layer.rows(experts), req)
        self.timers["cpu_s"] += time.perf_counter() - t1
        if done is None:
            out[rows] = res
            return
        with torch.cuda.stream(self.act_stream):
            back = res.to(out.device, non_blocking=True)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.act_stream)
        back.record_stream(current)  # made on the activation stream, read on the compute stream
        out[rows] = back
