"""The box: SimPy resources for what contends on one GPU-CPU machine.

The GPU's compute stream, the host-to-device and device-to-host copy engines (PCIe is
full duplex) and the CPU (expert work uses all its cores, as the profile measured it) are
resources of capacity one (what fits in GPU memory is :mod:`traces.memory`'s to say). When the profile's
fast device is the CPU itself, compute, CPU work and copies all share one resource: the
cores. Every use is accounted (busy seconds per resource) and, if asked, kept as a
timeline row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator

import pandas as pd
import simpy

from traces.profile import Profile

RESOURCES = ("gpu", "cpu", "h2d", "d2h")


@dataclass
class Box:
    env: simpy.Environment
    profile: Profile
    record: bool = False
    busy: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RESOURCES, 0.0))
    rows: list[tuple] = field(default_factory=list)
    events: int = 0

    def __post_init__(self) -> None:
        if self.profile.shares_cores:
            cores = simpy.Resource(self.env, capacity=1)
            self.res = {r: cores for r in RESOURCES}
        else:
            self.res = {r: simpy.Resource(self.env, capacity=1) for r in RESOURCES}

    def use(self, resource: str, seconds: float, forward: int, layer: int, what: str) -> Generator:
        """Hold ``resource`` for ``seconds`` (a SimPy process body)."""
        if seconds <= 0:
            return
        res = self.res[resource]
        with res.request() as req:
            yield req
            start = self.env.now
            yield self.env.timeout(seconds)
        self.events += 2
        self.busy[resource] += seconds
        if self.record:
            self.rows.append((forward, layer, resource, what, start, start + seconds))

    def timeline(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["forward", "layer", "resource", "what", "start_s", "end_s"])
