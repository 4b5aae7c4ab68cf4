"""In-run calibration: the tables' level inside a forward, and what a batch adds per request.

The model offers clocks for the parts of its forwards (:meth:`runtime.model.LLaDA2.timed_parts`);
the calibration replays a synthetic trace through the decoding loop and the engine, reads
those clocks and the engine's timers, and prices the same forwards on the tables just
measured."""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import numpy as np
import torch

from runtime.checkpoint import dtype_name
from runtime.decoding import Generator
from runtime.device import timed
from runtime.experts import ExpertWeights
from runtime.model import LLaDA2
from runtime.offload import OffloadEngine
from runtime.profile_tables import measured
from traces.costs.cost_model import CostModel
from traces.costs.work import layer_work
from traces.formats.profile_file import Profile
from traces.formats.shapes import ModelShape
from traces.formats.trace_file import Decoding, Trace
from traces.policies.spec import Policy
from traces.policies.walk import walk_trace
from traces.serving.admission import compose_trace
from traces.workloads.synthetic import synthesize


class InRunCalibration:
    """The calibration half of :class:`runtime.profile.Profiler`."""

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
        tables: the stand-in's differ). A checkpoint given with its experts left on the drive
        (larger than this machine's memory) is that stand-in with its own non-expert weights:
        its head is levelled too, its experts keep their table."""
        model, real, policy = self._calibration_model()
        own_parts = real or self._own_parts
        s = self.cfg.shape
        work = level_workload(model.cfg.shape, dtype_name(self.dtype))[0]
        policies = {"static": policy}
        if real:
            policies["swap"] = Policy.make("swap", s.n_moe_layers, s.experts, budget=max(1, s.experts // 8))
        runs: dict[str, tuple[Policy, Decoding, Callable[[Generator], Any], bool]] = {
            name: (pol, work.decoding, lambda gen: gen.replay(work, 0), True) for name, pol in policies.items()}
        # requests of mixed lengths at two batch sizes (eight at 2 and 8; quick: four at 2 and 4): what a batch adds per
        # request (member_s), every expert resident and, in row-exact mode, with misses too
        # (the expert calls' waves), fitted over both so that a price carries across batch sizes
        measure = real and self.batches and self.device.type == "cpu"
        batch = synthesize(model.cfg.shape, 32, list(self.batch_prompts), seed=1, requests=len(self.batch_prompts),
                           dtype=dtype_name(self.dtype)) if measure else None
        batch_policies = {"all": Policy.make("all", s.n_moe_layers, s.experts), "static": policy}
        reqs = list(range(len(self.batch_prompts)))
        for name in (batch_policies if measure and model.row_exact else ["all"] if measure else []):
            for b in self.batch_sizes:
                runs[f"batch {name} {b}"] = (batch_policies[name], batch.decoding,
                                             lambda gen, b=b: gen.replay_batch(batch, reqs, b), False)
        med = self._median_runs(model, runs)
        st = med["static"]
        # the remainder of parts clocked apart: a loop of a few microseconds can come out below
        # zero by the clocks' own noise (-90 us seen on mini-moe); it costs nothing measurable then
        forward_s = max((st["total"] - st["dense"] - st["moe"] - st["head"]) / st["forwards"], 0.0)
        if self.device.type != "cpu":  # a GPU's work is asynchronous: host clocks do not see it
            return forward_s, {}
        data["host"]["forward_s"] = measured(forward_s)
        priced = self._priced_parts(data, work, policies)
        ran = {"dense": st["dense"], "head": st["head"], "moe": st["moe"] - st["layer_s"],
               "experts": st["fast_s"] + st["cpu_s"]}
        if "swap" in med:
            ran.update(decide=med["swap"]["decide_s"], copies=med["swap"]["copy_s"])
        factors = self._level(data, ran, priced, own_parts, real)
        member = self._member_costs(data, med, batch_policies, batch, forward_s) if measure else {}
        note = (f"measured over priced in replays of a synthetic {len(work.forwards)}-forward trace "
                f"({', '.join(f'{n} B={int(p.budget[0])}' for n, p in policies.items())}); the tables and "
                "host costs each part prices are scaled by it; member_s: what each further request of a "
                f"batched forward adds, fitted on {len(self.batch_prompts)} requests replayed at batch "
                f"{' and '.join(map(str, self.batch_sizes))}")
        # the level replay's own seconds per forward: a run's same-work speed reference (replay_seconds)
        replay = {"replay_s": st["total"] / st["forwards"]} if real else {}
        return forward_s, {**factors, **({"member_s": member} if member else {}), **replay, "note": note}

    def _calibration_model(self) -> tuple[LLaDA2, bool, Policy]:
        """The model the runs use, whether it is the checkpoint's own, and the policy of the
        replays: the checkpoint under ``static`` at an eighth of the experts, or a stand-in of
        this shape with tiny routed experts under ``all``."""
        s = self.cfg.shape
        self._own_parts = False
        if self.model is not None and any(blk.on_drive for blk in self.model.moe_blocks):
            model = self.model  # the profiler's own load: its non-expert weights, experts in a tiny stand-in
            for blk in model.moe_blocks:
                blk.experts, blk.on_drive = self._tiny_experts(), False
            self._own_parts = True
            return model, False, Policy.make("all", s.n_moe_layers, s.experts)
        if self.model is not None:
            return self.model, True, level_workload(s, dtype_name(self.dtype))[1]
        cfg1 = dataclasses.replace(self.cfg, shape=dataclasses.replace(s, vocab=64), mask_id=63, eos_id=62)
        torch.manual_seed(0)
        model = LLaDA2(cfg1).to(device=self.device, dtype=self.dtype)
        for blk in model.moe_blocks:
            blk.experts = self._tiny_experts()
        return model, False, Policy.make("all", s.n_moe_layers, s.experts)

    def _tiny_experts(self) -> ExpertWeights:
        """A stand-in's routed experts: every one of them, 8 wide."""
        s = self.cfg.shape
        return ExpertWeights(*(torch.randn(s.experts, *shp, dtype=self.dtype) * 0.02
                               for shp in ((8, s.hidden), (8, s.hidden), (s.hidden, 8))))

    def _median_runs(self, model: LLaDA2,
                     runs: dict[str, tuple[Policy, Decoding, Callable[[Generator], Any], bool]]) -> dict[str, dict[str, float]]:
        """Per named run (policy, decoding, what to run, whether to count its forwards): the
        medians of the model's own clocks per part (dense, moe, head), the engine's timers,
        the total and the forwards run. The runs take turns, one of each per cycle (the first
        cycle a warm-up), for ``cycles`` cycles and until ``spread_s`` seconds have passed: a
        shared box runs in phases seconds long (on the 2-core VM, 8.4 and 10.5 ms per tiny
        forward), and the batch terms are what batch runs cost beyond the level the batch-1
        replays set, so both must see the same phases (taken one after the other, a batch
        term per further request moved from -0.7 to +0.1 ms between two profiles)."""
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
        t0 = time.perf_counter()
        cycle = 0
        while cycle <= self.cycles or (time.perf_counter() - t0 < self.spread_s and cycle <= 200):
            for name, (policy, decoding, run, forwards) in runs.items():
                with OffloadEngine(model, policy, self.device) as eng, model.timed_parts() as spent:
                    gen = Generator(model, decoding, engine=eng)
                    res, secs = timed(self.device, lambda: run(gen))
                if cycle:  # the first is a warm-up
                    samples[name].append({**dict.fromkeys(("dense", "moe", "head"), 0.0), **spent, **eng.timers,
                                          "total": secs, **({"forwards": res.forwards} if forwards else {})})
            cycle += 1
        return {name: {k: float(np.median([x[k] for x in got])) for k in got[0]} for name, got in samples.items()}

    def _priced_parts(self, data: dict[str, Any], work: Trace, policies: dict[str, Policy]) -> dict[str, float]:
        """What the tables just measured price the calibration's forwards at, per part."""
        s = self.cfg.shape
        cost = CostModel(Profile(data, where="profile being measured"), s, dtype_name(self.dtype))
        fw = work.forwards
        tc = list(zip(fw["tokens_run"].tolist(), fw["context"].tolist()))
        priced = {"dense": s.first_k_dense * sum(cost.non_expert_s("dense_layer", t, c) for t, c in tc),
                  "head": sum(cost.non_expert_s("head", t) for t, _ in tc), "moe": 0.0, "experts": 0.0,
                  "decide": 0.0, "copies": 0.0}
        for name, pol in policies.items():
            for f in walk_trace(work, pol, with_act=False):
                p = cost.layer_parts(f.decision, f.counts, f.counters, f.tokens_run, f.context)
                if name == "static":
                    priced["moe"] += float(p["non_expert"].sum())
                    priced["experts"] += float((p["hits_ready"] + p["hits_fresh"] + p["cpu"]).sum())
                else:  # swap: its decisions per wave, and copies
                    moved = f.counters["migrations"] + f.counters["setup_migrations"]
                    priced["decide"] += float(p["decide"].sum())
                    priced["copies"] += float((p["copy"] + p["setup_copy"]).sum() + sum(c.sum() for _, c, _ in p["waves"])
                                              + cost.profile.host("copy_call_s") * moved.sum())
        return priced

    def _level(self, data: dict[str, Any], ran: dict[str, float], priced: dict[str, float],
               own_parts: bool, real: bool) -> dict[str, float]:
        """Scale each table and host cost a part prices by measured over priced (in ``data``);
        the factors per part."""
        s = self.cfg.shape
        factors: dict[str, float] = {}
        tables = data["non_expert"][s.model_key]
        key, dt = s.expert_shape_key, dtype_name(self.dtype)
        targets = {"dense": [tables["dense_layer"]] if s.first_k_dense else [],
                   "moe": [tables["moe_layer"]] + ([] if s.first_k_dense else [tables["dense_layer"]]),
                   "head": [tables["head"]] if own_parts else [],
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
        return factors

    def _member_costs(self, data: dict[str, Any], med: dict[str, dict[str, float]], policies: dict[str, Policy],
                      batch: Trace, forward_s: float) -> dict[str, float]:
        """What a batched forward costs beyond the levelled tables' price for its members,
        from the ``batch {policy} {b}`` runs in ``med`` (:data:`BATCH_SIZES`). Per non-expert
        part, ``member_s`` per further request of a forward: the least-squares slope of the
        runs' unpriced seconds against their further requests (``all``: every expert
        resident; negative where a batch shares more than the pricing rule assumes: a
        layer's weights stay in cache from one request to the next); the decoding loop's is
        the host's ``member_s``. Row-exact, the engine's expert work beyond its price gives
        the host's ``batch_segment_s`` (each further (request, expert) call; signed: on large
        experts such calls cost less than the table prices them) and ``batch_wave_s`` (each
        wave of a call run in waves: a gather, a call, a scatter; not below zero), fitted
        over the runs of both policies and batch sizes. Written into the profile."""
        s = self.cfg.shape
        cost = CostModel(Profile(data, where="profile being measured"), s, dtype_name(self.dtype))  # forward_s set
        gaps: dict[str, list[tuple[float, float]]] = {p: [] for p in ("dense_layer", "moe_layer", "head", "loop")}
        fits: list[tuple[float, float, float]] = []  # (further segments, waves, unpriced seconds) per run
        for name, pol in policies.items():
            for b in self.batch_sizes:
                ran = med.get(f"batch {name} {b}")
                if ran is None:
                    continue
                priced = dict.fromkeys(("dense", "moe", "head", "loop"), 0.0)
                extra = 0
                segs = waves = engine = 0.0
                for f in walk_trace(compose_trace(batch, b), pol, with_act=False):
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
                        waves += float((w.hit_waves + w.miss_waves).sum())
                if cost.row_exact:
                    fits.append((segs, waves, ran["layer_s"] - ran["decide_s"] - ran["copy_s"] - ran["wait_s"] - engine))
                if name == "all" and extra:
                    loop = ran["total"] - ran["dense"] - ran["moe"] - ran["head"]
                    gaps["dense_layer"].append((extra, (ran["dense"] - priced["dense"]) / max(s.first_k_dense, 1)))
                    gaps["moe_layer"].append((extra, (ran["moe"] - ran["layer_s"] - priced["moe"]) / s.n_moe_layers))
                    gaps["head"].append((extra, ran["head"] - priced["head"]))
                    gaps["loop"].append((extra, loop - priced["loop"]))
        if not gaps["loop"]:
            return {}
        slope = {part: sum(x * y for x, y in rows) / sum(x * x for x, _ in rows) for part, rows in gaps.items()}
        out = {}
        tables = data["non_expert"][s.model_key]
        for part in ("dense_layer", "moe_layer", "head"):
            if part == "dense_layer" and not s.first_k_dense:
                continue
            out[part] = slope[part]
            tables[part]["member_s"] = out[part]
        out["loop"] = max(forward_s + slope["loop"], 0.0)
        data["host"]["member_s"] = {**measured(out["loop"]), "note": "the decoding loop's host work per further "
                                    "request of a batched forward"}
        if len(fits) >= 2:
            seg_s, wave_s = _fit_signed_and_positive(fits)
            note = (f"a row-exact batch's expert calls beyond their tables' price, fitted on {len(self.batch_prompts)} "
                    f"requests at batch {' and '.join(map(str, self.batch_sizes))} (all, static): ")
            data["host"]["batch_segment_s"] = {**measured(seg_s), "note": note + "per further call"}
            data["host"]["batch_wave_s"] = {**measured(wave_s), "note": note + "per wave of a call run in waves"}
            out.update(batch_segment=seg_s, batch_wave=wave_s)
        return out


@functools.lru_cache(maxsize=4)  # 0.4 s to synthesize, and held_out times it before every run
def level_workload(shape: ModelShape, dtype: str) -> tuple[Trace, Policy]:
    """The replay the in-run level is taken on: one synthetic request (96-token prompt, 32
    generated) under ``static`` at an eighth of the experts. Its routing comes from the trace,
    so its work is the same on every checkpoint of the shape (replays only read it)."""
    return (synthesize(shape, 96, 32, seed=0, dtype=dtype),
            Policy.make("static", shape.n_moe_layers, shape.experts, budget=max(1, shape.experts // 8)))


def replay_seconds(model: LLaDA2, device: torch.device, reps: int = 3, warm: bool = True) -> float:
    """Seconds per forward of :func:`level_workload` replayed on ``model`` (the median of
    ``reps``, after one untimed when ``warm``; fewer once 2 s were timed): the box's speed now,
    on the same work the profile's level was taken on (its ``in_run.replay_s``). A shared box
    runs in phases (on the 2-core VM the same run took 4.9 s and 6.9 s minutes apart), which a
    small-matmul reference follows less closely."""
    work, policy = level_workload(model.cfg.shape, dtype_name(model.dtype))
    skip = 1 if warm else 0
    out, spent = [], 0.0
    while len(out) < reps + skip and (len(out) < 1 + skip or spent < 2.0):  # long replays: one timed is enough
        with OffloadEngine(model, policy, device) as eng:
            gen = Generator(model, work.decoding, engine=eng)
            res, secs = timed(device, lambda: gen.replay(work, 0))
        spent += secs if len(out) >= skip else 0.0
        out.append(secs / res.forwards)
    return float(np.median(out[skip:]))


#: The batched calibration's workload: one request per prompt length, replayed at each batch
#: size; quick profiles take the first four at batch 2 and 4 (a quarter of the work: tests).
BATCH_PROMPTS = (32, 48, 70, 96, 24, 64, 80, 40)
BATCH_SIZES = (2, 8)
QUICK_BATCH_PROMPTS = BATCH_PROMPTS[:4]
QUICK_BATCH_SIZES = (2, 4)


def _fit_signed_and_positive(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """``a`` (signed) and ``b >= 0`` fitting ``a x + b y = z`` over rows ``(x, y, z)`` in least
    squares; where that gives ``b < 0`` (or the rows do not tell them apart), ``a`` fitted
    alone and ``b`` zero."""
    X = np.array([[x, y] for x, y, _ in rows], dtype=np.float64)
    z = np.array([r[2] for r in rows], dtype=np.float64)
    if np.linalg.matrix_rank(X) == 2:
        (a, b), *_ = np.linalg.lstsq(X, z, rcond=None)
        if b >= 0:
            return float(a), float(b)
    return float(X[:, 0] @ z / max(X[:, 0] @ X[:, 0], 1e-30)), 0.0
