"""Placement policies: the single implementation of every expert-placement decision.

The runtime executes these decisions and the simulator replays them, so both make the
same choices. Each policy is a pure function of token counts: ``setup`` fills the
resident set from the setup counts (the first forward's, or a popularity trace's), and
``step`` takes the state and one forward's per-layer, per-expert token counts and returns
the new state and what to copy where and what runs where.

Rules (ranking is always by count, ties by lower expert id):

* setup fills each MoE layer's ``B`` slots with the top ``B`` experts by setup count (a
  plan may fix a static layer's residents in advance instead); those copies are
  ``setup_migrations``. Every later copy is a ``migration``.
* ``all``: ``B = experts``; ``cpu``: ``B = 0``, every routed token on the CPU.
* ``static`` (Fiddler): the setup placement never changes; misses on the CPU.
* ``swap`` (Mixtral-Offload): every chosen expert not resident is copied in before it
  computes, in waves of at most ``B`` experts (rank order) when a layer needs more,
  evicting the least recently used (ties by lower id); nothing on the CPU.
* ``tide``: refresh at every prefill forward, at each block's first denoising step and
  every ``tau`` denoising steps after it; block-commit forwards never refresh. At a
  refresh the forward's experts with non-zero count, ranked (ties: resident first), fill up
  to ``B`` slots; only non-resident ones are copied; residents are evicted only to make
  room (lowest count in this forward, then least recently used, then lower id). The
  refreshing forward runs on the new placement; between refreshes misses run on the CPU.
* ``plan``: a kind per MoE layer (``cpu``, ``static``, ``swap`` or ``tide``, :data:`KINDS`),
  each with its own ``B`` (and ``tau`` for ``tide``); every layer follows its kind's rules
  exactly as a uniform policy of that kind would (rows never look at one another).

A policy's rows keep one clock: it ticks once per forward and once per extra swap wave, so
"least recently used" means the same thing whatever the other rows do.

In a batched forward (several requests, each at its own block and step) the counts are the
whole batch's, one decision per layer, and ``tau`` still counts each request's own
denoising steps: a tide layer refreshes when any request in the forward is at a refresh
point of its own (its prefill, its block's first step, or every ``tau`` steps after it).
A joining request's prefill therefore refreshes the batch, as a prefill does alone; a
batch of one refreshes exactly as before.

After evictions, new experts (in rank order) take the lowest-numbered free slots, so slot
numbers (which the runtime uses to index its stacked weights) are part of the decision too.

Every function decides a batch of rows (MoE layers) at once: the runtime passes one layer
as its router chooses, the simulator a whole forward, and the planner thousands of
candidate rows (every refresh interval and budget of every layer) in one pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from traces.cli import span
from traces.errors import TideError

POLICIES: tuple[str, ...] = ("all", "cpu", "static", "swap", "tide", "plan")
#: What a layer of a plan may run (``all`` is ``static`` with every expert).
KINDS: tuple[str, ...] = ("cpu", "static", "swap", "tide")
CPU, STATIC, SWAP, TIDE = range(len(KINDS))
_KIND_OF = {"all": STATIC, "cpu": CPU, "static": STATIC, "swap": SWAP, "tide": TIDE}
FORWARD_KINDS: tuple[str, ...] = ("prefill", "step", "commit")


class PolicyError(TideError):
    """A policy parameter that cannot be: ``param`` (``policy``, ``budget`` or ``tau``) names
    it, so each command reports its own flag (:meth:`for_flags`)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message

    def for_flags(self, flags: dict[str, str]) -> TideError:
        return TideError(f"{flags.get(self.param, self.param)}: {self.message}")


def _per_layer(v: int | Sequence[int], n_layers: int, param: str, what: str) -> np.ndarray:
    """One integer for every layer, or one per layer; anything else is a PolicyError naming ``param``."""
    a = np.asarray(v)
    if a.ndim > 1 or (a.ndim == 1 and len(a) != n_layers):
        raise PolicyError(param, f"expected one value or {n_layers} per-layer {what}, got {a.size}")
    if a.size and not (np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_):
        raise PolicyError(param, f"{what} must be integers, got {v!r}")
    return np.broadcast_to(a.astype(np.int64), (n_layers,)).copy()


@dataclass(frozen=True)
class Policy:
    """A placement policy: per MoE layer its kind (:data:`KINDS`), its budget and, for
    ``tide`` layers, its refresh interval. Uniform policies have one kind; ``plan`` mixes them."""

    name: str
    budget: np.ndarray  # [L] int: expert slots per MoE layer on the fast device
    tau: np.ndarray | None = None  # [L] int: tide and plan only (0 on a plan's layers that are not tide)
    kind: np.ndarray | None = None  # [L] int8 index into KINDS (set by make)
    resident: np.ndarray | None = None  # [L, E] bool: a static layer's residents fixed in advance (a plan's)

    @classmethod
    def make(cls, name: str, n_layers: int, experts: int, budget: int | Sequence[int] | None = None,
             tau: int | Sequence[int] | None = None, kind: str | Sequence[str] | None = None,
             resident: dict[int, Sequence[int]] | None = None) -> "Policy":
        """Validate and build; a bad value is a :class:`PolicyError` naming the parameter
        (``policy``, ``budget``, ``tau``, ``kind``, ``resident``), which each command maps to
        its own flag. ``kind`` (names, one or one per layer) is for ``plan`` only; a plan
        without kinds is all ``tide`` (the version-1 plans). ``resident`` (plans only: MoE
        layer index -> expert ids) fixes a static layer's resident experts in advance, in
        place of its setup counts' top ``B`` (so the runtime can load them straight onto the
        fast device)."""
        if name not in POLICIES:
            raise PolicyError("policy", f"unknown policy {name!r} (expected one of {', '.join(POLICIES)})")
        if name == "plan":
            k = _kinds(kind if kind is not None else "tide", n_layers)
        elif kind is not None:
            raise PolicyError("kind", f"only a plan has per-layer kinds, not {name}")
        else:
            k = np.full(n_layers, _KIND_OF[name], dtype=np.int8)
        if name == "all":
            b = np.full(n_layers, experts)
        elif name == "cpu":
            b = np.zeros(n_layers, dtype=np.int64)
        else:
            if budget is None:
                raise PolicyError("budget", f"policy {name} needs a budget of GPU experts per layer")
            b = _per_layer(budget, n_layers, "budget", "budgets")
            if (b < 0).any() or (b > experts).any():
                raise PolicyError("budget", f"budgets must lie in 0..{experts}, got {b.min()}..{b.max()}")
            if ((k == SWAP) & (b < 1)).any():
                raise PolicyError("budget", "swap needs at least one GPU expert per layer")
            if ((k == CPU) & (b != 0)).any():
                raise PolicyError("budget", "a cpu layer has no GPU experts (budget 0)")
        t = None
        if name in ("tide", "plan"):
            if tau is None:
                if name == "plan" and (k == TIDE).any():
                    raise PolicyError("tau", "plan policy needs per-layer tau")
                tau = 1 if name == "tide" else 0
            t = _per_layer(tau, n_layers, "tau", "values of tau")
            if (t[k == TIDE] < 1).any():
                raise PolicyError("tau", f"tau must be at least 1, got {t[k == TIDE].min()}")
            t = np.where(k == TIDE, t, 0)
        fixed = None
        if resident:
            if name != "plan":
                raise PolicyError("resident", f"only a plan fixes residents in advance, not {name}")
            fixed = np.zeros((n_layers, experts), dtype=bool)
            for l, ids in resident.items():
                ids = np.asarray(list(ids))
                if not isinstance(l, (int, np.integer)) or not 0 <= l < n_layers or k[l] != STATIC:
                    raise PolicyError("resident", f"layer {l}: residents are fixed for static layers only")
                if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= experts):
                    raise PolicyError("resident", f"layer {l}: expert ids must be integers in 0..{experts - 1}")
                if len(set(ids.tolist())) != len(ids) or len(ids) != b[l]:
                    raise PolicyError("resident", f"layer {l}: expected {b[l]} distinct experts (its budget), got {len(ids)}")
                fixed[l, ids] = True
        return cls(name=name, budget=b.astype(np.int64), tau=t, kind=k, resident=fixed)

    def residents(self) -> dict[int, list[int]]:
        """The fixed residents by MoE layer index (empty: none fixed)."""
        if self.resident is None:
            return {}
        return {int(l): np.flatnonzero(self.resident[l]).tolist() for l in range(self.n_layers) if self.resident[l].any()}

    @property
    def n_layers(self) -> int:
        return len(self.budget)

    @property
    def swap_rows(self) -> np.ndarray:
        """[L] bool: the layers that run swap's waves."""
        return self.kind == SWAP

    @property
    def kinds(self) -> list[str]:
        """Each layer's kind, by name."""
        return [KINDS[k] for k in self.kind]

    @property
    def label(self) -> str:
        """The name tables and plans use: the policy, or for tide its tau (``tide_tau1``, the
        baseline, or ``tide tau=4``; ``tide tau=1-4`` when layers differ)."""
        if self.name != "tide":
            return self.name
        lo, hi = int(self.tau.min()), int(self.tau.max())
        return "tide_tau1" if hi == 1 else f"tide tau={lo}" if lo == hi else f"tide tau={lo}-{hi}"

    def to_json(self) -> dict:
        """As traces and results record it."""
        d = {"name": self.name, "budget": self.budget.tolist(), "tau": self.tau.tolist() if self.tau is not None else None}
        if self.name == "plan":
            d["kind"] = self.kinds
            if self.resident is not None:
                d["resident"] = {str(l): ids for l, ids in self.residents().items()}
        return d

    @classmethod
    def from_json(cls, d: dict, n_layers: int, experts: int) -> "Policy":
        """What :meth:`to_json` wrote, checked as :meth:`make` checks."""
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise PolicyError("policy", f"a recorded policy is an object with a name, got {d!r}")
        res = d.get("resident")
        if res is not None and not (isinstance(res, dict) and all(str(k).isdigit() for k in res)):
            raise PolicyError("resident", f"a recorded policy's residents map layer indices to expert ids, got {res!r}")
        return cls.make(d["name"], n_layers, experts, budget=d.get("budget"), tau=d.get("tau"), kind=d.get("kind"),
                        resident={int(k): v for k, v in res.items()} if res else None)

    def refresh_mask(self, kind: str, step: int) -> np.ndarray:
        """Which layers refresh at this forward: tide layers at prefills, at a block's first
        step and every ``tau`` steps after it; never any other layer."""
        if self.tau is None or kind == "commit":
            return np.zeros(self.n_layers, dtype=bool)
        tide = self.kind == TIDE
        if kind == "prefill" or step == 0:
            return tide.copy()
        return tide & (step % np.maximum(self.tau, 1) == 0)


def display_name(label: str) -> str:
    """How a person reads a policy's label: ``tide tau=1`` for the baseline ``tide_tau1``
    (its key in plans, tables' columns and code), every other label as it is."""
    return "tide tau=1" if label == "tide_tau1" else label


def kinds_label(kinds: Sequence[str]) -> str:
    """``tide x16, swap x3``: how many layers of each kind, most first."""
    n = {k: list(kinds).count(k) for k in KINDS if k in kinds}
    return ", ".join(f"{k} x{c}" for k, c in sorted(n.items(), key=lambda kv: -kv[1]))


def tau_label(kinds: Sequence[str], tau: Sequence[int] | None) -> str:
    """The taus of the tide layers (``1-4``), or ``-`` when there are none."""
    taus = [t for t, k in zip(tau, kinds) if k == "tide"] if tau is not None else []
    return span(taus) if taus else "-"


def check_kinds(names: Sequence[str], flag: str) -> None:
    """Kind names from a flag or a caller: each among :data:`KINDS`, and at least one."""
    bad = [k for k in names if k not in KINDS]
    if bad or not len(names):
        raise TideError(f"{flag}: unknown kind {bad[0]!r} (expected {', '.join(KINDS)})" if bad
                        else f"{flag}: no kinds (expected some of {', '.join(KINDS)})")


def _kinds(kind: str | Sequence[str], n_layers: int) -> np.ndarray:
    """Kind names (one, or one per layer) as indices into :data:`KINDS`."""
    names = [kind] * n_layers if isinstance(kind, str) else list(kind)
    if len(names) != n_layers:
        raise PolicyError("kind", f"expected one kind or {n_layers} per-layer kinds, got {len(names)}")
    bad = [k for k in names if k not in KINDS]
    if bad:
        raise PolicyError("kind", f"unknown kind {bad[0]!r} (expected one of {', '.join(KINDS)})")
    return np.array([KINDS.index(k) for k in names], dtype=np.int8)


def every_kind(n_layers: int, experts: int, small: int, large: int, tau: int) -> Policy:
    """A plan of every kind in turn, layer by layer (swap at ``small``, tide at ``large`` and
    ``tau``, static at ``large``, cpu): how the benchmarks check mixed plans for real."""
    kinds = (["swap", "tide", "static", "cpu"] * n_layers)[:n_layers]
    budget = {"swap": small, "tide": large, "static": large, "cpu": 0}
    return Policy.make("plan", n_layers, experts, kind=kinds, budget=[budget[k] for k in kinds], tau=tau)


#: The policies every plan is compared with, by label, in this order.
BASELINES: tuple[str, ...] = ("cpu", "static", "tide_tau1", "swap")


def baselines(n_layers: int, experts: int, budget: int) -> dict[str, Policy]:
    """``cpu``, ``static``, ``tide`` tau=1 and ``swap`` (when ``budget >= 1``) at one uniform
    budget (the largest that fits, :meth:`traces.memory.MemoryBudget.largest_uniform`)."""
    out = {"cpu": Policy.make("cpu", n_layers, experts), "static": Policy.make("static", n_layers, experts, budget=budget),
           "tide_tau1": Policy.make("tide", n_layers, experts, budget=budget, tau=1)}
    if budget >= 1:
        out["swap"] = Policy.make("swap", n_layers, experts, budget=budget)
    return out


@dataclass
class PlacementState:
    """Per row (an MoE layer, or one of a layer's ``group`` candidate rows): which experts are
    resident, in which slot, and when placed; per layer, when each expert was last chosen.

    A resident expert's last use is the later of its placement and its layer's last choice
    of it (it has been resident ever since it was placed), so choices are recorded once per
    layer, not once per row."""

    slot_of: np.ndarray  # [rows, E] int32, -1 when not resident
    in_slot: np.ndarray  # [rows, Bmax] int32, -1 when empty, -2 past the row's budget
    placed: np.ndarray  # [rows, E] int32 clock of the current placement, -1 never
    chosen: np.ndarray  # [rows / group, E] int32 clock of the layer's last choice, -1 never
    group: int = 1
    clock: int = 0

    @classmethod
    def empty(cls, policy: Policy, experts: int, group: int = 1) -> "PlacementState":
        V = policy.n_layers
        if V % group:
            raise TideError(f"{V} policy rows do not split into groups of {group}")
        bmax = int(policy.budget.max()) if V else 0
        in_slot = np.full((V, bmax), -1, np.int32)
        in_slot[np.arange(bmax)[None, :] >= policy.budget[:, None]] = -2  # beyond this row's budget
        return cls(slot_of=np.full((V, experts), -1, np.int32), in_slot=in_slot,
                   placed=np.full((V, experts), -1, np.int32), chosen=np.full((V // group, experts), -1, np.int32),
                   group=group)

    @property
    def resident(self) -> np.ndarray:
        return self.slot_of >= 0

    def last_use(self, rows: np.ndarray | int) -> np.ndarray:
        """``[n, E]`` (``[E]`` for one row) when each resident expert of ``rows`` was last used (placed or chosen)."""
        return np.maximum(self.placed[rows], self.chosen[rows // self.group])

    def copy(self) -> "PlacementState":
        return replace(self, slot_of=self.slot_of.copy(), in_slot=self.in_slot.copy(), placed=self.placed.copy(),
                       chosen=self.chosen.copy())


@dataclass
class Wave:
    """Copies to make (``[n, 2]`` of expert, slot, in order), then experts computed on the fast device."""

    copies: np.ndarray
    gpu_experts: np.ndarray


#: Copy tables are ``[n, 4]``: (row, expert, slot, wave); ``wave`` is the swap wave the copy
#: belongs to, -1 for setup and tide copies.
_NO_TABLE = np.zeros((0, 4), dtype=np.int32)
_NEVER = np.iinfo(np.int64).max  # an eviction key that never leaves
_NONE = np.zeros(0, dtype=np.int64)  # no expert


def _per_row_tables(table: np.ndarray, n_rows: int) -> list[np.ndarray]:
    """Split a ``[n, 4]`` copy table, sorted by row, into per-row tables."""
    cuts = np.cumsum(np.bincount(table[:, 0], minlength=n_rows))[:-1] if len(table) else np.zeros(n_rows - 1, int)
    return np.split(table, cuts) if n_rows else []


def _per_row(table: np.ndarray, n_rows: int) -> list[np.ndarray]:
    """Per-row ``[m, 2]`` (expert, slot) of a copy table."""
    return [c[:, 1:3] for c in _per_row_tables(table, n_rows)]


def _waves_of(table: np.ndarray, wave_of: np.ndarray) -> list[Wave]:
    """One swap row's waves from its copies ``[n, 4]`` and its experts' waves ``[E]``."""
    n = int(wave_of.max()) + 1 if len(wave_of) else 0
    return [Wave(copies=table[table[:, 3] == w, 1:3], gpu_experts=np.flatnonzero(wave_of == w)) for w in range(n)]


@dataclass
class Decision:
    """What one forward does per MoE layer (row).

    ``resident`` is the placement the forward computes on. On every row but a ``swap`` row,
    chosen resident experts run on the fast device and chosen non-resident ones on the CPU,
    after the copies; a swap row runs its waves in order (``wave_of``: the wave each chosen
    expert computes in) and nothing on the CPU. Copies are tables ``[n, 4]`` of (row,
    expert, slot, wave), in the order they are made; ``copies`` / ``setup_copies`` give
    them per row as ``[m, 2]`` (expert, slot).
    """

    resident: np.ndarray  # [rows, E] bool
    setup_table: np.ndarray  # [n, 4]
    copy_table: np.ndarray  # [n, 4], after setup
    swap: np.ndarray | None = None  # [rows] bool: rows that run waves (None: none do)
    wave_of: np.ndarray | None = None  # [swap rows, E] int16: each swap row's wave per chosen expert, -1 otherwise
    refreshed: np.ndarray | None = None  # [rows] bool: rows whose placement was re-decided (tide's refresh)

    @property
    def n_rows(self) -> int:
        return self.resident.shape[0]

    @property
    def copies(self) -> list[np.ndarray]:
        return _per_row(self.copy_table, self.n_rows)

    @property
    def setup_copies(self) -> list[np.ndarray]:
        return _per_row(self.setup_table, self.n_rows)

    @property
    def migrations(self) -> np.ndarray:
        return np.bincount(self.copy_table[:, 0], minlength=self.n_rows).astype(np.int64)

    @property
    def setup_migrations(self) -> np.ndarray:
        return np.bincount(self.setup_table[:, 0], minlength=self.n_rows).astype(np.int64)

    @property
    def waves(self) -> list[list[Wave] | None]:
        """Per row: its swap waves in order, or None for a row that does not swap."""
        per_row = _per_row_tables(self.copy_table, self.n_rows)
        out: list[list[Wave] | None] = [None] * self.n_rows
        if self.swap is not None:
            for i, r in enumerate(np.flatnonzero(self.swap).tolist()):
                out[r] = _waves_of(per_row[r], self.wave_of[i])
        return out

    def fresh(self) -> np.ndarray:
        """[rows, E] experts copied in during this forward (their hits wait for the copy)."""
        out = np.zeros(self.resident.shape, dtype=bool)
        out[self.copy_table[:, 0], self.copy_table[:, 1]] = True
        return out


def _rank_keys(counts: np.ndarray, resident: np.ndarray | None = None) -> np.ndarray:
    """Composite keys ``-count * 2E + (not resident) * E + id``: ascending key = rank order."""
    E = counts.shape[-1]
    key = np.multiply(counts, -2 * E, dtype=np.int64)
    key += _ids(E) if resident is None else np.where(resident, _ids(E), _ids(E) + E)
    return key


def device_only(policy: Policy, experts: int, setup_counts: np.ndarray | None = None) -> dict[int, list[int]]:
    """Experts of each MoE layer (index) known before the run to stay on the fast device for
    the whole run, so they need no host copy: every expert of a layer whose budget is every
    expert, and a static layer's residents when fixed in advance (a plan's) or set by
    ``setup_counts`` (a popularity trace: its top ``B``, as setup ranks them)."""
    out: dict[int, list[int]] = {}
    for l, (k, b) in enumerate(zip(policy.kind, policy.budget)):
        if b >= experts:
            out[l] = list(range(experts))
        elif k == STATIC and b > 0 and policy.resident is not None and policy.resident[l].any():
            out[l] = np.flatnonzero(policy.resident[l]).tolist()
        elif k == STATIC and b > 0 and setup_counts is not None:
            out[l] = sorted(rank(np.asarray(setup_counts)[l])[:b].tolist())
    return out


def rank(counts: np.ndarray, resident: np.ndarray | None = None) -> np.ndarray:
    """Expert ids by count descending, then (if given) resident first, then lower id.

    ``counts`` is ``[E]`` or ``[rows, E]``; the ranking is along the last axis."""
    counts = np.asarray(counts)
    key = _rank_keys(counts, resident)
    key.sort(axis=-1)
    return key % counts.shape[-1]


_IDS: dict[int, np.ndarray] = {}


def _ids(E: int) -> np.ndarray:
    ids = _IDS.get(E)
    if ids is None:
        ids = _IDS[E] = np.arange(E)
    return ids


def _place(state: PlacementState, rows: np.ndarray, new: np.ndarray, new_mask: np.ndarray, n_new: np.ndarray,
           evict: tuple[np.ndarray, np.ndarray] | None = None, wave: int = -1) -> np.ndarray:
    """Evict then place: ``evict`` is (row index into ``rows``, expert) pairs that leave; then
    each row's ``n_new`` experts ``new[r][new_mask[r]]`` (in that order) take its
    lowest-numbered free slots. Mutates ``state``; returns the ``[n, 4]`` copies (row,
    expert, slot, ``wave``)."""
    nr, nk = np.nonzero(new_mask)
    if not len(nr):
        return _NO_TABLE
    in_slot, slot_of = state.in_slot[rows], state.slot_of[rows]
    if evict is not None:
        er, ee = evict
        in_slot[er, slot_of[er, ee]] = -1
        slot_of[er, ee] = -1
    free = in_slot == -1
    fr, fs = np.nonzero(free & (free.cumsum(axis=1, dtype=np.int16) <= n_new[:, None]))
    if len(fs) != len(nr):  # defensive: the callers guarantee room
        raise AssertionError("placement has no room")
    ne = new[nr, nk]  # row-major like (fr, fs): the k-th new expert of a row takes its k-th free slot
    slot_of[nr, ne] = fs
    in_slot[nr, fs] = ne
    state.slot_of[rows], state.in_slot[rows] = slot_of, in_slot
    state.placed[rows[nr], ne] = state.clock
    out = np.empty((len(nr), 4), dtype=np.int32)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = rows[nr], ne, fs, wave
    return out


def _lru_keys(last_use: np.ndarray, ids: np.ndarray, E: int) -> np.ndarray:
    """Composite keys: ascending key = least recently used first, then lower id (``last_use``
    -1 for never): swap's eviction order, and :func:`_evict_keys`' tie-break."""
    out = last_use.astype(np.int64) + 1
    out *= E
    out += ids
    return out


def _evict_keys(counts: np.ndarray, last_use: np.ndarray, clock: int, ids: np.ndarray | None = None,
                E: int | None = None) -> np.ndarray:
    """Composite eviction keys: ascending key = who leaves first (lowest count, then least
    recently used, then lower id). ``last_use`` is below ``clock``; -1 for never. ``ids``
    (of ``E`` experts in all) when the keys are for a subset, else every expert in order."""
    E = counts.shape[-1] if E is None else E
    out = _lru_keys(last_use, _ids(E) if ids is None else ids, E)
    out += np.multiply(counts, (clock + 2) * E, dtype=np.int64)
    return out


def _tide_refresh_row(state: PlacementState, r: int, counts: np.ndarray, budget: int) -> np.ndarray:
    """:func:`_tide_refresh` for one row (the runtime's layer as its router has chosen): the
    same keys and rules, a few numpy calls on ``[E]`` instead of many on ``[1, E]``."""
    E = counts.shape[0]
    slot_of, in_slot = state.slot_of[r], state.in_slot[r]
    resident = slot_of >= 0
    key = _rank_keys(counts, resident)
    ranked = np.sort(key)
    target = ranked[:min(budget, int(np.count_nonzero(counts)))]
    new = target[target % (2 * E) >= E] % E  # in rank order
    if not len(new):
        return _NO_TABLE
    n_evict = len(new) - int(np.count_nonzero(in_slot == -1))
    gone = _NONE
    if n_evict > 0:  # only residents outside the target leave; all of them when the target fills the
        gone = np.flatnonzero(resident & (key > target[-1]))  # budget (the usual case): no ranking needed
        if len(gone) > n_evict:  # lowest count, then least recently used, then lower id
            ek = _evict_keys(counts[gone], state.last_use(r)[gone], state.clock, gone, E)
            gone = np.partition(ek, n_evict - 1)[:n_evict] % E
    return _move_row(state, r, gone, new, -1)


def _move_row(state: PlacementState, r: int, gone: np.ndarray, new: np.ndarray, wave: int) -> np.ndarray:
    """One row: ``gone`` leave their slots, then ``new`` (in order) take the lowest-numbered
    free slots, placed now; the copies ``[n, 4]`` (row, expert, slot, ``wave``)."""
    slot_of, in_slot = state.slot_of[r], state.in_slot[r]
    in_slot[slot_of[gone]] = -1
    slot_of[gone] = -1
    fs = (in_slot == -1).nonzero()[0][:len(new)]
    slot_of[new] = fs
    in_slot[fs] = new
    state.placed[r, new] = state.clock
    table = np.empty((len(new), 4), dtype=np.int32)
    table[:, 0], table[:, 1], table[:, 2], table[:, 3] = r, new, fs, wave
    return table


def _tide_refresh(state: PlacementState, rows: np.ndarray, counts: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """Refresh ``rows`` (``counts`` ``[n, E]``, ``budgets`` ``[n]``) at once; the copies ``[m, 4]``.

    The forward's experts with non-zero count, ranked, fill up to ``B`` slots (the target);
    residents outside the target leave only to make room (lowest count, then least recently
    used, then lower id)."""
    E = counts.shape[1]
    resident = state.slot_of[rows] >= 0
    key = _rank_keys(counts, resident)
    ranked = np.sort(key, axis=1)  # the key holds count, residency and id: no gathers needed
    n_take = np.minimum(budgets, np.count_nonzero(counts, axis=1))
    new_mask = (_ids(E) < n_take[:, None]) & (ranked % (2 * E) >= E)  # target positions not resident
    n_new = new_mask.sum(axis=1)
    keep = np.flatnonzero(n_new)  # rows whose target is all resident do nothing
    if not len(keep):
        return _NO_TABLE
    rows, counts, resident, key, ranked, n_take, new_mask, n_new = (
        a[keep] for a in (rows, counts, resident, key, ranked, n_take, new_mask, n_new))
    order = ranked % E
    n_evict = n_new - (state.in_slot[rows] == -1).sum(axis=1)
    ev = np.flatnonzero(n_evict > 0)
    if not len(ev):
        return _place(state, rows, order, new_mask, n_new)
    last_in_target = ranked[ev, n_take[ev] - 1]  # n_take >= n_new > 0
    keep_out = ~resident[ev] | (key[ev] <= last_in_target[:, None])  # only residents outside the target leave
    out = _evict_keys(counts[ev], state.last_use(rows[ev]), state.clock)
    out[keep_out] = _NEVER
    out.sort(axis=1)
    er, ek = np.nonzero(_ids(E) < n_evict[ev][:, None])
    return _place(state, rows, order, new_mask, n_new, (ev[er], out[er, ek] % E))


def _setup(state: PlacementState, rows: np.ndarray, counts: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """Fill each row's ``B`` slots with its top ``B`` experts by setup count; the copies."""
    take = _ids(counts.shape[1]) < budgets[:, None]
    clock, state.clock = state.clock, 0  # setup placements predate the first forward
    copies = _place(state, rows, rank(counts), take, take.sum(axis=1))
    state.clock = clock
    return copies


def _swap(state: PlacementState, rows: np.ndarray, counts: np.ndarray, budgets: np.ndarray,
          wave_of: np.ndarray) -> np.ndarray:
    """Swap ``rows`` (``counts`` ``[n, E]``, ``budgets`` ``[n]`` >= 1) at once: each row's
    chosen experts, ranked, compute in waves of at most ``B``; before each wave its experts
    not resident are copied in, evicting the least recently used residents outside the
    wave (ties by lower id). Wave ``w`` happens at clock ``clock + w`` and marks its experts
    used then (in ``placed``: a swap row's experts are all resident when used, so its last
    use is its latest placement or wave). Fills ``wave_of`` ``[n, E]``; returns the copies
    ``[m, 4]``; leaves the clock at the last wave's."""
    E = counts.shape[1]
    ranked = rank(counts)  # [n, E] expert ids in rank order
    k = np.count_nonzero(counts, axis=1)
    pos = np.empty_like(ranked)
    np.put_along_axis(pos, ranked, _ids(E)[None, :], axis=1)  # each expert's rank position
    wave_of[:] = np.where(pos < k[:, None], pos // budgets[:, None], -1)
    n_waves = -(-k // budgets)
    c0, tables = state.clock, []
    for w in range(int(n_waves.max(initial=0))):
        a = np.flatnonzero(n_waves > w)
        state.clock = c0 + w
        r, in_wave = rows[a], wave_of[a] == w
        resident = state.slot_of[r] >= 0
        new_mask = np.take_along_axis(in_wave & ~resident, ranked[a], axis=1)  # rank order
        n_new = new_mask.sum(axis=1)
        n_evict = n_new - (state.in_slot[r] == -1).sum(axis=1)
        evict = None
        ev = np.flatnonzero(n_evict > 0)
        if len(ev):
            key = _lru_keys(state.last_use(r[ev]), _ids(E), E)
            key[~resident[ev] | in_wave[ev]] = _NEVER  # residents outside the wave may leave
            key.sort(axis=1)
            er, ek = np.nonzero(_ids(E) < n_evict[ev][:, None])
            evict = (ev[er], key[er, ek] % E)
        tables.append(_place(state, r, ranked[a], new_mask, n_new, evict, wave=w))
        wr, we = np.nonzero(in_wave)
        state.placed[r[wr], we] = state.clock
    state.clock = max(c0, state.clock)
    if not tables:
        return _NO_TABLE
    out = np.concatenate(tables)
    return out[np.argsort(out[:, 0], kind="stable")]  # by row, each row's waves in order


def _swap_row(state: PlacementState, r: int, counts: np.ndarray, budget: int, wave_of: np.ndarray) -> np.ndarray:
    """:func:`_swap` for one row (the runtime's layer as its router has chosen): the same rules
    and clocks, a few numpy calls per wave on ``[E]`` instead of many on ``[1, E]``."""
    E = counts.shape[0]
    chosen = np.flatnonzero(counts)
    order = chosen[np.argsort(chosen - counts[chosen].astype(np.int64) * E)]  # rank: count down, then lower id
    slot_of, in_slot = state.slot_of[r], state.in_slot[r]
    wave_of[:] = -1
    c0, tables = state.clock, []
    for w, start in enumerate(range(0, len(order), budget)):
        state.clock = c0 + w
        chunk = order[start:start + budget]
        wave_of[chunk] = w
        new = chunk[slot_of[chunk] < 0]
        n_evict = len(new) - int(np.count_nonzero(in_slot == -1))
        gone = _NONE
        if n_evict > 0:  # least recently used residents outside the wave, ties by lower id
            res = (slot_of >= 0).nonzero()[0]
            gone = res[wave_of[res] != w]
            if n_evict < len(gone):
                key = _lru_keys(state.last_use(r)[gone], gone, E)
                gone = gone[np.argpartition(key, n_evict - 1)[:n_evict]]
        tables.append(_move_row(state, r, gone, new, w))
        state.placed[r, chunk] = state.clock  # placed now, or used now: the row's last use either way
    state.clock = max(c0, state.clock)
    return np.concatenate(tables) if len(tables) > 1 else tables[0] if tables else _NO_TABLE


def begin_forward(policy: Policy, kind: str, step_in_block: int,
                  more: Sequence[tuple[str, int]] = ()) -> np.ndarray | None:
    """Which layers refresh at this forward (tide/plan; None for other policies): where any of
    its requests (``kind``/``step_in_block``, then a batch's others in ``more``) is at a refresh point."""
    members = [(kind, step_in_block), *more]
    for k, _ in members:
        if k not in FORWARD_KINDS:
            raise TideError(f"unknown forward kind {k!r}")
    if policy.tau is None:
        return None
    return np.logical_or.reduce([policy.refresh_mask(k, s) for k, s in members])


def layer_rows(layers: np.ndarray, group: int) -> np.ndarray:
    """The policy rows of ``layers``: ``group`` consecutive rows per layer."""
    return (np.asarray(layers)[:, None] * group + np.arange(group)).reshape(-1)


def step_layers(policy: Policy, state: PlacementState, layers: np.ndarray, counts: np.ndarray,
                refresh: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decide every row of ``layers`` for the current forward from the layers' ``counts``
    ``[n, E]``, mutating ``state``. Returns the copies ``[m, 4]`` (sorted by row), the swap
    rows decided and their ``wave_of`` ``[s, E]``. Rows are independent, so the runtime
    decides each layer as soon as its router has chosen, and the planner thousands of
    candidate rows at once: tide rows refresh first, then swap rows run their waves, and
    the layers' choices are recorded last, all at the forward's clock."""
    G = state.group
    rows = layer_rows(layers, G)
    c0 = state.clock
    tables = []
    if refresh is not None:
        pick = np.flatnonzero(refresh[rows] & (policy.budget[rows] > 0))
        if len(pick):
            tables.append(_tide_refresh(state, rows[pick], counts[pick // G], policy.budget[rows[pick]]))
    swap = np.flatnonzero(policy.kind[rows] == SWAP)
    wave_of = np.empty((len(swap), counts.shape[1]), dtype=np.int16)
    if len(swap):
        tables.append(_swap(state, rows[swap], counts[swap // G], policy.budget[rows[swap]], wave_of))
    state.chosen[layers] = np.where(counts > 0, c0, state.chosen[layers])
    copies = _NO_TABLE
    if len(tables) == 1:
        copies = tables[0]
    elif tables:
        copies = np.concatenate(tables)
        copies = copies[np.argsort(copies[:, 0], kind="stable")]
    return copies, rows[swap], wave_of


def step(policy: Policy, state: PlacementState | None, counts: np.ndarray, kind: str, step_in_block: int,
         setup_counts: np.ndarray | None = None) -> tuple[PlacementState, Decision]:
    """Decide one forward. ``counts`` is ``[L, E]`` tokens routed per MoE layer and expert.

    With ``state`` None this is the run's first forward: setup runs first, from
    ``setup_counts`` when given (a popularity trace) or else from ``counts``.
    Returns a new state; the given one is not modified.
    """
    counts = np.asarray(counts)
    L, E = counts.shape
    if L != policy.n_layers:
        raise TideError(f"counts have {L} MoE layers, policy has {policy.n_layers}")
    runner = PolicyRunner(policy, E, setup_counts=setup_counts)
    runner.state = state.copy() if state is not None else None
    decision = runner.step(counts, kind, step_in_block)
    return runner.state, decision


@dataclass
class PolicyRunner:
    """Holds the placement state between forwards (mutating it in place): what the runtime and
    the simulator drive, one forward at a time or one layer at a time.

    ``group`` > 1 runs ``group`` rows of the policy per model layer (row ``r`` sees layer
    ``r // group``'s counts): the planner's candidates, every kind, tau and B of every
    layer, in one pass over a trace."""

    policy: Policy
    experts: int
    setup_counts: np.ndarray | None = None
    group: int = 1
    state: PlacementState | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._swaps = bool(self.policy.swap_rows.any())

    def begin(self, kind: str, step_in_block: int, more: Sequence[tuple[str, int]] = ()) -> None:
        """Start a forward (``more``: a batch's other requests' kinds and steps); then call
        :meth:`layer` for every MoE layer in order, then :meth:`end`."""
        self._refresh = begin_forward(self.policy, kind, step_in_block, more)
        self._first = self.state is None
        if self._first:
            self.state = PlacementState.empty(self.policy, self.experts, self.group)
        self.state.clock += 1
        self._setup: list[np.ndarray] = []
        self._copies: list[np.ndarray] = []
        self._swap_rows: list[np.ndarray] = []
        self._wave_of: list[np.ndarray] = []

    def _decide(self, layers: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        setup = _NO_TABLE
        if self._first:
            rows = layer_rows(layers, self.group)
            src = counts if self.setup_counts is None else np.asarray(self.setup_counts)[layers]
            if self.policy.resident is not None and self.group == 1:  # a static layer's residents fixed in advance: they fill its slots
                fixed = self.policy.resident[layers]
                src = np.where(fixed.any(axis=1, keepdims=True), fixed.astype(np.int64), src)
            setup = _setup(self.state, rows, np.repeat(np.asarray(src), self.group, axis=0), self.policy.budget[rows])
        copies, swap_rows, wave_of = step_layers(self.policy, self.state, layers, counts, self._refresh)
        self._setup.append(setup)
        self._copies.append(copies)
        if len(swap_rows):
            self._swap_rows.append(swap_rows)
            self._wave_of.append(wave_of)
        return setup, copies, wave_of

    def layer(self, l: int, counts_l: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Wave] | None]:
        """Decide layer ``l`` (one row per layer): setup copies (first forward only), copies,
        and for a swap layer its waves (``[n, 2]`` each; the copies are the waves')."""
        counts_l = np.asarray(counts_l)
        if self.group == 1 and not self._first:  # the runtime's hot path: one row
            copies, waves, c0 = _NO_TABLE, None, self.state.clock
            if self.policy.kind[l] == SWAP:
                wave_of = np.empty(len(counts_l), dtype=np.int16)
                copies = _swap_row(self.state, l, counts_l, int(self.policy.budget[l]), wave_of)
                self._swap_rows.append(np.array([l]))
                self._wave_of.append(wave_of[None, :])
                waves = _waves_of(copies, wave_of)
            elif self._refresh is not None and self._refresh[l] and self.policy.budget[l] > 0:
                copies = _tide_refresh_row(self.state, l, counts_l, int(self.policy.budget[l]))
            self.state.chosen[l, counts_l > 0] = c0
            self._copies.append(copies)
            return _NO_TABLE[:, 1:3], copies[:, 1:3], waves
        setup, copies, wave_of = self._decide(np.array([l]), counts_l[None, :])
        waves = _waves_of(copies, wave_of[0]) if self.policy.kind[l] == SWAP else None
        return setup[:, 1:3], copies[:, 1:3], waves

    def end(self) -> Decision:
        cat = lambda ts: np.concatenate(ts) if ts else _NO_TABLE  # noqa: E731
        refreshed = None if self._refresh is None else self._refresh & (self.policy.budget > 0)
        swap = wave_of = None
        if self._swaps:
            swap = np.zeros(self.policy.n_layers, dtype=bool)
            swap[np.concatenate(self._swap_rows)] = True
            wave_of = np.concatenate(self._wave_of)
        return Decision(resident=self.state.slot_of >= 0, setup_table=cat(self._setup), copy_table=cat(self._copies),
                        swap=swap, wave_of=wave_of, refreshed=refreshed)

    def step(self, counts: np.ndarray, kind: str, step_in_block: int,
             more: Sequence[tuple[str, int]] = ()) -> Decision:
        """One whole forward: ``counts`` is ``[L, E]``; every row of every layer at once
        (``more``: a batch's other requests, as in :meth:`begin`)."""
        counts = np.asarray(counts)
        self.begin(kind, step_in_block, more)
        self._decide(np.arange(len(counts)), counts)
        return self.end()
