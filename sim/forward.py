"""One forward of a trace, layer by layer, as the runtime's engine runs it.

The decoding loop's own host work comes first (embedding, rotary tables, acceptance),
then the dense layers, and the head last, on the fast device. Each MoE layer is its task
graph (:func:`traces.costs.tasks.layer_tasks`: the routing reaches the host, the host decides
and issues copies, missed tokens and kernels, computes the misses and sends them back,
while the GPU stream and the copy engines work through what was issued); the layer ends
when all of it has, and the next one starts. Times come from ``traces.costs.cost_model``.
"""
from __future__ import annotations

from typing import Generator

from sim.box import Box
from traces.costs.tasks import layer_tasks


def forward(box: Box, f: int, moe_layers: list[int], first_dense: int, dense_s: float, head_s: float,
            loop_s: float, parts: dict) -> Generator:
    yield from box.use("host", loop_s, f, -1, "decoding loop")
    for l in range(first_dense):
        yield from box.use("gpu", dense_s, f, l, "dense layer")
    tasks = layer_tasks(parts)
    for i, l in enumerate(moe_layers):
        yield from box.run_tasks(tasks, i, f, l)
    yield from box.use("gpu", head_s, f, -1, "head")
