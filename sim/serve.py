"""Serving on the simulated box: requests arrive, queue, share forwards and leave.

This is the only place where arrivals, queueing and admission happen. A request's forwards
are its own rows of the trace, in order (a batch-1 trace's, or a batched trace's members).
Before every forward, requests that have arrived by then join the queue, and free seats go
to them by :class:`traces.admission.Admission`, the rule the runtime follows. A batched
trace replayed without a batch size keeps the forwards it recorded
(:class:`traces.admission.Recorded`). Each forward's members go through the one policy walk
(:func:`traces.replay.replay`: counts added, refresh where any member would). Its work is
priced by the one cost model and run on the box's lanes (:func:`sim.forward.forward`).
When the box has nothing seated, it waits for the next arrival.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generator, Iterator

import numpy as np
import simpy

from sim.box import Box
from sim.forward import forward
from traces.admission import Admission, Recorded, recorded
from traces.arrivals import Arrivals
from traces.costs import CostModel
from traces.policies import Policy
from traces.replay import Forward, replay
from traces.trace import Trace


@dataclass
class Stream:
    """The requests' progress through a served run (seconds from the stream's start)."""

    order: list[int]  # requests in arrival order
    arrival: dict[int, float] = field(default_factory=dict)
    start: dict[int, float] = field(default_factory=dict)
    first_block: dict[int, float] = field(default_factory=dict)
    end: dict[int, float] = field(default_factory=dict)
    forwards: list[tuple[float, float, int, np.ndarray]] = field(default_factory=list)  # start, end, members, rows


def first_block_rows(trace: Trace) -> dict[int, int]:
    """Each request's row that commits the last masks of its first generated block: when its
    first block of answer is final (time to first block)."""
    fw = trace.forwards
    steps = fw[fw["kind"] == "step"]
    out = {}
    for r, rows in steps.groupby("request"):
        first = rows[rows["block"] == rows["block"].min()]
        out[int(r)] = int(first.index[-1])
    return out


def serve(env: simpy.Environment, box: Box, trace: Trace, policy: Policy, cost: CostModel,
          popularity: np.ndarray | None, batch_size: int | None, arrivals: Arrivals | None,
          on_forward=None) -> tuple[Stream, Generator]:
    """The serving process (to be run by ``env``) and the stream it fills in. ``batch_size``
    None keeps the trace's recorded forwards (offline only); ``arrivals`` None: all at 0.
    ``on_forward(fw)`` sees each walked forward (counters)."""
    fwd = trace.forwards
    req_col = fwd["request"].to_numpy()
    order = [int(r["request"]) for r in trace.requests]
    own = {r: deque(np.flatnonzero(req_col == r).tolist()) for r in order}
    last_first = first_block_rows(trace)
    stream = Stream(order)
    shape = trace.shape
    if batch_size is None and arrivals is None:
        seats: Admission | Recorded = recorded(trace)
        for r in order:
            stream.arrival[r] = 0.0
    else:
        seats = Admission(batch_size or trace.batch_size)
    arrivals = arrivals or Arrivals.offline(len(order))
    queue = deque(order)  # requests not yet arrived, in order
    due: deque[float] = deque(arrivals.offsets) if not arrivals.closed else deque([0.0] * min(arrivals.clients, len(order)))

    def admit_until(t: float) -> None:
        while queue and due and due[0] <= t + 1e-12:
            r, at = queue.popleft(), due.popleft()
            stream.arrival[r] = at
            seats.arrive(r)

    def schedule() -> Iterator[np.ndarray]:
        while True:
            members = seats.seat()
            if not members:
                return
            yield np.array([own[r][0] for r in members], dtype=np.int64)

    def run() -> Generator:
        recorded_seats = isinstance(seats, Recorded)
        walk = replay(trace, policy, popularity, schedule=schedule())
        while True:
            if not recorded_seats:
                admit_until(env.now)
                if not seats.running and not seats.waiting:
                    if not due:
                        return
                    yield env.timeout(max(due[0] - env.now, 0.0))
                    continue
            elif seats.done:
                return
            fw: Forward | None = next(walk, None)
            if fw is None:
                return
            if on_forward is not None:
                on_forward(fw)
            t0 = env.now
            members = [int(req_col[i]) for i in fw.rows]
            for r in members:
                stream.start.setdefault(r, t0)
            parts = cost.layer_parts(fw.decision, fw.counts, fw.counters, fw.member_tokens, fw.member_context,
                                     fw.segments)
            dense, head, loop = cost.fixed_parts(fw.member_tokens, fw.member_context)
            yield from forward(box, fw.f, shape.moe_layers, shape.first_k_dense, dense, head, loop, parts)
            stream.forwards.append((t0, env.now, len(members), fw.rows))
            for r, row in zip(members, fw.rows.tolist()):
                own[r].popleft()
                if last_first.get(r) == row:
                    stream.first_block[r] = env.now
                if not own[r]:
                    stream.end[r] = env.now
                    seats.leave(r)
                    if arrivals.closed and queue:  # the client sends its next request
                        due.append(env.now)
    return stream, run()


def offline_ends(trace: Trace, forward_s: np.ndarray) -> np.ndarray:
    """Each request's end (in the trace's request order) when every request is there at 0 and
    the forwards run back to back as ``trace`` schedules them, taking ``forward_s`` seconds
    each: the running sum at the request's last forward. What :func:`serve` gives offline,
    in closed form (the sweep prices many settings from one candidate table so)."""
    req = trace.forwards["request"].to_numpy()
    ends = np.cumsum(np.asarray(forward_s, dtype=np.float64))
    last: dict[int, int] = {}
    for f, rows in enumerate(trace.schedule()):
        for r in req[rows].tolist():
            last[r] = f
    return np.array([ends[last[int(r["request"])]] for r in trace.requests])
