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

How they overlap is the layer's task graph (:mod:`traces.costs.tasks`), priced in closed form by
:meth:`CostModel.layer_seconds`, the same graph the simulator runs as events.
:meth:`CostModel.layer_bound` is the floor when everything that can overlap does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from traces.common.errors import TideError
from traces.costs.tasks import finish_s, lanes, layer_tasks
from traces.costs.work import Work, knots_for, layer_work
from traces.formats.profile_file import Profile
from traces.formats.shapes import ModelShape, dtype_bytes
from traces.policies.decision import Decision

#: The keys of :meth:`CostModel.layer_costs`: seconds per resource (the lanes are :data:`traces.costs.tasks.RESOURCES`)
RESOURCE_SECONDS = ("gpu_s", "cpu_s", "h2d_s", "d2h_s", "copy_s", "host_s", "drive_s")


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
        self._cpu_knots = self.profile.cpu_expert_knots(self._key, self.cpu_dtype)
        self.knots = knots_for(self._cpu_knots)

    @property
    def _gpu_dtype(self) -> str:
        return self.dtype if self.profile.fast_device == "cpu" or self.dtype != "float32" else "bfloat16"

    # ---- primitives (vectorised over layers) ------------------------------------------
    def hits_s(self, gpu_counts: np.ndarray) -> np.ndarray:
        """Grouped computation of each layer's resident experts' tokens, ``[L, E] -> [L]``."""
        gpu_counts = np.asarray(gpu_counts)
        return self.grouped_s((gpu_counts > 0).sum(axis=-1), gpu_counts.sum(axis=-1))

    def grouped_s(self, experts: np.ndarray, tokens: np.ndarray, stack: np.ndarray | int | None = None) -> np.ndarray:
        """``experts`` experts holding ``tokens`` tokens in all, computed grouped on the fast
        device, in one call over a stack of ``stack`` experts (its other entries hold no tokens)."""
        s = self.profile.gpu_experts_s(self._key, self._gpu_dtype, experts, tokens / np.maximum(experts, 1))
        if stack is None:
            return s
        idle = np.maximum(np.asarray(stack, dtype=np.float64) - experts, 0.0)
        return np.where(np.asarray(experts) > 0, s + self.profile.gpu_group_s(self._key, self._gpu_dtype) * idle, 0.0)

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
                    tokens: int | np.ndarray, context: int | np.ndarray,
                    segments: np.ndarray | None = None, drive_reads: np.ndarray | None = None,
                    drive_fills: np.ndarray | None = None) -> dict[str, object]:
        """One forward's MoE-layer work priced, seconds per row (:meth:`price` of its
        :func:`traces.costs.work.layer_work`). ``counts`` is ``[L, E]``; the decision has ``L``
        rows, or ``L x G`` when it decides ``G`` candidate rows per layer (the planner's table)."""
        return self.price(layer_work(decision, counts, counters, self.act_bytes, self.knots, tokens, context, segments,
                                     drive_reads, drive_fills))

    def price(self, w: Work) -> dict[str, object]:
        """Rows' work (one forward's, or many forwards' at once) in seconds, as
        :func:`traces.costs.tasks.layer_tasks` arranges it: ``non_expert`` (attention, router,
        shared expert), ``sync`` (routing to the host), the host's ``decide`` (a refresh or
        swap's waves cost more), ``issue`` (sorting, gathers, combining, and issuing each copy
        and each missed expert) and ``launch`` (issuing the resident experts' kernels),
        ``setup_copy`` and ``copy`` (expert copies), ``hits_ready`` (residents that were
        already there) and ``hits_fresh`` (experts copied in this forward), ``cpu`` (misses),
        ``d2h_act`` / ``h2d_act`` (activations to the CPU and back); ``waves``: per swap wave
        (launch, copy, hit) seconds per row, zero where a row has fewer waves or none; ``drive``
        and ``fill``: the host tier's drive reads before the layer's CPU work and copies, and
        its fills, under the next layer's attention."""
        host = self.profile.host
        if not np.isin(self._cpu_knots, w.knots).all():
            raise TideError(f"{self.profile.where}: work was counted on CPU-table knots that miss this profile's")
        per_fwd = self.batched_s("moe_layer", w.tokens, w.context, w.member_fwd)
        waves = (w.wave_experts > 0).sum(axis=0)
        decide = np.where(w.swap, host("swap_s") + host("swap_wave_s") * waves,
                          np.where(w.refreshed, host("refresh_s"), host("decide_s")))
        if self.profile.shares_cores:  # the fast device is the CPU: misses run its kernel, like hits,
            cpu = self.grouped_s(w.miss_n, w.miss_tok, self.shape.experts)  # on the host stack of every expert
        else:
            cpu = w.miss_w @ self.profile.cpu_expert_s(self._key, self.cpu_dtype, w.knots)
        launch = host("copy_call_s") * w.wave_copies + host("expert_call_s") * w.wave_experts
        hits = np.where(w.wave_experts > 0, self.grouped_s(w.wave_experts, w.wave_tokens, w.slots), 0.0)
        ready = self.grouped_s(w.ready_n, w.ready_tok, w.slots)
        if self.row_exact:  # each request's rows of an expert in a call of their own, in waves
            def further(segments, experts, tokens, waves):
                more = np.maximum(segments - experts, 0)
                per = tokens / np.maximum(segments, 1)
                calls = np.where(more > 0, self.grouped_s(more, more * per), 0.0)
                # batch_segment_s is signed (fitted on one workload): on another, its saving can
                # outgrow the calls' own price; further calls never cost less than nothing
                return np.maximum(calls + host("batch_segment_s") * more, 0.0) + host("batch_wave_s") * waves
            hit_seg = w.segments - w.miss_segments
            ready = ready + further(hit_seg, w.ready_n + w.fresh_n + w.wave_experts.sum(axis=0),
                                    w.ready_tok + w.fresh_tok + w.wave_tokens.sum(axis=0), w.hit_waves)
            cpu = cpu + further(w.miss_segments, w.miss_n, w.miss_tok, w.miss_waves)
        copy = np.where(w.wave_copies > 0, self.copies_s(w.wave_copies), 0.0)
        return {
            "non_expert": per_fwd[w.fwd],
            "sync": np.full(w.n_rows, self.profile.overhead("sync_s")),
            "decide": decide,
            "setup_copy": self.copies_s(w.setup_n),
            "copy": self.copies_s(w.copy_n),
            "d2h_act": self.act_s(w.act_tokens, "d2h"),
            "h2d_act": self.act_s(w.act_tokens, "h2d"),
            "hits_ready": ready,
            "hits_fresh": self.grouped_s(w.fresh_n, w.fresh_tok, w.slots),
            "cpu": cpu,
            "issue": host("issue_s") + host("copy_call_s") * (w.setup_n + w.copy_n) + host("miss_call_s") * w.miss_n,
            "launch": host("expert_call_s") * (w.ready_n + w.fresh_n),
            "waves": [(launch[i], copy[i], hits[i]) for i in range(len(launch))],
            "swap": w.swap,
            "drive": self.drive_s(w.drive_n),
            "fill": self.drive_s(w.fill_n),
        }

    def drive_s(self, reads: np.ndarray) -> np.ndarray:
        """Reading ``reads`` experts from the drive (the profile's drive lane)."""
        return self.profile.drive_read_s(reads, self.expert_bytes)

    def layer_seconds(self, parts: dict[str, object]) -> np.ndarray:
        """Seconds per MoE layer (row): the layer's task graph (:func:`traces.costs.tasks.layer_tasks`)
        in closed form, exactly what the simulator's events add up to, since a layer starts
        when the previous one has finished."""
        return finish_s(layer_tasks(parts), self.lanes)

    def layer_costs(self, p: dict[str, object]) -> dict[str, np.ndarray]:
        """Per-resource seconds per MoE layer, from :meth:`layer_parts`."""
        zero = np.zeros_like(p["copy"])
        copies = p["copy"] + p["setup_copy"] + sum((c for _, c, _ in p["waves"]), zero)
        return {
            "gpu_s": p["non_expert"] + p["hits_ready"] + p["hits_fresh"] + sum((h for _, _, h in p["waves"]), zero),
            "cpu_s": p["cpu"],
            "h2d_s": copies + p["h2d_act"],
            "d2h_s": p["d2h_act"],
            "copy_s": copies,
            "host_s": p["sync"] + p["decide"] + p["issue"] + p["launch"] + sum((ln for ln, _, _ in p["waves"]), zero),
            "drive_s": p["drive"] + p["fill"],
        }

    def layer_bound(self, costs: dict[str, np.ndarray], serial_copies: np.ndarray | bool = False) -> np.ndarray:
        """Seconds per layer when everything that can overlap does (see module doc);
        ``serial_copies`` (per row): swap rows, whose experts wait for their copies."""
        act_h2d = costs["h2d_s"] - costs["copy_s"]
        drive = costs.get("drive_s", 0.0)  # the drive's lane is its own on every box
        if self.profile.shares_cores:
            return np.maximum(costs["gpu_s"] + costs["cpu_s"] + costs["h2d_s"] + costs["d2h_s"] + costs["host_s"], drive)
        host_path = costs["host_s"] + costs["cpu_s"]
        cpu_path = costs["d2h_s"] + host_path + act_h2d
        return np.maximum(drive, np.where(serial_copies, np.maximum(costs["gpu_s"] + costs["copy_s"], cpu_path),
                                          np.maximum.reduce([costs["gpu_s"], cpu_path, costs["h2d_s"], costs["d2h_s"]])))

    def extrapolated(self, tokens_per_expert: float, forward_tokens: float, context: float) -> list[str]:
        """Where a run's largest figures go past what the profile measured (then priced by
        extending each table's last segment): one phrase each, for the output to say so."""
        r = self.profile.measured_range(self._key, self._gpu_dtype, self.shape.model_key, self.cpu_dtype)
        seen = {"gpu_tokens_per_expert": tokens_per_expert, "cpu_tokens_per_expert": tokens_per_expert,
                "forward_tokens": forward_tokens, "context": context}
        words = {"gpu_tokens_per_expert": "tokens per expert on the fast device",
                 "cpu_tokens_per_expert": "tokens per expert on the CPU",
                 "forward_tokens": "tokens per forward (non-expert work)", "context": "context"}
        return [f"{words[k]} up to {seen[k]:g} (measured up to {r[k]:g})" for k in words if seen[k] > r[k]]

    @property
    def row_exact(self) -> bool:
        """Whether the runtime computes a batch's requests apart outside the experts: in fp32
        with the CPU as the fast device (``runtime.model.row_exact``, the reference mode)."""
        return self.profile.shares_cores and self.dtype == "float32"

    def batched_s(self, part: str, tokens: np.ndarray, context: np.ndarray,
                  member_fwd: np.ndarray | None = None) -> np.ndarray:
        """Seconds of the non-expert ``part`` of forwards whose members (requests) run
        ``tokens`` at ``context`` each; ``member_fwd`` says each member's forward (default:
        one forward). A forward of one member is the table itself. A batched one runs, as
        the runtime does, its members' rows together through every projection, the router
        and the head, and attention per request: priced as one sequence of all its tokens at
        the context that gives the same attention work (``sum(t c) / sum(t)``), plus
        ``member_s`` for each further member (the profile's, measured by ``runtime.profile``;
        0 where it was not measured; negative where a batch shares more than the rule
        assumes). Row-exact (:attr:`row_exact`), each member is computed apart: the members'
        sum, plus ``member_s`` likewise. Never below the largest member priced alone."""
        t = np.atleast_1d(np.asarray(tokens, dtype=np.float64))
        c = np.atleast_1d(np.asarray(context, dtype=np.float64))
        m = np.zeros(len(t), np.int64) if member_fwd is None else np.asarray(member_fwd)
        n = int(m[-1]) + 1 if len(m) else 0
        members = np.bincount(m, minlength=n)
        look = lambda tt, cc: self.profile.non_expert_s(self.shape.model_key, part, tt, cc)  # noqa: E731 (head: no context)
        extra = (members - 1) * self.profile.member_s(self.shape.model_key, part)
        own = np.asarray(look(t, c), dtype=np.float64)
        if (members == 1).all():
            return np.bincount(m, weights=own, minlength=n)
        if self.row_exact:
            rule = np.bincount(m, weights=own, minlength=n)
        else:
            T = np.bincount(m, weights=t, minlength=n)
            C = np.bincount(m, weights=t * c, minlength=n) / np.maximum(T, 1)
            rule = np.asarray(look(T, C), dtype=np.float64)
        largest = np.zeros(n)
        np.maximum.at(largest, m, own)
        return np.maximum(rule + extra, largest)  # never below its largest member alone

    def loop_s(self, members: int) -> float:
        """The decoding loop's host work for a forward of ``members`` requests: ``forward_s``,
        and ``member_s`` for each further one (``forward_s`` again where not measured)."""
        p = self.profile
        more = p.host("member_s") if p.has_host("member_s") else p.host("forward_s")
        return p.host("forward_s") + (members - 1) * more

    def fixed_parts(self, tokens: int | np.ndarray, context: int | np.ndarray) -> tuple[float, float, float]:
        """A forward's work outside the MoE layers, apart: one dense layer, the head
        (:meth:`batched_s` for a batched forward's members) and the decoding loop's host work
        (:meth:`loop_s`); the simulator runs them on their lanes, :meth:`fixed_s` adds them."""
        t = np.atleast_1d(tokens)
        dense = float(self.batched_s("dense_layer", t, context)[0]) if self.shape.first_k_dense else 0.0
        return dense, float(self.batched_s("head", t, context)[0]), self.loop_s(len(t))

    def fixed_s(self, tokens: int | np.ndarray, context: int | np.ndarray) -> float:
        """Per-forward work outside the MoE layers: every dense layer, the head and the loop."""
        dense, head, loop = self.fixed_parts(tokens, context)
        return self.shape.first_k_dense * dense + head + loop

