"""A policy's whole run over a trace: the one policy walk (:func:`traces.policies.walk.walk_trace`)
collected into counters per forward and layer and, with a cost model, priced (the simulator's
seconds in closed form, without events)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from traces.costs.cost_model import RESOURCE_SECONDS, CostModel
from traces.formats.trace_file import Trace
from traces.formats.vocabulary import COUNTERS
from traces.policies.spec import Policy
from traces.policies.walk import walk_trace


@dataclass
class PolicyReplay:
    """Counters of one policy over a trace: ``[F, L]`` arrays, plus totals and, with a cost
    model, seconds per resource and forward."""

    policy: Policy
    counters: dict[str, np.ndarray]
    times: dict[str, np.ndarray] | None = None  # per resource [F, L] seconds, "layer_s" and "bound_s" [F, L], "fixed_s" [F]
    drive: dict[str, np.ndarray] | None = None  # "reads" and "fills" [F, L]: experts read from the drive (host tier)

    def seconds(self) -> float:
        """The run's time as the runtime orders its work: the simulator's figure, without events."""
        if self.times is None:
            raise ValueError("replay_policy ran without a cost model")
        return float(self.times["layer_s"].sum() + self.times["fixed_s"].sum())

    def bound_seconds(self) -> float:
        """The run's time when all overlap that the runtime allows happens (needs a cost model)."""
        if self.times is None:
            raise ValueError("replay_policy ran without a cost model")
        return float(self.times["bound_s"].sum() + self.times["fixed_s"].sum())

    def totals(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.counters.items()}

    def hit_ratio(self) -> float:
        g, c = self.counters["gpu_tokens"].sum(), self.counters["cpu_tokens"].sum()
        return float(g / (g + c)) if g + c else 1.0


def replay_policy(trace: Trace, policy: Policy, popularity: np.ndarray | None = None,
                  with_act: bool = True, cost: CostModel | None = None) -> PolicyReplay:
    """:func:`traces.policies.walk.walk_trace` collected into ``[F, L]`` counters (``F``: the forwards run); with a
    ``cost`` model each forward and layer is also priced (``PolicyReplay.times``)."""
    F, L = trace.n_batched, trace.shape.n_moe_layers
    out = {k: np.zeros((F, L), dtype=np.int64) for k in COUNTERS}
    drive = {k: np.zeros((F, L), dtype=np.int64) for k in ("reads", "fills")}
    times = None
    if cost is not None:
        times = {k: np.zeros((F, L)) for k in (*RESOURCE_SECONDS, "layer_s", "bound_s")}
        times["fixed_s"] = np.zeros(F)
    for fw in walk_trace(trace, policy, popularity, with_act):
        for k in COUNTERS:
            out[k][fw.f] = fw.counters[k]
        if fw.drive_reads is not None:
            drive["reads"][fw.f], drive["fills"][fw.f] = fw.drive_reads, fw.drive_fills
        if times is not None:
            parts = cost.layer_parts(fw.decision, fw.counts, fw.counters, fw.member_tokens, fw.member_context,
                                     fw.segments, fw.drive_reads, fw.drive_fills)
            lc = cost.layer_costs(parts)
            times["layer_s"][fw.f] = cost.layer_seconds(parts)
            for k, v in lc.items():
                times[k][fw.f] = v
            times["bound_s"][fw.f] = cost.layer_bound(lc, serial_copies=parts["swap"])
            times["fixed_s"][fw.f] = cost.fixed_s(fw.member_tokens, fw.member_context)
    return PolicyReplay(policy=policy, counters=out, times=times, drive=drive)
