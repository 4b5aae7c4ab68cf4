"""The profiler's benchmark tables: transfers, grouped experts on the fast device, one expert on
the CPU, non-expert layers and the head, overheads. Each cell timed for tens of milliseconds
(its median), expert weights rotated as a run's layers do."""
from __future__ import annotations

import functools
import itertools
import os
import socket
from typing import Any, Callable

import numpy as np
import torch

from runtime.checkpoint import dtype_name, torch_dtype
from runtime.decoding import Sampling, sample
from runtime.device import timed
from runtime.experts import KERNELS, ExpertWeights, choose_kernel, expert_ffn, host_kernel
from runtime.model import DecoderLayer, KVCache, Linear, rope


def timer(device: torch.device, min_s: float = 0.0) -> Callable[[Callable[[], Any], int], float]:
    """Median seconds of ``fn`` (:func:`runtime.device.timed` each) after one warm-up: at least
    ``reps`` runs and at least ``min_s`` seconds of them. A cell of a few hundred microseconds
    timed three times reads 20-50 % apart from one process to the next on a shared box; timed
    for tens of milliseconds, its median holds within a few per cent."""
    def median_s(fn: Callable[[], Any], reps: int) -> float:
        fn()  # warm-up
        out: list[float] = []
        while len(out) < reps or (sum(out) < min_s and len(out) < 2000):
            out.append(timed(device, fn)[1])
        return float(np.median(out))
    return median_s


def measured(value: float) -> dict[str, Any]:
    return {"value": float(value), "source": "measured"}


def memory_bandwidth_gbps(device: torch.device, n: int = 1 << 26, reps: int = 3) -> float:
    """Copy bandwidth of ``device``'s memory (read + write), GB/s: the profile's reference
    figure, re-measured before a validation to tell whether the box is as it was."""
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * n / timer(device)(lambda: b.copy_(a), reps) / 1e9


def read_bandwidth_gbps(device: torch.device, n: int = 1 << 28, reps: int = 3) -> float:
    """Read bandwidth of ``device``'s memory, GB/s: a sum over ``n`` bytes of fp32 (the best of
    ``reps``), what an expert kernel that reads each weight once can reach at most."""
    a = torch.ones(n // 4, dtype=torch.float32, device=device)
    best = min(timed(device, lambda: a.sum())[1] for _ in range(reps + 1))
    return n / best / 1e9


def expert_bytes_read(hidden: int, inter: int, dtype: torch.dtype) -> int:
    """The weight bytes one expert's FFN reads (gate, up and down)."""
    return 3 * hidden * inter * torch.finfo(dtype).bits // 8


def measured_where() -> dict[str, Any]:
    """When and where a profile is measured, and how loaded the box was then."""
    import datetime as dt
    return {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(),
            "threads": torch.get_num_threads(), "cores": os.cpu_count() or 1,
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}



class TableBench:
    """The table half of :class:`runtime.profile.Profiler` (its state: ``cfg``, ``device``, ``dtype``,
    ``quick``, ``reps``, ``time``)."""

    def bandwidths(self) -> tuple[dict, dict]:
        sizes = [65536, 1 << 20, self.cfg.shape.expert_bytes(dtype_name(self.dtype)), 1 << 26]
        if not self.quick:
            sizes = [4096] + sizes + [1 << 28]
        sizes = sorted(set(int(s) for s in sizes))
        out = {"h2d": {}, "d2h": {}}
        cuda = self.device.type == "cuda"
        for kind in ("pinned", "pageable"):
            for direction in ("h2d", "d2h"):
                gbps = []
                for n in sizes:
                    host = torch.empty(n, dtype=torch.uint8)
                    if kind == "pinned" and cuda:
                        host = host.pin_memory()
                    dev = torch.empty(n, dtype=torch.uint8, device=self.device)
                    src, dst = (host, dev) if direction == "h2d" else (dev, host)
                    s = self.time(lambda: dst.copy_(src, non_blocking=kind == "pinned"), self.reps)
                    gbps.append(n / s / 1e9)
                out[direction][kind] = {"source": "measured", "bytes": sizes, "gbps": gbps}
        self._step("transfers")
        return out["h2d"], out["d2h"]

    @functools.cached_property
    def host_read_gbps(self) -> float:
        """This box's host read bandwidth (measured once per profile)."""
        return read_bandwidth_gbps(torch.device("cpu"), (1 << 27) if self.quick else (1 << 29), self.reps)

    def read_fraction(self, dtype: torch.dtype, seconds: list[float], experts: int = 1) -> list[float]:
        """Each cell's expert weights read per second (``experts`` experts in ``seconds``), over
        the host's read bandwidth: how near a CPU expert kernel runs to the memory's speed."""
        nbytes = experts * expert_bytes_read(self.cfg.shape.hidden, self.cfg.shape.moe_intermediate, dtype)
        return [nbytes / sec / 1e9 / self.host_read_gbps for sec in seconds]

    def memory_bandwidth(self, device: torch.device) -> float:
        return memory_bandwidth_gbps(device, (1 << 26) if self.quick else (1 << 28), self.reps)

    # ---- experts ---------------------------------------------------------------------------
    def _experts(self, n: int, dtype: torch.dtype, device: torch.device) -> ExpertWeights:
        s = self.cfg.shape
        g = torch.Generator(device="cpu").manual_seed(0)
        mk = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(device=device, dtype=dtype)  # noqa: E731
        return ExpertWeights(mk(n, s.moe_intermediate, s.hidden), mk(n, s.moe_intermediate, s.hidden),
                             mk(n, s.hidden, s.moe_intermediate))

    def _rotation(self, n: int, dtype: torch.dtype, device: torch.device) -> Callable[[], ExpertWeights]:
        """Sets of ``n`` experts' weights handed out in turn, one set per MoE layer of the model
        (at most 1 GB): in a run a layer's experts come back only after every other layer's
        have passed through the caches, so a table timed on one set, hot in cache, reads up to
        1.4x faster than the same work inside a forward."""
        s = self.cfg.shape
        first = self._experts(n, dtype, device)
        one = sum(t.numel() * t.element_size() for t in (first.gate, first.up, first.down))
        copies = int(max(1, min(s.n_moe_layers, (1 << 30) // max(one, 1))))
        sets = [first] + [ExpertWeights(*(torch.full_like(t, 0.01) for t in (first.gate, first.up, first.down)))
                          for _ in range(copies - 1)]
        turn = itertools.cycle(sets)
        return lambda: next(turn)

    def gpu_experts(self) -> dict[str, Any]:
        """The engine's computation of ``e`` resident experts with ``t`` tokens each, with the
        expert kernel the engine picks on this device (``runtime.experts.choose_kernel``)."""
        s = self.cfg.shape
        kernel, probe = choose_kernel(self.device, self.dtype, s.hidden, s.moe_intermediate)
        run = KERNELS[kernel]
        experts = [1, 8, 32] if self.quick else [1, 8, 32, 64, 128, 256]
        experts = [e for e in experts if e <= s.experts]
        tpe = [1, 4, 16, 64] if self.quick else [1, 4, 16, 64, 256]  # a batch puts many tokens on an expert
        table = []
        for e in experts:
            w = self._rotation(e, self.dtype, self.device)  # a stack of just these experts
            row = []
            for t in tpe:
                x = torch.randn(e * t, s.hidden, device=self.device, dtype=self.dtype)
                out = torch.empty_like(x)
                bounds = np.arange(e + 1) * t
                idx = np.arange(e)
                row.append(self.time(lambda: run(x, out, bounds, idx, w(), idx), self.reps))
            table.append(row)
        # what idle stack entries add to a call: one expert with a token, alone and in a stack
        # of the largest size (the engine's slots hold its budget, its host stack every expert)
        big = max(experts)
        w = self._rotation(big, self.dtype, self.device)
        x = torch.randn(1, s.hidden, device=self.device, dtype=self.dtype)
        out = torch.empty_like(x)
        one = np.array([0, 1])
        in_big = self.time(lambda: run(x, out, one, np.array([0]), w(), np.arange(big)), self.reps)
        group_s = max(0.0, (in_big - table[0][0]) / (big - 1)) if big > 1 and experts[0] == 1 else 0.0
        self._step("grouped experts")
        entry = {"source": "measured", "experts": experts, "tokens_per_expert": tpe, "seconds": table, "kernel": kernel,
                 "group_s": group_s}
        if self.device.type == "cpu":  # the fast device is the host: how near the memory's speed each cell runs
            entry.update(read_gbps=self.host_read_gbps,
                         read_fraction=[self.read_fraction(self.dtype, row, e) for e, row in zip(experts, table)])
        if probe:
            entry["kernels_s"] = probe  # each kernel at 64 experts x 4 tokens: why this one
        return {dtype_name(self.dtype): entry}

    def cpu_expert_ffn(self) -> dict[str, Any]:
        """One expert's FFN on the CPU against its tokens: ``n`` distinct experts (weights come
        from memory, as in a run) through the engine's CPU path (one chain per expert), per expert."""
        s = self.cfg.shape
        tokens = [1, 4, 16, 64, 256] if self.quick else [1, 4, 16, 64, 256, 1024]
        out = {}
        n = min(s.experts, 16 if self.quick else 64)
        cpu = torch.device("cpu")
        for dt in sorted({dtype_name(self.dtype), "float32", "bfloat16"}):
            kernel = host_kernel(torch_dtype(dt), s.hidden, s.moe_intermediate)
            run = KERNELS[kernel]
            w = self._rotation(n, torch_dtype(dt), cpu)
            idx = np.arange(n)
            secs = []
            for t in tokens:
                x = torch.randn(n * t, s.hidden, dtype=torch_dtype(dt))
                res = torch.empty_like(x)
                bounds = np.arange(n + 1) * t
                secs.append(self.time(lambda: run(x, res, bounds, idx, w(), idx), self.reps) / n)
            out[dt] = {"source": "measured", "tokens": tokens, "seconds": secs, "kernel": kernel,
                       "read_gbps": self.host_read_gbps, "read_fraction": self.read_fraction(torch_dtype(dt), secs)}
        self._step("CPU experts")
        return out

    # ---- non-expert work -----------------------------------------------------------------
    def non_expert(self) -> dict[str, Any]:
        s = self.cfg.shape
        tokens = [1, 32, 128] if self.quick else [1, 8, 32, 64, 128, 256, 512]
        context = [64, 512, 2048] if self.quick else [64, 256, 1024, 2048, 4096]
        torch.manual_seed(0)
        with torch.device(self.device):
            moe = DecoderLayer(self.cfg, s.first_k_dense).to(self.dtype)
            dense = DecoderLayer(self.cfg, 0).to(self.dtype) if s.first_k_dense else None
        moe.mlp.executor = lambda l, x, idx, w, ew: torch.zeros_like(x)  # experts are priced apart

        def layer_table(layer) -> list[list[float]]:
            rows = []
            for t in tokens:
                row = []
                for c in context:
                    cache = KVCache(self.cfg, max(c, t), self.device, self.dtype)  # a context holds its tokens
                    x = torch.randn(t, s.hidden, device=self.device, dtype=self.dtype)
                    pos0 = max(c - t, 0)
                    cos, sin = rope(self.cfg, pos0, t, self.dtype, self.device)
                    kv = (cache.layers[0][0], cache.layers[0][1])
                    row.append(self.time(lambda: layer(x, cos, sin, pos0, kv, None), self.reps))
                rows.append(row)
            return rows

        with torch.no_grad():
            moe_t = layer_table(moe)
            dense_t = layer_table(dense) if dense is not None else moe_t
            self._step("layers")
            head = Linear(s.hidden, s.vocab, bias=False, device=self.device, dtype=self.dtype)  # the model's own
            norm = moe.input_layernorm
            head_t = []
            for t in tokens:
                x = torch.randn(t, s.hidden, device=self.device, dtype=self.dtype)
                # the head's work: final norm, lm_head, and turning the logits into tokens
                head_t.append(self.time(lambda: sample(head(norm(x)).float(), Sampling(), None), self.reps))
        self._step("head")
        grid = {"source": "measured", "tokens": tokens, "context": context}
        return {s.model_key: {"moe_layer": {**grid, "seconds": moe_t}, "dense_layer": {**grid, "seconds": dense_t},
                              "head": {"source": "measured", "tokens": tokens, "seconds": head_t}}}


    def overheads(self) -> dict[str, Any]:
        x = torch.zeros(16, device=self.device)
        launch = self.time(lambda: [x.add_(1) for _ in range(100)], self.reps) / 100
        s = self.cfg.shape
        idx = torch.randint(0, s.experts, (32, s.top_k), generator=torch.Generator().manual_seed(0)).to(self.device)
        sync = self.time(lambda: torch.bincount(idx.reshape(-1), minlength=s.experts).cpu().numpy(), self.reps)
        w = self._experts(1, self.dtype, torch.device("cpu"))
        one = torch.randn(1, self.cfg.shape.hidden, dtype=self.dtype)
        task = self.time(lambda: expert_ffn(one, w.gate[0][:1], w.up[0][:1], w.down[0][:, :1]), self.reps)
        self._step("overheads")
        return {"launch_s": measured(launch),
                "sync_s": {**measured(sync), "note": "per MoE layer: the routing (expert counts) reaching the host"},
                "cpu_task_s": measured(task)}

