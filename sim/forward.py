"""One forward of a trace, layer by layer, as the runtime's engine runs it.

Per MoE layer: attention, router and shared expert on the GPU; the routing reaches the
host (a synchronisation); the policy decides; setup copies block; expert copies start on
the host-to-device engine; the missed tokens go to the CPU (device-to-host), are computed
there and come back (host-to-device) while the GPU computes the hits of experts that were
already resident; hits of experts copied in this forward wait for their copies; the layer
ends when all of it has. Swap copies each wave and waits before computing it. Dense
layers run first and the head last, on the GPU. Times come from ``traces.costs``.
"""
from __future__ import annotations

from typing import Generator

import simpy

from sim.box import Box


def miss_path(box: Box, f: int, l: int, d2h: float, cpu: float, h2d: float) -> Generator:
    yield from box.use("d2h", d2h, f, l, "activations to CPU")
    yield from box.use("cpu", cpu, f, l, "CPU experts")
    yield from box.use("h2d", h2d, f, l, "activations back")


def moe_layer(box: Box, f: int, i: int, l: int, parts: dict) -> Generator:
    env = box.env
    yield from box.use("gpu", parts["non_expert"][i], f, l, "attention+router+shared")
    if parts["sync"][i] > 0:
        yield env.timeout(parts["sync"][i])
    yield from box.use("h2d", parts["setup_copy"][i], f, l, "setup copies")
    waves = parts["waves"]
    if waves is not None:
        for c, h in waves[i]:
            yield from box.use("h2d", c, f, l, "swap copies")
            yield from box.use("gpu", h, f, l, "swap hits")
        return
    side: list[simpy.Process] = []
    copy = None
    if parts["copy"][i] > 0:
        copy = env.process(box.use("h2d", parts["copy"][i], f, l, "expert copies"))
        side.append(copy)
    if parts["cpu"][i] > 0:
        side.append(env.process(miss_path(box, f, l, parts["d2h_act"][i], parts["cpu"][i], parts["h2d_act"][i])))
    yield from box.use("gpu", parts["hits_ready"][i], f, l, "hits")
    if parts["hits_fresh"][i] > 0:
        if copy is not None:
            yield copy
        yield from box.use("gpu", parts["hits_fresh"][i], f, l, "hits (fresh)")
    if side:
        yield simpy.AllOf(env, side)


def forward(box: Box, f: int, moe_layers: list[int], first_dense: int, dense_s: float, head_s: float,
            parts: dict) -> Generator:
    for l in range(first_dense):
        yield from box.use("gpu", dense_s, f, l, "dense layer")
    for i, l in enumerate(moe_layers):
        yield from moe_layer(box, f, i, l, parts)
    yield from box.use("gpu", head_s, f, -1, "head")
