"""What a forward's placement decision makes each row do, in counts, not seconds.

Per MoE layer (or planner candidate row): experts and tokens computed on the fast device
that were already resident (``ready``) or copied in this forward (``fresh``), those
computed on the CPU (``miss``), the copies, the activations crossing the link, and a swap
row's waves. None of it depends on the box, so the planner replays its candidates once and
prices the same :class:`Work` on every profile a sweep asks about
(:meth:`traces.costs.cost_model.CostModel.price`). The one box-dependent sum, the missed experts' CPU
time (one expert after another, each with its own token count), is kept as interpolation
weights on token knots: priced on a profile, the sum is the weights times that profile's
times at the knots, exactly its piecewise-linear table when its knots are among them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from traces.policies.counters import cpu_mask
from traces.policies.decision import Decision

#: Past any forward's tokens: interpolating up to here never extrapolates.
FAR_TOKENS = float(1 << 24)


def knots_for(*tables: np.ndarray) -> np.ndarray:
    """Token knots that hold every given table's knots, from 1 token to :data:`FAR_TOKENS`."""
    return np.unique(np.concatenate([[1.0, FAR_TOKENS], *[np.asarray(t, np.float64) for t in tables]]))


def interp_weights(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """``[*x.shape, K]`` weights with ``weights @ y == np.interp(x, knots, y)`` for any ``y``."""
    x = np.clip(np.asarray(x, np.float64), knots[0], knots[-1])
    i = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, len(knots) - 2)
    t = (x - knots[i]) / (knots[i + 1] - knots[i])
    w = np.zeros((*x.shape, len(knots)))
    np.put_along_axis(w, i[..., None], (1 - t)[..., None], axis=-1)
    np.put_along_axis(w, (i + 1)[..., None], t[..., None], axis=-1)
    return w


@dataclass
class Work:
    """Rows' work in one or more forwards (``fwd`` says which), each field ``[V]`` but the
    CPU weights ``[V, K]`` and the waves ``[W, V]`` (zero where a row has fewer waves)."""

    fwd: np.ndarray  # [V] each row's forward
    tokens: np.ndarray  # [M] tokens each member (a request's part of a forward) runs
    context: np.ndarray  # [M] its context (KV cache) length
    member_fwd: np.ndarray  # [M] each member's forward (one member per forward in a batch-1 run)
    refreshed: np.ndarray  # tide rows whose placement was re-decided
    swap: np.ndarray  # rows running swap's waves (their hits and copies are in the waves)
    setup_n: np.ndarray  # copies filling the slots at the run's first forward
    copy_n: np.ndarray  # copies outside waves (tide's refresh)
    act_tokens: np.ndarray  # tokens whose hidden vector goes to the CPU and back
    ready_n: np.ndarray
    ready_tok: np.ndarray
    fresh_n: np.ndarray
    fresh_tok: np.ndarray
    miss_n: np.ndarray
    miss_tok: np.ndarray
    miss_w: np.ndarray  # [V, K] CPU-time interpolation weights of the missed experts, on ``knots``
    knots: np.ndarray  # [K]
    wave_copies: np.ndarray  # [W, V]
    wave_experts: np.ndarray  # [W, V]
    wave_tokens: np.ndarray  # [W, V]
    slots: np.ndarray  # [V] experts resident: the stack a grouped call on the fast device walks
    segments: np.ndarray  # [V] (request, expert) pairs with tokens: a row-exact batch's expert calls
    miss_segments: np.ndarray  # [V] those of missed experts
    hit_waves: np.ndarray  # [V] a row-exact batch's waves in its calls of resident experts that run in waves (ready, fresh, each swap wave)
    miss_waves: np.ndarray  # [V] the waves of its call of missed experts, when that runs in waves
    drive_n: np.ndarray  # [V] experts read from the drive before the layer's CPU work and copies (host tier)
    fill_n: np.ndarray  # [V] experts read into host memory after the layer's work (the host tier's refill)

    @property
    def n_rows(self) -> int:
        return len(self.fwd)

    @property
    def n_forwards(self) -> int:
        return int(self.member_fwd[-1]) + 1 if len(self.member_fwd) else 0

    @classmethod
    def concat(cls, parts: list["Work"]) -> "Work":
        """Several forwards' work as one (rows one after another, waves padded)."""
        W = max(p.wave_copies.shape[0] for p in parts)
        out = {}
        for f in fields(cls):
            k = f.name
            if k == "knots":
                out[k] = parts[0].knots
            elif k in ("fwd", "member_fwd"):
                offs = np.cumsum([0] + [p.n_forwards for p in parts[:-1]])
                out[k] = np.concatenate([getattr(p, k) + o for p, o in zip(parts, offs)])
            elif k.startswith("wave_"):
                out[k] = np.concatenate([np.pad(getattr(p, k), ((0, W - p.wave_copies.shape[0]), (0, 0)))
                                         for p in parts], axis=1)
            else:
                out[k] = np.concatenate([getattr(p, k) for p in parts])
        return cls(**out)

    def take(self, rows: np.ndarray) -> "Work":
        """The given rows only (their forwards' tokens and context kept; waves none of them has dropped)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v if f.name in ("tokens", "context", "member_fwd", "knots") else v[:, rows] if f.name.startswith("wave_") else v[rows]
        used = np.flatnonzero(out["wave_experts"].any(axis=1) | out["wave_copies"].any(axis=1))
        W = int(used[-1]) + 1 if len(used) else 0
        for k in ("wave_copies", "wave_experts", "wave_tokens"):
            out[k] = out[k][:W]
        return Work(**out)


def layer_work(decision: Decision, counts: np.ndarray, counters: dict[str, np.ndarray], act_bytes: float,
               knots: np.ndarray, tokens: int | np.ndarray, context: int | np.ndarray,
               segments: np.ndarray | None = None, drive_reads: np.ndarray | None = None,
               drive_fills: np.ndarray | None = None) -> Work:
    """One forward's work per row from its decision (``L`` rows, or ``L x G`` candidate rows
    all seeing ``counts`` ``[L, E]``), its counters and the activation bytes of a token;
    ``tokens`` and ``context``: its members' (one each, or arrays for a batched forward);
    ``segments`` (``[L, E]``, batched forwards): how many members have tokens on each expert;
    ``drive_reads`` / ``drive_fills`` (``[V]``, a host tier's): experts read from the drive."""
    counts = np.asarray(counts)
    L, E = counts.shape
    V = decision.n_rows
    G = V // L
    swap = np.zeros(V, bool) if decision.swap is None else decision.swap
    active = (counts > 0)[:, None, :]
    resident = decision.resident.reshape(L, G, E) & ~swap.reshape(L, G, 1)
    fresh = decision.fresh().reshape(L, G, E)
    cnt = counts[:, :, None].astype(np.float64)
    ready, new = active & resident & ~fresh, active & resident & fresh
    missed = cpu_mask(decision, counts)  # the counters' rule: chosen, not resident, not a swap row

    def n_tok(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return mask.sum(axis=-1).reshape(V), (mask @ cnt)[..., 0].reshape(V)
    ready_n, ready_tok = n_tok(ready)
    fresh_n, fresh_tok = n_tok(new)
    miss_n, miss_tok = n_tok(missed)
    weights = np.where(counts[:, :, None] > 0, interp_weights(np.maximum(counts, 1), knots), 0.0)  # [L, E, K]
    miss_w = (missed.astype(np.float64) @ weights).reshape(V, len(knots))
    in_waves = np.zeros(V, np.int64)
    W = int(decision.wave_of.max(initial=-1)) + 1 if decision.wave_of is not None else 0
    wave_copies, wave_experts, wave_tokens = (np.zeros((W, V)) for _ in range(3))
    if W:
        rows = np.flatnonzero(swap)
        wo = decision.wave_of
        layer_counts = counts[rows // G]
        table = decision.copy_table
        t = table[table[:, 3] >= 0]
        np.add.at(wave_copies, (t[:, 3], t[:, 0]), 1)
        in_waves = wave_copies.sum(axis=0).astype(np.int64)
        for w in range(W):
            m = wo == w
            wave_experts[w, rows] = m.sum(axis=1)
            wave_tokens[w, rows] = (m * layer_counts).sum(axis=1)
    tokens, context = np.atleast_1d(tokens), np.atleast_1d(context)
    seg = (counts > 0).astype(np.int64) if segments is None else np.asarray(segments, dtype=np.int64)

    def waved(mask: np.ndarray) -> np.ndarray:  # [L, G, E] -> [V]: the waves of a call whose experts hold rows of two requests
        if segments is None:  # one request per forward: never
            return np.zeros(V, np.int64)
        most = (mask * seg[:, None, :]).max(axis=-1, initial=0).reshape(V)  # the runtime's waves: most requests on one expert
        return np.where(most > 1, most, 0).astype(np.int64)
    hit_waves = waved(ready) + waved(new)
    if W and segments is not None:
        for w in range(W):
            m = np.zeros((V, E), bool)
            m[rows] = decision.wave_of == w
            hit_waves = hit_waves + waved(m.reshape(L, G, E) & active)
    return Work(fwd=np.zeros(V, np.int64), tokens=tokens, context=context,
                member_fwd=np.zeros(len(tokens), np.int64),
                refreshed=np.zeros(V, bool) if decision.refreshed is None else decision.refreshed.copy(),
                swap=swap.copy(), setup_n=counters["setup_migrations"], copy_n=counters["migrations"] - in_waves,
                act_tokens=counters["bytes_act"] / act_bytes / 2, ready_n=ready_n, ready_tok=ready_tok,
                fresh_n=fresh_n, fresh_tok=fresh_tok, miss_n=miss_n, miss_tok=miss_tok, miss_w=miss_w, knots=knots,
                wave_copies=wave_copies, wave_experts=wave_experts, wave_tokens=wave_tokens,
                slots=decision.resident.sum(axis=1),
                segments=np.repeat(seg.sum(axis=1), G), miss_segments=(missed * seg[:, None, :]).sum(axis=-1).reshape(V),
                hit_waves=hit_waves, miss_waves=waved(missed),
                drive_n=np.zeros(V, np.int64) if drive_reads is None else np.asarray(drive_reads, np.int64),
                fill_n=np.zeros(V, np.int64) if drive_fills is None else np.asarray(drive_fills, np.int64))
