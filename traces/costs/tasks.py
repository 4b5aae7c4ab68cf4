"""One MoE layer's work as a small task graph: the one description of what runs where, in
what order, and what waits for what.

The engine's host thread takes the routing (a synchronisation), decides, and issues work in
a fixed order: expert copies on the copy engine, the missed tokens to the CPU, the resident
experts' kernels on the fast device's stream, then it computes the missed experts itself
and sends their results back. Each :class:`Task` names its resource, its seconds (one
value per row: a layer, or a planner candidate) and the tasks it waits for. A resource
runs its tasks in the order they were issued (a CUDA stream, a copy engine and a thread
all do), each once the tasks it waits for have ended; a zero-second task occupies nothing.

Two interpreters read the same list: :func:`finish_s` (closed form, vectorised over rows:
the planner's prices) and the simulator's lanes (``sim.box``: one SimPy process per
resource). A test holds them equal.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Resources a task may name. ``cpu`` is the CPU experts' work: on the host thread (the
#: engine has no thread pool of its own for it), accounted apart.
RESOURCES = ("host", "cpu", "gpu", "h2d", "d2h", "drive")


@dataclass(frozen=True)
class Task:
    name: str  # unique within the layer; also the timeline's label
    resource: str
    seconds: np.ndarray  # [rows]
    after: tuple[str, ...] = ()


def lanes(shares_cores: bool) -> dict[str, str]:
    """Which queue serves each resource: on a GPU box the host thread serves ``host`` and
    ``cpu``, the GPU's stream and the two copy engines their own; when the fast device is
    the CPU, host and fast device are one, and everything queues on it. The drive is a lane
    of its own on every box: its reads are the drive's work, not the cores'."""
    if shares_cores:
        return {**dict.fromkeys(RESOURCES, "host"), "drive": "drive"}
    return {"host": "host", "cpu": "host", "gpu": "gpu", "h2d": "h2d", "d2h": "d2h", "drive": "drive"}


def layer_tasks(p: dict[str, object]) -> list[Task]:
    """The graph of one MoE layer from the cost model's parts (``traces.costs.cost_model.CostModel.price``),
    in the engine's issue order. A swap row's waves and another row's copies, hits and CPU
    experts are both in it; a row's tasks of the other kind take no time and occupy nothing,
    so each row follows its own kind's graph. With a host tier, the experts host memory lacks
    are read from the drive once decided, while the resident experts run, and before any copy
    or CPU expert uses them. A layer's fills are read after its work, under the next layer's
    attention, ahead of that layer's reads on the drive's one queue: each row prices them at
    its own start, as the fills before its reads (a forward's layers refresh together, so
    they are alike)."""
    head = [
        Task("drive fills", "drive", p["fill"]),
        Task("attention+router+shared", "gpu", p["non_expert"]),
        Task("routing to host", "host", p["sync"], ("attention+router+shared",)),
        Task("decide", "host", p["decide"], ("routing to host",)),
        Task("drive reads", "drive", p["drive"], ("decide",)),
        Task("setup copies", "h2d", p["setup_copy"], ("decide", "drive reads")),
        Task("issue", "host", p["issue"], ("decide",)),
    ]
    tasks, prev = head, "setup copies"
    for w, (launch, copy, hits) in enumerate(p["waves"]):  # swap rows: each wave's copies, then its experts
        tasks += [Task(f"launch wave {w}", "host", launch, ("issue",) if w == 0 else (f"launch wave {w - 1}",)),
                  Task(f"swap copies {w}", "h2d", copy, (f"launch wave {w}", "drive reads")),
                  Task(f"swap hits {w}", "gpu", hits, (f"swap copies {w}", prev))]
        prev = f"swap hits {w}"
    return tasks + [  # every other row (zero on swap rows, as the waves are zero on the others)
        Task("expert copies", "h2d", p["copy"], ("issue", "drive reads")),
        Task("activations to CPU", "d2h", p["d2h_act"], ("issue",)),
        Task("hits", "gpu", p["hits_ready"], ("issue", "setup copies")),
        Task("launch hits", "host", p["launch"], ("issue",)),
        Task("hits (fresh)", "gpu", p["hits_fresh"], ("expert copies", "launch hits")),
        Task("CPU experts", "cpu", p["cpu"], ("activations to CPU", "launch hits", "drive reads")),
        Task("activations back", "h2d", p["h2d_act"], ("CPU experts",)),
    ]


def finish_s(tasks: list[Task], lane_of: dict[str, str]) -> np.ndarray:
    """Seconds from the layer's start until its last task ends, per row: each task starts
    when the tasks it waits for have ended and its queue has finished what was issued
    before it."""
    rows = len(tasks[0].seconds)
    free: dict[str, np.ndarray] = {}
    end: dict[str, np.ndarray] = {}
    last = np.zeros(rows)
    for t in tasks:
        ready = np.zeros(rows)
        for a in t.after:
            ready = np.maximum(ready, end[a])
        lane = lane_of[t.resource]
        busy = t.seconds > 0
        start = np.where(busy, np.maximum(ready, free.get(lane, 0.0)), ready)
        e = start + t.seconds
        free[lane] = np.where(busy, e, free.get(lane, np.zeros(rows)))
        end[t.name] = e
        last = np.maximum(last, e)
    return last
