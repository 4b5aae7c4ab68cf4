"""The one cost model: a hardware profile plus a forward's per-layer work -> seconds per resource.

The simulator, the planner and the GPU check's lower bound all price work here.
Per MoE layer of one forward:

* ``gpu_s``: the layer's non-expert work (attention, router, shared expert) plus the
  resident experts' tokens computed grouped on the fast device;
* ``cpu_s``: the missed experts' FFNs on the CPU, one expert after another, each with its
  token count (the profile's per-expert times); when the fast device is the CPU itself,
  the fast device's grouped time, since the engine then runs misses with the same kernel;
* ``h2d_s``: expert copies (``migrations``, one expert per transfer) plus activations
  coming back from the CPU; ``d2h_s``: activations going to the CPU;
* ``copy_s``: the part of ``h2d_s`` that is expert copies;
* ``host_s``: the engine's host thread: the routing reaching the host, the decision,
  issuing sorts, gathers, copies and kernels (the profile's ``host`` costs); on a GPU box
  the host thread also computes the missed experts (``cpu_s``).

How they overlap is the layer's task graph (:mod:`traces.tasks`), priced in closed form by
:meth:`CostModel.layer_seconds`, the same graph the simulator runs as events.
:meth:`CostModel.layer_bound` is the floor when everything that can overlap does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from traces.errors import TideError
from traces.policies import Decision
from traces.profile import Profile
from traces.shapes import ModelShape, dtype_bytes
from traces.tasks import finish_s, lanes, layer_tasks

RESOURCES = ("gpu_s", "cpu_s", "h2d_s", "d2h_s", "copy_s", "host_s")


@dataclass
class CostModel:
    """Prices one model's work on one box. ``cpu_dtype`` is the weight dtype the CPU computes in."""

    profile: Profile
    shape: ModelShape
    dtype: str = "bfloat16"
    cpu_dtype: str | None = None
    pinned: bool = True
    _key: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        dtype_bytes(self.dtype)
        self._key = self.shape.expert_shape_key
        if self.cpu_dtype is None:
            have = self.profile.cpu_dtypes(self._key)
            self.cpu_dtype = self.dtype if self.dtype in have else (have[0] if have else self.dtype)
        # fail now, with one clear line, if the profile lacks what this model needs
        self.profile.cpu_expert_s(self._key, self.cpu_dtype, 1)
        self.profile.gpu_experts_s(self._key, self._gpu_dtype, 1, 1)
        self.profile.non_expert_s(self.shape.model_key, "moe_layer", 1, 1)
        self.expert_bytes = self.shape.expert_bytes(self.dtype)
        self.act_bytes = self.shape.hidden * dtype_bytes(self.dtype)
        self.lanes = lanes(self.profile.shares_cores)

    @property
    def _gpu_dtype(self) -> str:
        return self.dtype if self.profile.fast_device == "cpu" or self.dtype != "float32" else "bfloat16"

    # ---- primitives (vectorised over layers) ------------------------------------------
    def hits_s(self, gpu_counts: np.ndarray) -> np.ndarray:
        """Grouped computation of each layer's resident experts' tokens, ``[L, E] -> [L]``."""
        gpu_counts = np.asarray(gpu_counts)
        return self.grouped_s((gpu_counts > 0).sum(axis=-1), gpu_counts.sum(axis=-1))

    def grouped_s(self, experts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """``experts`` experts holding ``tokens`` tokens in all, computed grouped on the fast device."""
        return self.profile.gpu_experts_s(self._key, self._gpu_dtype, experts, tokens / np.maximum(experts, 1))

    def copies_s(self, migrations: np.ndarray) -> np.ndarray:
        m = np.asarray(migrations, dtype=np.float64)
        return self.profile.transfer_s("h2d", m * self.expert_bytes, self.expert_bytes, self.pinned)

    def act_s(self, act_tokens: np.ndarray, direction: str) -> np.ndarray:
        nbytes = np.asarray(act_tokens, dtype=np.float64) * self.act_bytes
        return self.profile.transfer_s(direction, nbytes, None, self.pinned)

    def non_expert_s(self, part: str, tokens: float, context: float | None = None) -> float:
        return float(self.profile.non_expert_s(self.shape.model_key, part, tokens, context))

    # ---- one forward --------------------------------------------------------------------
    def layer_parts(self, decision: Decision, counts: np.ndarray, counters: dict[str, np.ndarray],
                    tokens: int, context: int) -> dict[str, object]:
        """One forward's MoE-layer work, seconds per row, as :func:`traces.tasks.layer_tasks`
        arranges it: ``non_expert`` (attention, router, shared expert), ``sync`` (routing to
        the host), the host's ``decide`` (a refresh or swap's waves cost more), ``issue``
        (sorting, gathers, combining, and issuing each copy and each missed expert) and
        ``launch`` (issuing the resident experts' kernels), ``setup_copy`` and ``copy``
        (expert copies), ``hits_ready`` (residents that were already there) and
        ``hits_fresh`` (experts copied in this forward), ``cpu`` (misses), ``d2h_act`` /
        ``h2d_act`` (activations to the CPU and back); for swap, ``waves``: per wave
        (launch, copy, hit) seconds per row, zero where a row has fewer waves.

        ``counts`` is ``[L, E]``; the decision has ``L`` rows, or ``L x G`` when it decides
        ``G`` candidate rows per layer (the planner's table)."""
        counts = np.asarray(counts)
        L, E = counts.shape
        V = decision.n_rows
        host = self.profile.host
        act_tokens = counters["bytes_act"] / self.act_bytes / 2
        moved = counters["setup_migrations"] + counters["migrations"]
        decide = np.full(V, host("decide_s"))
        if decision.refreshed is not None:
            decide = np.where(decision.refreshed, host("refresh_s"), decide)
        parts: dict[str, object] = {
            "non_expert": np.full(V, self.non_expert_s("moe_layer", tokens, context)),
            "sync": np.full(V, self.profile.overhead("sync_s")),
            "decide": decide,
            "setup_copy": self.copies_s(counters["setup_migrations"]),
            "copy": self.copies_s(counters["migrations"]),
            "d2h_act": self.act_s(act_tokens, "d2h"),
            "h2d_act": self.act_s(act_tokens, "h2d"),
        }
        if decision.waves is None:
            active = (counts > 0)[:, None, :]
            resident = decision.resident.reshape(L, -1, E)
            fresh = decision.fresh().reshape(L, -1, E)
            cnt = counts[:, :, None].astype(np.float64)
            ready, new = active & resident & ~fresh, active & resident & fresh
            missed = active & ~resident

            def grouped(mask: np.ndarray) -> np.ndarray:
                return self.grouped_s(mask.sum(axis=-1), (mask @ cnt)[..., 0]).reshape(V)
            parts["hits_ready"] = grouped(ready)
            parts["hits_fresh"] = grouped(new)
            if self.profile.shares_cores:  # the fast device is the CPU: misses run its kernel, like hits
                parts["cpu"] = grouped(missed)
            else:
                per_expert = self.profile.cpu_expert_s(self._key, self.cpu_dtype, counts)[:, :, None]
                parts["cpu"] = (missed @ per_expert)[..., 0].reshape(V)
            parts["issue"] = (host("issue_s") + host("copy_call_s") * moved
                              + host("miss_call_s") * missed.sum(axis=-1).reshape(V))
            parts["launch"] = host("expert_call_s") * (ready | new).sum(axis=-1).reshape(V)
            parts["waves"] = None
        else:
            W = max((len(ws) for ws in decision.waves), default=0)
            n_copy, n_exp, n_tok = (np.zeros((W, L)) for _ in range(3))  # per wave and layer, priced at once
            for l, ws in enumerate(decision.waves):
                for w, wave in enumerate(ws):
                    n_copy[w, l], n_exp[w, l] = len(wave.copies), len(wave.gpu_experts)
                    n_tok[w, l] = counts[l][wave.gpu_experts].sum()
            launch = host("copy_call_s") * n_copy + host("expert_call_s") * n_exp
            hits = np.where(n_exp > 0, self.grouped_s(n_exp, n_tok), 0.0)
            copy = np.where(n_copy > 0, self.copies_s(n_copy), 0.0)
            waves = [(launch[w], copy[w], hits[w]) for w in range(W)]
            parts["decide"] = np.full(L, host("swap_s"))
            parts["issue"] = np.full(L, host("issue_s"))
            parts["waves"] = waves
            parts["hits_ready"] = hits.sum(axis=0)
            parts["hits_fresh"] = np.zeros(L)
            parts["cpu"] = np.zeros(L)
            parts["launch"] = launch.sum(axis=0)
        return parts

    def layer_seconds(self, parts: dict[str, object]) -> np.ndarray:
        """Seconds per MoE layer (row): the layer's task graph (:func:`traces.tasks.layer_tasks`)
        in closed form, exactly what the simulator's events add up to, since a layer starts
        when the previous one has finished."""
        return finish_s(layer_tasks(parts), self.lanes)

    def layer_costs(self, p: dict[str, object]) -> dict[str, np.ndarray]:
        """Per-resource seconds per MoE layer, from :meth:`layer_parts`."""
        copies = p["copy"] + p["setup_copy"]
        if p["waves"] is not None:
            copies = copies + sum((c for _, c, _ in p["waves"]), np.zeros_like(copies))
        return {
            "gpu_s": p["non_expert"] + p["hits_ready"] + p["hits_fresh"],
            "cpu_s": p["cpu"],
            "h2d_s": copies + p["h2d_act"],
            "d2h_s": p["d2h_act"],
            "copy_s": copies,
            "host_s": p["sync"] + p["decide"] + p["issue"] + p["launch"],
        }

    def layer_bound(self, costs: dict[str, np.ndarray], serial_copies: bool = False) -> np.ndarray:
        """Seconds per layer when everything that can overlap does (see module doc)."""
        act_h2d = costs["h2d_s"] - costs["copy_s"]
        if self.profile.shares_cores:
            return costs["gpu_s"] + costs["cpu_s"] + costs["h2d_s"] + costs["d2h_s"] + costs["host_s"]
        host_path = costs["host_s"] + costs["cpu_s"]
        cpu_path = costs["d2h_s"] + host_path + act_h2d
        if serial_copies:
            return np.maximum(costs["gpu_s"] + costs["copy_s"], cpu_path)
        return np.maximum.reduce([costs["gpu_s"], cpu_path, costs["h2d_s"], costs["d2h_s"]])

    def fixed_s(self, tokens: int, context: int) -> float:
        """Per-forward work outside the MoE layers: dense layers and the head."""
        return (self.shape.first_k_dense * self.non_expert_s("dense_layer", tokens, context)
                + self.non_expert_s("head", tokens) + self.profile.host("forward_s"))


def check_fits(shape: ModelShape, profile: Profile, dtype: str = "bfloat16") -> None:
    """All experts must fit in host memory; a TideError otherwise."""
    need = shape.routed_expert_bytes(dtype)
    have = profile.capacity("host_mem_bytes")
    if need > have:
        raise TideError(f"{shape.name}'s routed experts ({need / 1e9:.1f} GB in {dtype}) do not fit in "
                        f"{profile.name}'s host memory ({have / 1e9:.1f} GB)")
