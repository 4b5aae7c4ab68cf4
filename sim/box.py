"""The box: one SimPy process per queue of work on a GPU-CPU machine.

A queue (a *lane*) runs the tasks issued to it in order, each once the tasks it waits for
have ended (a CUDA stream, a copy engine and the engine's host thread all behave so): the
host thread (routing, decisions, issuing work, and the CPU experts, which the engine
computes on that thread), the GPU's compute stream, and the host-to-device and
device-to-host copy engines (PCIe is full duplex). When the profile's fast device is the
CPU itself there is one lane: the cores. What fits in memory is :mod:`traces.costs.memory`'s to
say. Every task is accounted (busy seconds per resource) and, if asked, kept as a timeline
row; the monitoring stays here, apart from the work.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generator

import numpy as np
import pandas as pd
import simpy

from traces.common.errors import TideError
from traces.costs.tasks import RESOURCES, Task, lanes
from traces.formats.profile_file import Profile


class Lane:
    """One queue of work and the process that runs it (ns.py style: the element owns its process)."""

    def __init__(self, box: "Box"):
        self.box = box
        self.env = box.env
        self.queue: deque = deque()
        self._wake: simpy.Event | None = None
        self.env.process(self._run())

    def submit(self, resource: str, seconds: float, waits: list[simpy.Event], done: simpy.Event,
               forward: int, layer: int, what: str) -> None:
        self.queue.append((resource, seconds, waits, done, forward, layer, what))
        if self._wake is not None:
            self._wake.succeed()
            self._wake = None

    def _run(self) -> Generator:
        env = self.env
        while True:
            if not self.queue:
                self._wake = env.event()
                yield self._wake
                continue
            resource, seconds, waits, done, f, l, what = self.queue.popleft()
            pending = [e for e in waits if not e.processed]
            if pending:
                yield pending[0] if len(pending) == 1 else env.all_of(pending)
            start = env.now
            yield env.timeout(seconds)
            self.box.account(resource, seconds, f, l, what, start)
            done.succeed()


@dataclass
class Box:
    env: simpy.Environment
    profile: Profile
    record: bool = False
    busy: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RESOURCES, 0.0))
    rows: list[tuple] = field(default_factory=list)
    events: int = 0

    def __post_init__(self) -> None:
        self.lane_of = lanes(self.profile.shares_cores)
        self.lanes = {name: Lane(self) for name in sorted(set(self.lane_of.values()))}

    def account(self, resource: str, seconds: float, forward: int, layer: int, what: str, start: float) -> None:
        self.events += 2
        self.busy[resource] += seconds
        if self.record:
            self.rows.append((forward, layer, resource, what, start, start + seconds))

    def run_tasks(self, tasks: list[Task], row: int, forward: int, layer: int) -> Generator:
        """Issue one layer's tasks (row ``row`` of each) and wait until all have ended (a process body)."""
        env = self.env
        done: dict[str, simpy.Event] = {}
        ends = []
        for t in tasks:
            waits = [done[a] for a in t.after]
            seconds = float(t.seconds[row])
            if seconds < 0:  # a cost model or profile that prices work below nothing: never a faster box
                raise TideError(f"{self.profile.where}: the {t.name} task of forward {forward}, layer {layer} is "
                                f"priced at {seconds:.3g} s (below zero); check the profile's signed costs")
            if seconds > 0:
                ev = env.event()
                self.lanes[self.lane_of[t.resource]].submit(t.resource, seconds, waits, ev, forward, layer, t.name)
                ends.append(ev)
            else:  # occupies nothing: ends when what it waits for has ended
                ev = waits[0] if len(waits) == 1 else env.all_of(waits)
            done[t.name] = ev
        if ends:
            yield env.all_of(ends)

    def use(self, resource: str, seconds: float, forward: int, layer: int, what: str) -> Generator:
        """One task with nothing to wait for (dense layers, the head), run to its end."""
        yield from self.run_tasks([Task(what, resource, np.array([seconds]))], 0, forward, layer)

    def timeline(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["forward", "layer", "resource", "what", "start_s", "end_s"])
