"""The host tier at run time: each drive layer's experts held in host memory, the rest read from
the checkpoint's files as forwards need them.

One host stack holds every drive layer's held experts (each layer ``budget`` rows of its
own) and one layer's worth of staging rows that reads on a forward's path land in (layers
run one after another, so one staging serves them all). Which experts a layer holds, reads
and fills is :class:`traces.policies.host.HostRunner`'s to say, on the same counts and demand
the simulator replays, so both read alike. Per layer and forward:

1. :meth:`HostTier.prepare`: the experts the placement needs from host memory (``demand``)
   that it lacks start being read, ``queue_depth`` at a time; the layer's ``host_row`` maps
   every expert it needs to its row;
2. the engine runs what needs no host row (the resident experts' kernels) while the reads
   go on, and calls :meth:`HostTier.ready` before it copies or computes from host rows;
3. :meth:`HostTier.finish`: experts leaving the held set give their rows to those entering:
   read experts that stay are moved from staging, the others (fills) start being read and
   go on under the next layer's attention; the next :meth:`prepare` waits for them first,
   as the drive's one queue would (``traces.costs.tasks`` prices this order).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from runtime.drive import ExpertFiles, free_maps, stack_rows, wait
from traces.policies.host import HostPolicy, HostRunner

if TYPE_CHECKING:
    from traces.formats.shapes import ModelShape

#: Host-tier counters the engine reports.
#: ``drive_demand``: experts drive layers needed from host memory (the host cache's lookups;
#: its hit rate is ``1 - drive_reads / drive_demand``).
DRIVE_COUNTERS = ("drive_reads", "drive_fills", "drive_demand", "drive_bytes", "drive_wait_s")


@dataclass
class _HostLayer:
    layer: int  # model layer id
    rows: np.ndarray  # [budget] this layer's rows of the host stack
    row_of: np.ndarray  # [E] held expert -> its row, -1 when not held
    free: list[int] = field(default_factory=list)


class HostTier:
    """Holds the drive layers' host stack, their held sets, and the reads (module doc)."""

    def __init__(self, policy: HostPolicy, files: ExpertFiles, moe_layers: Sequence[int], experts: int,
                 like: Sequence[tuple[tuple[int, ...], torch.dtype]], setup_counts: np.ndarray | None = None,
                 pin: bool = False, loaded: np.ndarray | None = None):
        """``loaded`` ([L] bool, default: the policy's drive layers): the layers whose experts
        the model left on the drive; those whose host budget is every expert read them all now
        (what loading them would have done), so that they hold them from the first forward."""
        self.policy, self.files, self.experts = policy, files, experts
        self.runner = HostRunner(policy, experts, setup_counts=setup_counts)
        on = policy.on_drive(experts) if loaded is None else np.asarray(loaded, bool)
        drive = np.flatnonzero(on)
        sizes = np.minimum(policy.budget[drive], experts)
        held = int(sizes.sum())
        self._maps: list = []
        self.stack = stack_rows(held + experts, like, pin, self._maps)  # held rows, then one layer's staging
        self.staging = np.arange(held, held + experts)
        self.layers: dict[int, _HostLayer] = {}
        start = 0
        for i, b in zip(drive.tolist(), sizes.tolist()):
            rows = np.arange(start, start + b)
            self.layers[i] = _HostLayer(int(moe_layers[i]), rows, np.full(experts, -1, np.int64), rows.tolist())
            start += b
        self._load_whole()
        self.counters = dict.fromkeys(DRIVE_COUNTERS, 0.0)
        self._pending: tuple | None = None
        self._reading: list = []  # this layer's reads in flight (until ready)
        self._filling: list = []  # the last layer's fills in flight (until the next prepare)
        files.reads = files.bytes = 0

    def _wait(self, futures: list) -> None:
        t0 = time.perf_counter()
        try:
            wait(futures)
        finally:
            futures.clear()
            self.counters["drive_wait_s"] += time.perf_counter() - t0

    def ready(self) -> None:
        """Wait for this layer's reads: called before anything uses its host rows."""
        if self._reading:
            self._wait(self._reading)

    def settle(self) -> None:
        """Wait for every read in flight (fills included)."""
        self.ready()
        if self._filling:
            self._wait(self._filling)

    def _load_whole(self) -> None:
        """Layers whose host budget is every expert: all of them read in, held from the start."""
        for hl in self.layers.values():
            if len(hl.rows) == self.experts:
                self.files.read(hl.layer, np.arange(self.experts), self.stack, hl.rows)
                hl.row_of[:] = hl.rows
                hl.free = []

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.stack.gate, self.stack.up, self.stack.down))

    def reset(self) -> None:
        """Forget what is held (after a warm-up): the next forward starts cold, as the simulator's."""
        self.settle()
        self.runner = HostRunner(self.policy, self.experts, setup_counts=self.runner.setup_counts)
        for hl in self.layers.values():
            if len(hl.rows) < self.experts:  # a layer holding every expert keeps them
                hl.row_of[:] = -1
                hl.free = hl.rows.tolist()
        self.counters = dict.fromkeys(DRIVE_COUNTERS, 0.0)
        self.files.reads = self.files.bytes = 0

    def begin(self, kind: str, step: int, more: Sequence[tuple[str, int]] = ()) -> None:
        self.runner.begin(kind, step, more)

    def prepare(self, i: int, counts: np.ndarray, demand: np.ndarray) -> np.ndarray | None:
        """Layer ``i``'s experts in host memory for this forward: start reading what ``demand``
        needs and the layer lacks (:meth:`ready` waits for it); the row of each expert it needs
        (-1 elsewhere), or None for a layer that holds every expert. A read expert the held
        set keeps goes straight to a row that a leaving expert this forward does not use gave
        up; the others land in staging."""
        hl = self.layers.get(i)
        if hl is None:
            return None
        self.settle()  # the last layer's fills first: the drive's one queue
        reads, fills, held = self.runner.layer(i, counts, demand)
        for e in np.flatnonzero((hl.row_of >= 0) & ~held & ~demand).tolist():  # leaving, unused now: free at once
            hl.free.append(int(hl.row_of[e]))
            hl.row_of[e] = -1
        ids = np.flatnonzero(reads)
        rows = np.empty(len(ids), np.int64)
        staged = 0
        for k, e in enumerate(ids.tolist()):
            if held[e] and hl.free:
                rows[k] = hl.row_of[e] = hl.free.pop()
            else:
                rows[k] = self.staging[staged]
                staged += 1
        self._reading = self.files.submit(hl.layer, ids, self.stack, rows)
        row = hl.row_of.copy()
        row[ids] = rows
        self._pending = (hl, ids, rows, np.flatnonzero(fills), held)
        self.counters["drive_reads"] += len(ids)
        self.counters["drive_demand"] += int(np.count_nonzero(demand))
        return row

    def finish(self) -> None:
        """After the layer's work: the held set moves to the policy's (the rest of the leaving
        experts, then read experts kept from staging, then fills read from the drive)."""
        if self._pending is None:
            return
        self.ready()
        hl, ids, rows, fill, held = self._pending
        self._pending = None
        for e in np.flatnonzero((hl.row_of >= 0) & ~held).tolist():  # leaving
            hl.free.append(int(hl.row_of[e]))
            hl.row_of[e] = -1
        for e, s in zip(ids.tolist(), rows.tolist()):  # staged, read this forward and held from now on: moved
            if held[e] and hl.row_of[e] < 0:
                r = hl.free.pop()
                for t in (self.stack.gate, self.stack.up, self.stack.down):
                    t[r].copy_(t[s])
                hl.row_of[e] = r
        to = [hl.free.pop() for _ in fill]
        self._filling = self.files.submit(hl.layer, fill, self.stack, to)
        hl.row_of[fill] = to
        self.counters["drive_fills"] += len(fill)

    def release(self) -> None:
        """Free the host stack (the engine is done): a run's largest allocation, not to be held
        while the next engine makes its own."""
        try:
            self.settle()  # no read may land in pages handed back
        finally:
            self.stack = None
            free_maps(self._maps)

    def totals(self) -> dict[str, float]:
        self.settle()
        out = dict(self.counters)
        out["drive_bytes"] = float(self.files.bytes)
        return out


def expert_like(shape: "ModelShape", dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, dtype) of one expert's gate, up and down matrices."""
    s = shape
    return [((s.moe_intermediate, s.hidden), dtype), ((s.moe_intermediate, s.hidden), dtype),
            ((s.hidden, s.moe_intermediate), dtype)]
