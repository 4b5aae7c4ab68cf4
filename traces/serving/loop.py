"""The one serving loop: requests arrive, take a seat, run forwards, leave.

Both the simulator (:mod:`sim.serve`, on its SimPy clock) and the runtime
(:meth:`runtime.decoding.Generator` on the wall clock) drive this loop; neither writes its own.
Before every forward, requests whose arrival offset has passed join the queue and free seats
go to them (:class:`traces.serving.admission.Admission`); or the forwards a batched trace
recorded seat them (:class:`traces.serving.admission.Recorded`). The driver asks
:meth:`ServeLoop.next` with its clock's time now and gets the next forward's members, a
time to wait until (nothing seated, the next arrival ahead), or None (everything served);
it runs the forward and reports each request that finished with :meth:`ServeLoop.leave`.
"""
from __future__ import annotations

from collections import deque
from typing import Sequence

from traces.common.checks import check_offsets
from traces.serving.admission import Admission, Recorded
from traces.serving.arrivals import Arrivals


class ServeLoop:
    """Arrivals, queue and seats of one served run of ``requests`` (in arrival order).

    ``seats``: the batch's admission rule, or a recorded schedule (then every request is there
    at 0 and ``arrivals`` must be None). ``arrivals`` None: every request at 0; offsets: one per
    request (checked: :func:`traces.common.checks.check_offsets`); a closed loop: the first
    ``clients`` at 0, then each next one when a request leaves. ``arrival`` holds each
    request's arrival time once it has arrived."""

    def __init__(self, requests: Sequence[int], seats: Admission | Recorded, arrivals: Arrivals | None = None):
        self.seats = seats
        self.queue = deque(requests)  # not yet arrived, in order
        self.arrival: dict[int, float] = {}
        self.closed = arrivals is not None and arrivals.closed
        if isinstance(seats, Recorded):
            if arrivals is not None:
                raise ValueError("a recorded schedule seats requests as they ran: no arrivals")
            self.due: deque[float] = deque()
            self.arrival = dict.fromkeys(requests, 0.0)
            self.queue.clear()
        elif arrivals is None:
            self.due = deque([0.0] * len(self.queue))
        elif self.closed:
            self.due = deque([0.0] * min(arrivals.clients, len(self.queue)))
        else:
            self.due = deque(check_offsets(arrivals.offsets, len(self.queue), f"arrivals ({arrivals.label})"))

    def next(self, now: float) -> list[int] | float | None:
        """At time ``now``: the next forward's requests (seat order); or the time of the next
        arrival when nothing is seated; or None when every request is served."""
        while self.queue and self.due and self.due[0] <= now + 1e-12:
            r = self.queue.popleft()
            self.arrival[r] = self.due.popleft()
            self.seats.arrive(r)
        if self.seats.done:
            return self.due[0] if self.due and self.queue else None
        return self.seats.seat()

    def leave(self, request: int, now: float) -> None:
        """``request`` finished with the forward just run (or had none to run): its seat is
        free; in a closed loop its client sends the next request now."""
        self.seats.leave(request)
        if self.closed and self.queue:
            self.due.append(now)
