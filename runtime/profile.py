"""The hardware profiler: measures this box in the profile format of ``traces.profile``.

``python -m runtime.profile --out FILE [--checkpoint DIR] [--device cuda|cpu] [--quick]``

Measures capacities, transfer bandwidth against size (pinned and pageable, both
directions; host copies when the fast device is the CPU), the engine's grouped expert
computation on the fast device over experts x tokens, one expert's FFN on the CPU against
tokens (per weight dtype), a MoE layer's and a dense layer's non-expert time against tokens
and context, the head's time against tokens, and overheads (launch, synchronisation, CPU
expert dispatch). Shapes come from the checkpoint's ``config.json`` (LLaDA2.0-mini's when
none is given); weights are random, since times do not depend on values. Every value is
marked ``measured``. ``--quick`` keeps grids small (under a minute on 2 cores).
"""
from __future__ import annotations

import itertools
import os
import platform
import socket
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from runtime.checkpoint import dtype_name, torch_dtype
from runtime.config import ModelConfig
from runtime.decoding import Sampling, sample
from runtime.device import check_device, host_memory_bytes, speed_reference_s, synchronize, timed
from runtime.model import KERNELS, LLaDA2, DecoderLayer, ExpertWeights, KVCache, choose_kernel, expert_ffn, rope, run_experts
from traces.cli import ArgumentParser, check_out_path, run_cli
from traces.policies import Policy
from traces.profile import FORMAT, VERSION, Profile
from traces.shapes import ModelShape
from traces.work import layer_work

if TYPE_CHECKING:
    from traces.trace import Trace


def _timer(device: torch.device, min_s: float = 0.0) -> Callable[[Callable[[], Any], int], float]:
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


def _m(value: float) -> dict[str, Any]:
    return {"value": float(value), "source": "measured"}


def memory_bandwidth_gbps(device: torch.device, n: int = 1 << 26, reps: int = 3) -> float:
    """Copy bandwidth of ``device``'s memory (read + write), GB/s: the profile's reference
    figure, re-measured before a validation to tell whether the box is as it was."""
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * n / _timer(device)(lambda: b.copy_(a), reps) / 1e9


def measured_where() -> dict[str, Any]:
    """When and where a profile is measured, and how loaded the box was then."""
    import datetime as dt
    return {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(),
            "threads": torch.get_num_threads(), "cores": os.cpu_count() or 1,
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


class Profiler:
    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, quick: bool, progress: bool = True,
                 model: LLaDA2 | None = None, batches: bool = True):
        self.cfg, self.device, self.dtype, self.quick, self.model = cfg, device, dtype, quick, model
        self.batches = batches  # measure what a batch adds per request (member_s)
        self.reps = 3 if quick else 7
        # Every cell is timed for tens of milliseconds (its median), never rescaled: the speed
        # reference is only recorded, so that a validation can report how the box moved since.
        self.time = _timer(device, 0.02 if quick else 0.1)
        self.reference_s = speed_reference_s()
        self.bar = tqdm(total=8, desc="profiling", disable=not progress)

    def _step(self, what: str) -> None:
        self.bar.set_postfix_str(what)
        self.bar.update(1)

    # ---- transfers -----------------------------------------------------------------------
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
        expert kernel the engine picks on this device (``runtime.model.choose_kernel``)."""
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
            w = self._rotation(n, torch_dtype(dt), cpu)
            idx = np.arange(n)
            secs = []
            for t in tokens:
                x = torch.randn(n * t, s.hidden, dtype=torch_dtype(dt))
                res = torch.empty_like(x)
                bounds = np.arange(n + 1) * t
                secs.append(self.time(lambda: run_experts(x, res, bounds, idx, w(), idx), self.reps) / n)
            out[dt] = {"source": "measured", "tokens": tokens, "seconds": secs, "kernel": "loop"}
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
            head = torch.nn.Linear(s.hidden, s.vocab, bias=False, device=self.device, dtype=self.dtype)
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

    def _routing(self, active: int, forwards: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``forwards`` steps of one block (32 tokens), each token choosing ``top_k`` distinct
        experts among ``active`` (a new random draw every forward, so tide's refresh moves experts)."""
        s = self.cfg.shape
        g = torch.Generator().manual_seed(1)
        T, k = 32, s.top_k
        out = []
        for _ in range(forwards):
            idx = torch.rand(T, active, generator=g).argsort(dim=1)[:, :k]
            w = torch.rand(T, k, generator=g)
            x = torch.randn(T, s.hidden, generator=g)
            out.append((idx.to(self.device), w.to(self.device), x.to(device=self.device, dtype=self.dtype)))
        return out

    def host_costs(self) -> dict[str, Any]:
        """The engine's host-thread costs, measured by running :class:`runtime.offload.OffloadEngine`
        itself on one MoE layer of this shape (its own timers), under the policies whose code
        paths differ: ``all`` (every expert resident), ``cpu`` (every expert missed), ``static``
        (a steady decision), ``tide`` at tau 1 (a refresh that copies, every forward) and
        ``swap`` at two budgets (its decision per wave, and the rest). Per forward of 32 tokens;
        the median over the forwards."""
        import dataclasses
        from runtime.offload import OffloadEngine
        s = self.cfg.shape
        cfg1 = dataclasses.replace(self.cfg, shape=dataclasses.replace(s, layers=1, first_k_dense=0, vocab=1))
        E, k = s.experts, s.top_k
        active = min(E, max(2 * k, 32 * k // 4))  # a step's distinct experts, about a quarter of its choices
        with torch.device("meta"):  # the engine only reads the MoE block's experts: nothing else needs values
            model = LLaDA2(cfg1).to(self.dtype)
        model = model.to_empty(device=self.device)
        blk = model.moe_blocks[0]
        host = ExpertWeights(*(torch.empty((E, *shp), dtype=self.dtype) for shp in (
            (s.moe_intermediate, s.hidden), (s.moe_intermediate, s.hidden), (s.hidden, s.moe_intermediate))))
        g = torch.Generator().manual_seed(0)
        for t in (host.gate, host.up, host.down):  # only the experts a run touches hold values; the rest stays unwritten (and unpaged)
            t[:active].copy_(torch.randn(t[:active].shape, generator=g) * 0.02)
        if self.device.type == "cuda":
            host = ExpertWeights(*(t.pin_memory() for t in (host.gate, host.up, host.down)))
        blk.experts = host
        forwards = 8 if self.quick else 24
        steps = self._routing(active, forwards + 1)
        b = max(1, active // 4)

        def per_forward(policy: Policy) -> tuple[dict[str, float], float]:
            """Median seconds per forward by timer, and experts copied per forward."""
            with OffloadEngine(model, policy, self.device) as eng:
                rows = []
                for f, (idx, w, x) in enumerate(steps):
                    before = dict(eng.timers)
                    eng.begin("step", f)
                    eng._execute(0, x, idx, w, host)
                    eng.end()
                    synchronize(self.device)
                    if f:  # the first forward sets up
                        rows.append({t: eng.timers[t] - before[t] for t in eng.timers})
                tot = eng.totals()
            med = {t: float(np.median([r[t] for r in rows])) for t in rows[0]}
            return med, tot["migrations"] / (len(steps) - 1)

        def rest(t: dict[str, float]) -> float:  # _execute's time that no other timer holds: issuing
            return t["layer_s"] - t["fast_s"] - t["cpu_s"] - t["copy_s"] - t["wait_s"] - t["decide_s"] + t["book_s"]

        t_all, _ = per_forward(Policy.make("all", 1, E))
        t_cpu, _ = per_forward(Policy.make("cpu", 1, E))
        t_static, _ = per_forward(Policy.make("static", 1, E, budget=b))
        t_tide, moved = per_forward(Policy.make("tide", 1, E, budget=b, tau=1))
        t_swap, _ = per_forward(Policy.make("swap", 1, E, budget=b))  # several waves ...
        t_swap1, _ = per_forward(Policy.make("swap", 1, E, budget=active))  # ... and one
        chosen = float(np.median([len(torch.unique(idx)) for idx, _, _ in steps[1:]]))
        waves, waves1 = -(-chosen // b), -(-chosen // active)
        per_wave = max(0.0, (t_swap["decide_s"] - t_swap1["decide_s"]) / max(waves - waves1, 1.0))
        cuda = self.device.type == "cuda"
        copy_call = t_tide["copy_s"] / max(moved, 1)
        if not cuda:  # on the CPU the copy is the host's own work: keep only what moving the bytes does not explain
            copy_call = max(0.0, copy_call - self.time(lambda: host.gate[1].copy_(host.gate[0]), self.reps) * 3)
        self._step("host")
        note = "measured with runtime.offload.OffloadEngine on one MoE layer, 32-token steps"
        return {
            "decide_s": {**_m(t_static["decide_s"]), "note": note},
            "refresh_s": {**_m(t_tide["decide_s"]), "note": note},
            "swap_s": {**_m(max(0.0, t_swap1["decide_s"] - per_wave * waves1)), "note": note},
            "swap_wave_s": {**_m(per_wave), "note": note + f"; swap at {waves:.0f} waves against {waves1:.0f}"},
            "issue_s": {**_m(rest(t_all)), "note": note},
            "copy_call_s": {**_m(copy_call), "note": note},
            "expert_call_s": {**_m(t_all["fast_s"] / active if cuda else 0.0),
                              "note": note + ("" if cuda else "; the fast device is the CPU: its grouped time is host time")},
            "miss_call_s": {**_m(max(0.0, rest(t_cpu) - rest(t_all)) / active), "note": note},
        }

    def in_run(self, data: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """The tables' level inside a forward, and the decoding loop's own host work per forward.

        A cell timed alone, again and again, runs hotter than the same work inside a forward,
        where every other layer's weights and code pass through the caches in between (on the
        2-core VM a dense layer took 1.2-1.5x its table's time inside a run). So the profiler
        replays a synthetic trace through :class:`runtime.decoding.Generator` and the engine,
        clocks each layer, the head and the engine's expert timers, prices the same forwards
        on the tables just measured, and, where the fast device is the CPU (where host clocks
        see the work itself), scales each table by measured over priced; the factors are kept
        in the profile's ``in_run`` entry and printed. ``forward_s`` is what the run spent
        outside the layers and the head. On the model given to the profiler (``model=``: the
        checkpoint itself, under ``static`` at an eighth of the experts), or else on a stand-in
        of this shape whose routed experts are tiny (then the head and experts keep their
        tables: the stand-in's differ)."""
        import dataclasses
        import runtime.decoding as decoding
        from runtime.decoding import Generator, sample as sample_fn
        from runtime.offload import OffloadEngine
        from traces.costs import CostModel
        from traces.replay import replay
        from traces.synth import synthesize
        s = self.cfg.shape
        model = self.model
        real = model is not None
        if model is None:
            cfg1 = dataclasses.replace(self.cfg, shape=dataclasses.replace(s, vocab=64), mask_id=63, eos_id=62)
            torch.manual_seed(0)
            model = LLaDA2(cfg1).to(device=self.device, dtype=self.dtype)
            for blk in model.moe_blocks:
                blk.experts = ExpertWeights(*(torch.randn(s.experts, *shp, dtype=self.dtype) * 0.02
                                              for shp in ((8, s.hidden), (8, s.hidden), (s.hidden, 8))))
            policy = Policy.make("all", s.n_moe_layers, s.experts)
        else:
            policy = Policy.make("static", s.n_moe_layers, s.experts, budget=max(1, s.experts // 8))
        work = synthesize(model.cfg.shape, 96, 32, seed=0, dtype=dtype_name(self.dtype))
        spent: dict[str, float] = {}

        def clocked(part: str, fn):
            def run(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    spent[part] = spent.get(part, 0.0) + time.perf_counter() - t0
            return run
        layers = model.model.layers  # a forward calls each layer's forward_batch, the head's modules directly
        parts = [("dense" if i < s.first_k_dense else "moe", m, "forward_batch") for i, m in enumerate(layers)]
        parts += [("head", model.lm_head, "forward"), ("head", model.model.norm, "forward")]
        saved = [(m, name, getattr(m, name)) for _, m, name in parts]
        for part, m, name in parts:
            setattr(m, name, clocked(part, getattr(m, name)))
        decoding.sample = clocked("head", sample_fn)
        b = max(1, s.experts // 8)
        policies = {"static": policy} if not real else {"static": policy, "swap": Policy.make("swap", s.n_moe_layers,
                                                                                          s.experts, budget=b)}
        med: dict[str, dict[str, float]] = {}
        try:
            for name, pol in policies.items():
                samples = []
                for rep in range(self.reps + 1):
                    with OffloadEngine(model, pol, self.device) as eng:
                        gen = Generator(model, work.decoding, engine=eng)
                        spent.clear()
                        res, secs = timed(self.device, lambda: gen.replay(work, 0))
                    if rep:  # the first is a warm-up
                        samples.append({**dict.fromkeys(("dense", "moe", "head"), 0.0), **spent, **eng.timers,
                                        "total": secs, "forwards": res.forwards})
                med[name] = {k: float(np.median([x[k] for x in samples])) for k in samples[0]}
            # four requests at once: what a batch adds per request (member_s), every expert
            # resident and, in row-exact mode, with misses too (the expert calls' waves)
            measure = real and self.batches and self.device.type == "cpu"
            batch = synthesize(model.cfg.shape, 32, [32, 48, 70, 96], seed=1, requests=4,
                               dtype=dtype_name(self.dtype)) if measure else None
            batch_policies = {"all": Policy.make("all", s.n_moe_layers, s.experts), "static": policy}
            for name in (batch_policies if measure and model.row_exact else
                         ["all"] if measure else []):
                samples = []
                for rep in range((1 if self.quick else 2) + 1):  # a warm-up, then the runs measured
                    with OffloadEngine(model, batch_policies[name], self.device) as eng:
                        gen = Generator(model, batch.decoding, engine=eng)
                        spent.clear()
                        res, secs = timed(self.device, lambda: gen.replay_batch(batch, [0, 1, 2, 3], 4))
                    if rep:
                        samples.append({**dict.fromkeys(("dense", "moe", "head"), 0.0), **spent, **eng.timers,
                                        "total": secs})
                med[f"batch {name}"] = {k: float(np.median([x[k] for x in samples])) for k in samples[0]}
        finally:
            decoding.sample = sample_fn
            for m, name, fn in saved:
                setattr(m, name, fn)
        st = med["static"]
        forward_s = (st["total"] - st["dense"] - st["moe"] - st["head"]) / st["forwards"]
        if self.device.type != "cpu":  # a GPU's work is asynchronous: host clocks do not see it
            return forward_s, {}
        data["host"]["forward_s"] = _m(forward_s)
        cost = CostModel(Profile(data, where="profile being measured"), s, dtype_name(self.dtype))
        fw = work.forwards
        tc = list(zip(fw["tokens_run"].tolist(), fw["context"].tolist()))
        priced = {"dense": s.first_k_dense * sum(cost.non_expert_s("dense_layer", t, c) for t, c in tc),
                  "head": sum(cost.non_expert_s("head", t) for t, _ in tc), "moe": 0.0, "experts": 0.0,
                  "decide": 0.0, "copies": 0.0}
        for name, pol in policies.items():
            for f in replay(work, pol, with_act=False):
                p = cost.layer_parts(f.decision, f.counts, f.counters, f.tokens_run, f.context)
                if name == "static":
                    priced["moe"] += float(p["non_expert"].sum())
                    priced["experts"] += float((p["hits_ready"] + p["hits_fresh"] + p["cpu"]).sum())
                else:  # swap: its decisions per wave, and copies
                    moved = f.counters["migrations"] + f.counters["setup_migrations"]
                    priced["decide"] += float(p["decide"].sum())
                    priced["copies"] += float((p["copy"] + p["setup_copy"]).sum() + sum(c.sum() for _, c, _ in p["waves"])
                                              + cost.profile.host("copy_call_s") * moved.sum())
        ran = {"dense": st["dense"], "head": st["head"], "moe": st["moe"] - st["layer_s"],
               "experts": st["fast_s"] + st["cpu_s"]}
        if "swap" in med:
            ran.update(decide=med["swap"]["decide_s"], copies=med["swap"]["copy_s"])
        factors: dict[str, Any] = {}
        tables = data["non_expert"][s.model_key]
        key, dt = s.expert_shape_key, dtype_name(self.dtype)
        targets = {"dense": [tables["dense_layer"]] if s.first_k_dense else [],
                   "moe": [tables["moe_layer"]] + ([] if s.first_k_dense else [tables["dense_layer"]]),
                   "head": [tables["head"]] if real else [],
                   "experts": [data["gpu_experts"][key][dt]] if real else []}
        for part in ran:
            if priced[part] <= 0 or ran[part] <= 0:
                continue
            k = ran[part] / priced[part]
            factors[part] = k
            for e in targets.get(part, []):
                e["seconds"] = (np.asarray(e["seconds"], dtype=float) * k).tolist()
                if "group_s" in e:
                    e["group_s"] *= k
                e["in_run"] = k
            host = data["host"]
            for name in {"decide": ("decide_s", "refresh_s", "swap_s", "swap_wave_s"), "copies": ("copy_call_s",)}.get(part, ()):
                host[name]["value"] *= k
            if part == "copies":  # on the CPU a copy is the host's own memory traffic
                for entry in data["h2d"].values():
                    entry["gbps"] = (np.asarray(entry["gbps"], dtype=float) / k).tolist()
        member = self._member_costs(data, med, batch_policies, batch, forward_s) if "batch all" in med else {}
        note = (f"measured over priced in replays of a synthetic {len(tc)}-forward trace "
                f"({', '.join(f'{n} B={int(p.budget[0])}' for n, p in policies.items())}); the tables and "
                "host costs each part prices are scaled by it; member_s: what each further request of a "
                "batched forward adds, from 4 requests replayed at batch 4")
        return forward_s, {**factors, **({"member_s": member} if member else {}), "note": note}

    def _member_costs(self, data: dict[str, Any], med: dict[str, dict[str, float]], policies: dict[str, Policy],
                      batch: "Trace", forward_s: float) -> dict[str, float]:
        """What a batched forward costs beyond the levelled tables' price for its members,
        from ``batch all`` (and ``batch static``, row-exact) in ``med``: runs of 4 requests at
        batch 4. Per non-expert part, ``member_s`` per further request of a forward (the run
        with every expert resident; negative where a batch shares more than the pricing rule
        assumes: a layer's weights stay in cache from one request to the next); the decoding
        loop's is the host's ``member_s``. Row-exact, the engine's expert work in both runs
        beyond its price gives the host's ``batch_segment_s`` (each further (request, expert)
        call; signed: on large experts such calls cost less than the table prices them) and
        ``batch_calls_s`` (each call running in waves: gathers, scatters, a colder cache; not
        below zero), the two-unknown fit of the two runs. Written into the profile."""
        from traces.admission import compose_trace
        from traces.costs import CostModel
        from traces.replay import replay
        s = self.cfg.shape
        cost = CostModel(Profile(data, where="profile being measured"), s, dtype_name(self.dtype))  # forward_s set
        priced = dict.fromkeys(("dense", "moe", "head", "loop"), 0.0)
        extra = 0
        composed = compose_trace(batch, 4)
        fits: list[tuple[float, float, float]] = []  # (further segments, waved calls, unpriced seconds) per run
        for name, pol in policies.items():
            if f"batch {name}" not in med:
                continue
            ran = med[f"batch {name}"]
            segs = calls = engine = 0.0
            for f in replay(composed, pol, with_act=False):
                mt, mc = f.member_tokens, f.member_context
                if name == "all":
                    extra += len(mt) - 1
                    dense, head, loop = cost.fixed_parts(mt, mc)  # no member_s yet: the loop at forward_s per request
                    priced["dense"] += s.first_k_dense * dense
                    priced["head"] += head
                    priced["loop"] += loop
                    priced["moe"] += s.n_moe_layers * float(cost.batched_s("moe_layer", mt, mc)[0])
                if cost.row_exact:
                    w = layer_work(f.decision, f.counts, f.counters, cost.act_bytes, cost.knots, mt, mc, f.segments)
                    p = cost.price(w)  # what layer_parts gives, from the work counted once
                    engine += float(sum(p[k].sum() for k in ("hits_ready", "hits_fresh", "cpu", "issue", "launch")))
                    segs += float((w.segments - w.ready_n - w.fresh_n - w.miss_n - w.wave_experts.sum(axis=0)).sum())
                    calls += float((w.hit_sets + w.miss_sets).sum())
            fits.append((segs, calls, ran["layer_s"] - ran["decide_s"] - ran["copy_s"] - ran["wait_s"] - engine))
        if not extra:
            return {}
        ran = med["batch all"]
        loop = ran["total"] - ran["dense"] - ran["moe"] - ran["head"]
        per = {"dense_layer": (ran["dense"] - priced["dense"]) / max(s.first_k_dense, 1),
               "moe_layer": (ran["moe"] - ran["layer_s"] - priced["moe"]) / s.n_moe_layers,
               "head": ran["head"] - priced["head"]}
        out = {}
        tables = data["non_expert"][s.model_key]
        for part, gap in per.items():
            if part == "dense_layer" and not s.first_k_dense:
                continue
            out[part] = gap / extra
            tables[part]["member_s"] = out[part]
        out["loop"] = max(forward_s + (loop - priced["loop"]) / extra, 0.0)
        data["host"]["member_s"] = {**_m(out["loop"]), "note": "the decoding loop's host work per further "
                                    "request of a batched forward"}
        if len(fits) == 2 and cost.row_exact:
            seg_s, call_s = _two_unknowns(fits)
            note = "a row-exact batch's expert calls beyond their tables' price, fitted on 4 requests at batch 4 "
            data["host"]["batch_segment_s"] = {**_m(seg_s), "note": note + "(all, static): per further call"}
            data["host"]["batch_calls_s"] = {**_m(call_s), "note": note + "(all, static): per call run in waves"}
            out.update(batch_segment=seg_s, batch_calls=call_s)
        return out

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
        return {"launch_s": _m(launch),
                "sync_s": {**_m(sync), "note": "per MoE layer: the routing (expert counts) reaching the host"},
                "cpu_task_s": _m(task)}

    def run(self) -> dict[str, Any]:
        h2d, d2h = self.bandwidths()
        gpu_experts = self.gpu_experts()
        cpu_ffn = self.cpu_expert_ffn()
        non_expert = self.non_expert()
        over = self.overheads()
        cuda = self.device.type == "cuda"
        host_mem = host_memory_bytes()
        gpu_mem = torch.cuda.get_device_properties(self.device).total_memory if cuda else host_mem
        host_bw = self.memory_bandwidth(torch.device("cpu"))
        gpu_bw = self.memory_bandwidth(self.device) if cuda else host_bw
        key = self.cfg.shape.expert_shape_key
        name = f"{socket.gethostname()}-{self.device.type}"
        data = {
            "format": FORMAT, "version": VERSION, "name": name,
            "measured": {**measured_where(), "reference_s": self.reference_s},
            "about": (f"Measured by runtime.profile on {platform.node()} ({platform.processor() or platform.machine()}), "
                      f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                      f"{torch.cuda.get_device_name(self.device) if cuda else 'fast device = CPU'}, "
                      f"{'quick' if self.quick else 'full'} grids, dtype {dtype_name(self.dtype)}, model {self.cfg.shape.name}."),
            "box": {"gpu": torch.cuda.get_device_name(self.device) if cuda else "none (CPU)",
                    "cpu": platform.processor() or platform.machine(), "pcie": "unknown"},
            "fast_device": "cuda" if cuda else "cpu",
            "capacities": {"gpu_mem_bytes": _m(gpu_mem), "host_mem_bytes": _m(host_mem),
                           "cpu_cores": _m(os.cpu_count() or 1), "host_mem_bw_gbps": _m(host_bw),
                           "gpu_mem_bw_gbps": _m(gpu_bw)},
            "overheads": over,
            "h2d": h2d, "d2h": d2h,
            "gpu_experts": {key: gpu_experts},
            "cpu_expert_ffn": {key: cpu_ffn},
            "non_expert": non_expert,
        }
        data["host"] = {**self.host_costs(), "forward_s": _m(0.0)}
        forward_s, in_run = self.in_run(data)
        data["host"]["forward_s"] = {**_m(forward_s), "note": "measured with runtime.decoding.Generator, per forward"}
        if in_run:
            data["in_run"] = in_run
        self._step("in a run")
        self.bar.close()
        return data


def in_run_text(prof: Profile) -> str:
    """A profile's in-run factors (``dense x1.38, ...``) and batch member costs, or ''."""
    f = prof.data.get("in_run") or {}
    parts = ", ".join(f"{k} x{v:.2f}" for k, v in f.items() if k not in ("note", "member_s"))
    member = f.get("member_s") or {}
    more = ("; each further request of a batched forward adds " + ", ".join(
        f"{k} {1e3 * v:.2f} ms" for k, v in member.items())) if member else ""
    return parts + more


def in_run_line(prof: Profile) -> str:
    """The in-run factors of a profile, as one line (what its tables were scaled by)."""
    text = in_run_text(prof)
    return f"in-run level (tables scaled by measured over priced in a replay): {text}" if text else \
        "in-run level: none applied (a GPU's work is timed on the device)"


def _two_unknowns(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """``a`` (signed) and ``b >= 0`` with ``a x + b y = z`` for two rows ``(x, y, z)``: solved
    exactly, or, where that gives ``b < 0`` (or the rows do not tell them apart), ``a``
    fitted alone (least squares) and ``b`` zero."""
    (x1, y1, z1), (x2, y2, z2) = rows
    det = x1 * y2 - x2 * y1
    if abs(det) > 1e-12 * max(abs(x1 * y2), abs(x2 * y1), 1e-30):
        a, b = (z1 * y2 - z2 * y1) / det, (x1 * z2 - x2 * z1) / det
        if b >= 0:
            return a, b
    return (x1 * z1 + x2 * z2) / max(x1 * x1 + x2 * x2, 1e-30), 0.0


def profile_box(cfg: ModelConfig, device: torch.device, dtype: str, quick: bool, progress: bool = True,
                model: LLaDA2 | None = None, batches: bool = True) -> Profile:
    """Measure this box for ``cfg``'s shapes; with ``model`` (loaded, experts in host memory)
    the decoding loop's host cost is measured on that model itself, and with ``batches`` what
    a batched forward adds per request."""
    data = Profiler(cfg, device, torch_dtype(dtype), quick, progress, model, batches).run()
    return Profile(data, where="measured profile")


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m runtime.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint", default=None, help="take the model shape from this checkpoint (default: LLaDA2.0-mini)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default on a GPU) or float32 (default on the CPU)")
    ap.add_argument("--quick", action="store_true", help="small grids: under a minute on 2 cores")
    a = ap.parse_args(argv)
    check_out_path(a.out)
    device = check_device(a.device)
    cfg = ModelConfig.load(a.checkpoint) if a.checkpoint else ModelConfig.from_dict(ModelShape.named("llada2-mini").config)
    dtype = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    t0 = time.perf_counter()
    model = None
    if a.checkpoint:  # the in-run step replays the checkpoint itself (experts in host memory, as the engine keeps them)
        from runtime.checkpoint import load_model
        model = load_model(a.checkpoint, device=device, dtype=dtype, experts_device="cpu")
    prof = profile_box(cfg, device, dtype, a.quick, model=model)
    prof.write(a.out)
    s = prof.summary()
    print(f"wrote {a.out} in {time.perf_counter() - t0:.0f} s: {s['name']}, fast device {s['fast_device']}, "
          f"h2d pinned up to {s['h2d_pinned_gbps_max']:.1f} GB/s, launch {s['launch_s'] * 1e6:.1f} us")
    print(in_run_line(prof))
    return 0


if __name__ == "__main__":
    run_cli(main)
