"""Serving on the simulated box: the one serving loop (:mod:`traces.serving.loop`) on SimPy's clock.

A request's forwards are its own rows of the trace, in order (a batch-1 trace's, or a
batched trace's members). The loop decides who arrives and who is seated for each forward
(the rule the runtime follows on the wall clock); each forward's members go through the one
policy walk (:func:`traces.policies.walk.walk_trace`: counts added, refresh where any member
would), are priced by the one cost model and run on the box's lanes
(:func:`sim.forward.forward`). When the box has nothing seated, it waits for the next arrival.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generator, Iterator

import numpy as np
import simpy

from sim.box import Box
from sim.forward import forward
from traces.costs.cost_model import CostModel
from traces.formats.trace_file import Trace
from traces.policies.spec import Policy
from traces.policies.walk import Forward, walk_trace
from traces.serving.admission import seating
from traces.serving.arrivals import Arrivals
from traces.serving.loop import ServeLoop


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
    """The serving process (to be run by ``env``) and the stream it fills in: the one serving
    loop (:class:`traces.serving.loop.ServeLoop`) on the SimPy clock. Seats by
    :func:`traces.serving.admission.seating` (``batch_size`` and ``arrivals`` None: the
    forwards the trace recorded). ``on_forward(fw)`` sees each walked forward (counters)."""
    fwd = trace.forwards
    req_col = fwd["request"].to_numpy()
    order = [int(r["request"]) for r in trace.requests]
    own = {r: deque(np.flatnonzero(req_col == r).tolist()) for r in order}
    last_first = first_block_rows(trace)
    stream = Stream(order)
    loop = ServeLoop(order, seating(trace, batch_size, arrivals), arrivals)
    seated = [np.zeros(0, np.int64)]  # the rows of the forward the loop seated last: what the walk takes next

    def schedule() -> Iterator[np.ndarray]:
        while True:
            yield seated[0]

    def run() -> Generator:
        walk = walk_trace(trace, policy, popularity, schedule=schedule())
        while True:
            members = loop.next(env.now)
            if members is None:
                break
            if isinstance(members, float):  # nothing seated: wait for the next arrival
                yield env.timeout(max(members - env.now, 0.0))
                continue
            seated[0] = np.array([own[r][0] for r in members], dtype=np.int64)
            fw: Forward = next(walk)
            if on_forward is not None:
                on_forward(fw)
            t0 = env.now
            for r in members:
                stream.start.setdefault(r, t0)
            yield from _run_forward(box, trace, cost, fw)
            stream.forwards.append((t0, env.now, len(members), fw.rows))
            for r, row in zip(members, fw.rows.tolist()):
                own[r].popleft()
                if last_first.get(r) == row:
                    stream.first_block[r] = env.now
                if not own[r]:
                    stream.end[r] = env.now
                    loop.leave(r, env.now)
        stream.arrival.update(loop.arrival)
    return stream, run()


def _run_forward(box: Box, trace: Trace, cost: CostModel, fw: Forward) -> Generator:
    """Price a walked forward (the one cost model) and run it on the box's lanes."""
    shape = trace.shape
    parts = cost.layer_parts(fw.decision, fw.counts, fw.counters, fw.member_tokens, fw.member_context, fw.segments,
                             fw.drive_reads, fw.drive_fills)
    dense, head, loop_s = cost.fixed_parts(fw.member_tokens, fw.member_context)
    yield from forward(box, fw.f, shape.moe_layers, shape.first_k_dense, dense, head, loop_s, parts)


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
