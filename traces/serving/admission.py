"""Which requests share a forward: continuous batching at forward granularity.

Requests wait in arrival order (offline: prompt order). Before every forward, free seats
(up to the batch size) go to the first waiting requests; a request that finishes (its last
block committed, or eos) leaves after its forward, so the next waiting request joins at the
very next forward, its prefill sharing that forward with the others' denoising steps. No
timing enters the rule: the runtime, its replay of a trace at another batch size, and the
simulator all get the same batches from the same order.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from traces.common.checks import check_batch_size, resolve_batch_size
from traces.common.errors import TideError
from traces.formats.trace_file import Trace


@dataclass
class Admission:
    """The seats of one batch: ``seat()`` before a forward, ``leave(r)`` after it."""

    batch_size: int
    waiting: deque = field(default_factory=deque)
    running: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.batch_size = check_batch_size(self.batch_size)
        self.waiting = deque(self.waiting)

    @classmethod
    def of(cls, requests: Iterable[int], batch_size: int) -> "Admission":
        return cls(batch_size, deque(requests))

    def arrive(self, request: int) -> None:
        """A request joins the queue (the simulator's arrivals; the runtime queues all at once)."""
        self.waiting.append(request)

    def seat(self) -> list[int]:
        """The requests of the next forward, in seat order (those already running first, then
        newcomers in arrival order); fills free seats from the queue."""
        while self.waiting and len(self.running) < self.batch_size:
            self.running.append(self.waiting.popleft())
        return list(self.running)

    def leave(self, request: int) -> None:
        """``request`` finished with the forward just run: its seat is free for the next."""
        self.running.remove(request)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running


@dataclass
class Recorded:
    """Seats as a recorded run gave them: ``groups`` lists each forward's requests in seat
    order (a batched trace's schedule, replayed as it ran). Same interface as :class:`Admission`."""

    groups: list[list[int]]
    batch_size: int = 1

    def __post_init__(self) -> None:
        self.groups = [list(g) for g in self.groups if len(g)]
        self.batch_size = max([self.batch_size, *map(len, self.groups)])
        self._next = 0

    def seat(self) -> list[int]:
        self._next += 1
        return self.groups[self._next - 1]

    def leave(self, request: int) -> None:
        """Nothing to free: the next forward's members are recorded."""

    @property
    def done(self) -> bool:
        return self._next >= len(self.groups)


def seating(trace: Trace, batch_size: int | None, arrivals: object | None = None,
            requests: Iterable[int] | None = None) -> Admission | Recorded:
    """How a trace's requests (``requests``, default all) take seats when it is replayed: as
    its forwards recorded them when no batch size and no stream are given, else by
    :class:`Admission` at :func:`resolve_batch_size` (the batch size, else the trace's)."""
    if batch_size is None and arrivals is None:
        return recorded(trace, requests)
    return Admission(resolve_batch_size(batch_size, trace=trace.batch_size))


def recorded(trace: Trace, requests: Iterable[int] | None = None) -> Recorded:
    """A trace's recorded schedule (only ``requests``' members, if given), as seats."""
    req = trace.forwards["request"].to_numpy()
    keep = None if requests is None else set(requests)
    return Recorded([[int(r) for r in req[m] if keep is None or int(r) in keep] for m in trace.schedule()],
                    trace.batch_size)


def compose(forwards: Sequence[tuple[int, int]], batch_size: int) -> list[list[tuple[int, int]]]:
    """Batched forwards from requests' own forwards: ``forwards`` lists ``(request, count)`` in
    arrival order; each batched forward is a list of ``(request, i)``, request ``request``'s
    ``i``-th own forward. A request leaves after its last forward. What the runtime runs at
    ``batch_size`` when each request's forwards are known (a batch-1 trace replayed at N)."""
    left = {r: n for r, n in forwards}
    if len(left) != len(forwards):
        raise TideError("compose: requests must be distinct")
    seats = Admission.of((r for r, n in forwards if n > 0), batch_size)
    nxt = dict.fromkeys(left, 0)
    out = []
    while not seats.done:
        members = seats.seat()
        out.append([(r, nxt[r]) for r in members])
        for r in members:
            nxt[r] += 1
            if nxt[r] == left[r]:
                seats.leave(r)
    return out


def compose_trace(trace: Trace, batch_size: int) -> Trace:
    """The batched run the requests of ``trace`` make at ``batch_size`` (:func:`compose`,
    requests in the trace's order, each request's own forwards in order), as a batched trace:
    each forward's members are those requests' recorded forwards (their counts and choices;
    routing is per token, attention per request, so this is what the engine routes running
    them batched). No counters: they belong to a policy's run."""
    fw = trace.forwards
    req = fw["request"].to_numpy()
    own = {int(r["request"]): np.flatnonzero(req == r["request"]) for r in trace.requests}
    batches = compose([(r, len(f)) for r, f in own.items()], batch_size)
    rows = np.array([own[r][i] for b in batches for r, i in b], dtype=np.int64)
    forwards = fw.iloc[rows].reset_index(drop=True)
    forwards["forward"] = np.repeat(np.arange(len(batches)), [len(b) for b in batches])
    return Trace(shape=trace.shape, dtype=trace.dtype, decoding=trace.decoding, requests=trace.requests,
                 forwards=forwards, counts=trace.counts[rows], choices=trace.row_choices(rows), counters=None, policy=None,
                 source={**trace.source, "composed_at_batch_size": batch_size}, batch_size=batch_size)
