"""The engine's host-thread costs, measured by running :class:`runtime.offload.OffloadEngine`
itself on one MoE layer: a decision, a refresh, a swap and its waves, issuing, copies, misses."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from runtime.device import synchronize
from runtime.experts import ExpertWeights
from runtime.model import LLaDA2
from runtime.profile_tables import measured
from traces.policies.spec import Policy


class HostCosts:
    """The host half of :class:`runtime.profile.Profiler`."""

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

        from runtime.checkpoint import _no_init
        from runtime.offload import OffloadEngine
        s = self.cfg.shape
        cfg1 = dataclasses.replace(self.cfg, shape=dataclasses.replace(s, layers=1, first_k_dense=0, vocab=1))
        E, k = s.experts, s.top_k
        active = min(E, max(2 * k, 32 * k // 4))  # a step's distinct experts, about a quarter of its choices
        with torch.device("meta"), _no_init():  # the engine only reads the MoE block's experts: nothing else needs values
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
            "decide_s": {**measured(t_static["decide_s"]), "note": note},
            "refresh_s": {**measured(t_tide["decide_s"]), "note": note},
            "swap_s": {**measured(max(0.0, t_swap1["decide_s"] - per_wave * waves1)), "note": note},
            "swap_wave_s": {**measured(per_wave), "note": note + f"; swap at {waves:.0f} waves against {waves1:.0f}"},
            "issue_s": {**measured(rest(t_all)), "note": note},
            "copy_call_s": {**measured(copy_call), "note": note},
            "expert_call_s": {**measured(t_all["fast_s"] / active if cuda else 0.0),
                              "note": note + ("" if cuda else "; the fast device is the CPU: its grouped time is host time")},
            "miss_call_s": {**measured(max(0.0, rest(t_cpu) - rest(t_all)) / active), "note": note},
        }

