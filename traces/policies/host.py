"""The host tier: which of a layer's experts host memory keeps, the rest living only on the drive.

TIDE's rule one level down. Each MoE layer holds ``budget`` experts in host memory; an expert
its GPU placement needs from the host this forward (the *demand*: experts it computes on the
CPU and experts it copies to the GPU) that host memory lacks is read from the drive first (a
*read*, on the forward's path). How the held set changes is the host kind:

* ``tide``: at a block's first step and every ``tau`` steps after it, the layer's experts are
  ranked by this forward's token counts (ties: the earlier ranking), and the top ``budget``
  are held; experts entering the set are read in (*fills*, after the layer's work);
* ``static``: the top ``budget`` of the setup counts (a popularity trace, or the first
  forward's), filled at the first forward and never changed;
* ``lru``: what mapping the file gives people today: every read expert enters, the least
  recently used leaves; no fills.

Each rule is a ranking of the layer's experts (``rank``, 0 first) plus which experts have ever
been loaded (``seen``); the held set at budget ``H`` is ``rank < H`` among the seen, for every
``H`` at once, so the planner prices every host budget from one pass (:func:`reads_at`).
Pure functions of token counts: the runtime executes, the simulator and planner replay, alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from traces.common.errors import TideError
from traces.formats.vocabulary import FORWARD_KINDS, HOST_KINDS

if TYPE_CHECKING:
    from traces.policies.decision import Decision


@dataclass(frozen=True)
class HostPolicy:
    """Per MoE layer: its host kind (:data:`HOST_KINDS`), the experts host memory holds
    (``budget``; every expert: the layer never reads the drive) and, for ``tide``, the refresh
    interval ``tau``."""

    kind: np.ndarray  # [L] str
    budget: np.ndarray  # [L] int
    tau: np.ndarray  # [L] int (1 where the kind has none)

    @classmethod
    def make(cls, kind: str | Sequence[str], n_layers: int, experts: int, budget: int | Sequence[int],
             tau: int | Sequence[int] = 1) -> "HostPolicy":
        """Validated; a bad value is a :class:`~traces.policies.spec.PolicyError` naming
        ``host_policy``, ``host_budget`` or ``host_tau`` (each command maps it to its flag)."""
        from traces.policies.spec import PolicyError, _per_layer, per_layer_names
        kinds = per_layer_names(kind, n_layers, HOST_KINDS, "host_policy", "host kind")
        b = _per_layer(budget, n_layers, "host_budget", "host budgets")
        if (b < 0).any() or (b > experts).any():
            raise PolicyError("host_budget", f"host budgets must lie in 0..{experts}, got {b.min()}..{b.max()}")
        t = _per_layer(tau, n_layers, "host_tau", "values of host tau")
        if (t < 1).any():
            raise PolicyError("host_tau", f"host tau must be at least 1, got {t.min()}")
        return cls(np.array(kinds, dtype=object), b, t)

    @classmethod
    def everything(cls, n_layers: int, experts: int) -> "HostPolicy":
        """Every expert in host memory: the drive is never read (what runs without a host budget)."""
        return cls.make("tide", n_layers, experts, experts)

    @property
    def kinds(self) -> list[str]:
        return [str(k) for k in self.kind]

    @property
    def label(self) -> str:
        """One kind's name, or the kinds joined (a plan may mix them)."""
        return "+".join(dict.fromkeys(self.kinds))

    def on_drive(self, experts: int) -> np.ndarray:
        """[L] bool: the layers that keep some experts on the drive only."""
        return self.budget < experts

    def refresh_mask(self, kind: str, step: int) -> np.ndarray:
        """Layers whose held set is re-ranked at this forward (``tide`` layers only): at
        prefills, a block's first step and every ``tau`` steps after it; never at a commit."""
        from traces.policies.spec import refresh_points
        if kind not in FORWARD_KINDS:
            raise TideError(f"unknown forward kind {kind!r}")
        return refresh_points(self.kind == "tide", self.tau, kind, step)

    def to_json(self) -> dict:
        kinds = self.kinds
        return {"kind": kinds[0] if len(set(kinds)) == 1 else kinds, "budget": self.budget.tolist(),
                "tau": self.tau.tolist()}

    @classmethod
    def from_json(cls, d: object, n_layers: int, experts: int) -> "HostPolicy":
        from traces.policies.spec import PolicyError
        if not isinstance(d, dict) or not isinstance(d.get("kind"), (str, list)) or "budget" not in d:
            raise PolicyError("host_policy", f"a recorded host policy is an object with a kind and budgets, got {d!r}")
        return cls.make(d["kind"], n_layers, experts, d["budget"], d.get("tau", 1))


def _rank_by(keys_desc: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """[rows, E] ranks ordering each row by ``keys_desc`` (larger first), ties by ``previous`` rank."""
    order = np.lexsort((previous, -keys_desc), axis=-1)
    rank = np.empty_like(previous)
    np.put_along_axis(rank, order, np.arange(previous.shape[-1])[None, :].repeat(len(previous), 0), axis=-1)
    return rank


@dataclass
class HostState:
    """Per row (a layer; for the planner, a layer whose rows share it): each expert's rank and
    whether it was ever loaded, and (lru) when it was last used."""

    rank: np.ndarray  # [rows, E] int64
    seen: np.ndarray  # [rows, E] bool
    last: np.ndarray  # [rows, E] int64 forward clock of the last use, -1 never
    clock: int = 0

    @classmethod
    def empty(cls, rows: int, experts: int) -> "HostState":
        return cls(np.tile(np.arange(experts, dtype=np.int64), (rows, 1)), np.zeros((rows, experts), bool),
                   np.full((rows, experts), -1, np.int64))

    def rows(self, rows: np.ndarray) -> "HostState":
        """These rows' state (a copy)."""
        return HostState(self.rank[rows].copy(), self.seen[rows].copy(), self.last[rows].copy(), self.clock)

    def held(self, budget: np.ndarray) -> np.ndarray:
        """[rows, E] what host memory holds at ``budget`` ([rows]) experts per row (a budget of
        every expert holds them all from the start: loaded with the model)."""
        b = np.asarray(budget)[:, None]
        return ((self.rank < b) & self.seen) | (b >= self.rank.shape[1])

    def held_at(self, budgets: np.ndarray) -> np.ndarray:
        """[rows, H, E] what it holds at each budget of ``budgets`` ([H]), every row."""
        b = np.asarray(budgets)[None, :, None]
        return ((self.rank[:, None, :] < b) & self.seen[:, None, :]) | (b >= self.rank.shape[1])


@dataclass
class HostRunner:
    """Holds the host tier's state between forwards: call :meth:`begin` at a forward, then
    :meth:`layer` for each MoE layer (or :meth:`advance` for all at once)."""

    policy: HostPolicy
    experts: int
    setup_counts: np.ndarray | None = None
    state: HostState | None = field(default=None, init=False)

    def begin(self, kind: str, step: int, more: Sequence[tuple[str, int]] = ()) -> None:
        """Start a forward (``more``: a batch's other members; any at a refresh point refreshes)."""
        self._refresh = np.logical_or.reduce([self.policy.refresh_mask(k, s) for k, s in [(kind, step), *more]])
        self._first = self.state is None
        if self._first:
            self.state = HostState.empty(len(self.policy.budget), self.experts)
        self.state.clock += 1

    def advance(self, layers: np.ndarray, counts: np.ndarray, demand: np.ndarray) -> HostState:
        """Move ``layers``' state over this forward (``counts`` ``[n, E]`` routed tokens, ``demand``
        ``[n, E]`` experts the GPU placement needs from the host) and return the state before
        it, so a caller compares held sets before and after at any budget."""
        st = self.state
        layers = np.asarray(layers)
        before = st.rows(layers)
        kind = self.policy.kind[layers]
        counts, demand = np.asarray(counts), np.asarray(demand)
        lru = kind == "lru"
        if lru.any():
            sel, d = layers[lru], demand[lru]
            last = np.where(d, st.clock, st.last[sel])
            st.last[sel] = last
            st.rank[sel] = _rank_by(last, st.rank[sel])
            st.seen[sel] |= d
        static = (kind == "static") & self._first
        if static.any():
            sel = layers[static]
            src = counts[static] if self.setup_counts is None else np.asarray(self.setup_counts)[sel]
            st.rank[sel] = _rank_by(np.asarray(src), st.rank[sel])
            st.seen[sel] = True
        tide = (kind == "tide") & (self._refresh[layers] | self._first)
        if tide.any():
            sel = layers[tide]
            st.rank[sel] = _rank_by(counts[tide], st.rank[sel])
            st.seen[sel] = True
        return before

    def step(self, layers: np.ndarray, counts: np.ndarray, demand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``layers``' host work at their own budgets (``[n, E]`` bool each): the experts to read
        now (demand not held), to fill after the layer's work (entering the held set, not read
        now), and the held set after."""
        layers = np.asarray(layers)
        demand = np.asarray(demand, bool)
        b = self.policy.budget[layers]
        before = self.advance(layers, counts, demand)
        held0, held1 = before.held(b), self.state.rows(layers).held(b)
        return demand & ~held0, held1 & ~held0 & ~demand, held1

    def layer(self, l: int, counts: np.ndarray, demand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`step` of one layer (``[E]`` each): what the runtime asks as each layer routes."""
        reads, fills, held = self.step(np.array([l]), np.asarray(counts)[None, :], np.asarray(demand)[None, :])
        return reads[0], fills[0], held[0]


def demand(decision: "Decision", counts: np.ndarray) -> np.ndarray:
    """``[rows, E]`` experts each row needs from host memory this forward: those it computes
    on the CPU and those it copies to the fast device (setup, refresh, swap waves)."""
    from traces.policies.counters import cpu_mask
    need = cpu_mask(decision, np.asarray(counts)).reshape(decision.n_rows, -1)
    for t in (decision.setup_table, decision.copy_table):
        need[t[:, 0], t[:, 1]] = True
    return need


def reads_at(before: HostState, after: HostState, demand: np.ndarray, budgets: np.ndarray,
             group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Reads and fills ``[rows x group, H]`` at every budget of ``budgets`` ([H]) for demand
    ``[rows x group, E]``: ``group`` candidate rows share each layer's host state (tide and
    static rank by counts only, so a layer's candidates share the ranking)."""
    h0, h1 = before.held_at(budgets), after.held_at(budgets)  # [rows, H, E]
    rows, E = h0.shape[0], h0.shape[2]
    d = demand.reshape(rows, group, E).astype(np.float32)
    miss0 = (~h0).astype(np.float32)
    new = (h1 & ~h0).astype(np.float32)
    reads = np.matmul(d, miss0.transpose(0, 2, 1))  # [rows, group, H]
    fills = new.sum(axis=-1)[:, None, :] - np.matmul(d, new.transpose(0, 2, 1))
    return reads.reshape(rows * group, -1).round().astype(np.int64), fills.reshape(rows * group, -1).round().astype(np.int64)
