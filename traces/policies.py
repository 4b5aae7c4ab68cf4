"""Placement policies: the single implementation of every expert-placement decision.

The runtime executes these decisions and the simulator replays them, so both make the
same choices. Each policy is a pure function of token counts: ``setup`` fills the
resident set from the setup counts (the first forward's, or a popularity trace's), and
``step`` takes the state and one forward's per-layer, per-expert token counts and returns
the new state and what to copy where and what runs where.

Rules (ranking is always by count, ties by lower expert id):

* setup fills each MoE layer's ``B`` slots with the top ``B`` experts by setup count;
  those copies are ``setup_migrations``. Every later copy is a ``migration``.
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
* ``plan``: ``tide`` with a per-layer ``tau`` and ``B``.

Free slots are filled lowest index first, then the slots of evicted experts in eviction
order, so slot numbers (which the runtime uses to index its stacked weights) are part of
the decision too.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from traces.errors import TideError

POLICIES: tuple[str, ...] = ("all", "cpu", "static", "swap", "tide", "plan")
FORWARD_KINDS: tuple[str, ...] = ("prefill", "step", "commit")


@dataclass(frozen=True)
class Policy:
    """A placement policy with its per-MoE-layer budgets (and refresh intervals for tide/plan)."""

    name: str
    budget: np.ndarray  # [L] int: expert slots per MoE layer on the fast device
    tau: np.ndarray | None = None  # [L] int, tide and plan only

    @classmethod
    def make(cls, name: str, n_layers: int, experts: int, budget: int | Sequence[int] | None = None,
             tau: int | Sequence[int] | None = None) -> "Policy":
        """Validate and build; bad values are a TideError naming the flag."""
        if name not in POLICIES:
            raise TideError(f"--policy: unknown policy {name!r} (expected one of {', '.join(POLICIES)})")
        if name == "all":
            b = np.full(n_layers, experts)
        elif name == "cpu":
            b = np.zeros(n_layers, dtype=np.int64)
        else:
            if budget is None:
                raise TideError(f"--gpu-experts: policy {name} needs a budget of GPU experts per layer")
            b = np.broadcast_to(np.asarray(budget, dtype=np.int64), (n_layers,)).copy()
            if b.shape != (n_layers,):
                raise TideError(f"--gpu-experts: expected {n_layers} per-layer budgets, got {len(b)}")
            if (b < 0).any() or (b > experts).any():
                raise TideError(f"--gpu-experts: budgets must lie in 0..{experts}, got {b.min()}..{b.max()}")
            if name == "swap" and (b < 1).any():
                raise TideError("--gpu-experts: swap needs at least one GPU expert per layer")
        t = None
        if name in ("tide", "plan"):
            if tau is None:
                if name == "plan":
                    raise TideError("--plan: plan policy needs per-layer tau")
                tau = 1
            t = np.broadcast_to(np.asarray(tau, dtype=np.int64), (n_layers,)).copy()
            if (t < 1).any():
                raise TideError(f"--tau: tau must be at least 1, got {t.min()}")
        return cls(name=name, budget=b.astype(np.int64), tau=t)

    @property
    def n_layers(self) -> int:
        return len(self.budget)

    def refresh_mask(self, kind: str, step: int) -> np.ndarray:
        """Which layers refresh at this forward (tide/plan); all False for other policies."""
        if self.tau is None or kind == "commit":
            return np.zeros(self.n_layers, dtype=bool)
        if kind == "prefill" or step == 0:
            return np.ones(self.n_layers, dtype=bool)
        return (step % self.tau) == 0


@dataclass
class PlacementState:
    """Per MoE layer: which experts are resident, in which slot, and when last used."""

    slot_of: np.ndarray  # [L, E] int32, -1 when not resident
    in_slot: np.ndarray  # [L, Bmax] int32, -1 when empty, -2 past the layer's budget
    last_use: np.ndarray  # [L, E] int64, -1 never
    clock: int = 0
    setup_done: bool = False

    @classmethod
    def empty(cls, policy: Policy, experts: int) -> "PlacementState":
        L = policy.n_layers
        bmax = int(policy.budget.max()) if L else 0
        in_slot = np.full((L, bmax), -1, np.int32)
        in_slot[np.arange(bmax)[None, :] >= policy.budget[:, None]] = -2  # beyond this layer's budget
        return cls(slot_of=np.full((L, experts), -1, np.int32), in_slot=in_slot,
                   last_use=np.full((L, experts), -1, np.int64))

    @property
    def resident(self) -> np.ndarray:
        return self.slot_of >= 0

    def copy(self) -> "PlacementState":
        return replace(self, slot_of=self.slot_of.copy(), in_slot=self.in_slot.copy(), last_use=self.last_use.copy())


@dataclass
class Wave:
    """Copies to make (``[n, 2]`` of expert, slot, in order), then experts computed on the fast device."""

    copies: np.ndarray
    gpu_experts: np.ndarray


@dataclass
class Decision:
    """What one forward does per MoE layer.

    ``resident`` is the placement the forward computes on. For every policy but ``swap``,
    chosen resident experts run on the fast device and chosen non-resident ones on the CPU,
    after ``copies[l]``; for ``swap`` each layer runs ``waves[l]`` in order and nothing runs
    on the CPU.
    """

    resident: np.ndarray  # [L, E] bool
    setup_copies: list[np.ndarray]  # per layer [n, 2] (expert, slot)
    copies: list[np.ndarray]  # per layer [n, 2] (expert, slot), after setup
    waves: list[list[Wave]] | None = None
    refreshed: np.ndarray | None = None  # [L] bool, tide/plan

    @property
    def migrations(self) -> np.ndarray:
        return np.array([len(c) for c in self.copies], dtype=np.int64)

    @property
    def setup_migrations(self) -> np.ndarray:
        return np.array([len(c) for c in self.setup_copies], dtype=np.int64)


_NO_COPIES = np.zeros((0, 2), dtype=np.int32)


def rank(counts: np.ndarray, resident: np.ndarray | None = None) -> np.ndarray:
    """Expert ids by count descending, then (if given) resident first, then lower id."""
    ids = np.arange(len(counts))
    if resident is None:
        return np.lexsort((ids, -counts))
    return np.lexsort((ids, ~resident, -counts))


def _place(slot_of: np.ndarray, in_slot: np.ndarray, new: np.ndarray, evict: np.ndarray) -> np.ndarray:
    """Evict ``evict`` then put ``new`` into free slots (lowest first) then evicted slots, in order.

    Mutates the layer's rows; returns the ``[n, 2]`` copies (expert, slot).
    """
    if len(new) == 0:
        return _NO_COPIES
    free = np.flatnonzero(in_slot == -1)
    freed = slot_of[evict]
    slot_of[evict] = -1
    slots = np.concatenate([free, freed])[: len(new)]
    if len(slots) < len(new):  # defensive: the callers guarantee room
        raise AssertionError("placement has no room")
    in_slot[slots] = new
    slot_of[new] = slots
    return np.stack([new, slots], axis=1).astype(np.int32)


def _tide_refresh(state: PlacementState, l: int, counts: np.ndarray, b: int) -> np.ndarray:
    slot_of, in_slot, last_use = state.slot_of[l], state.in_slot[l], state.last_use[l]
    resident = slot_of >= 0
    order = rank(counts, resident)
    order = order[counts[order] > 0][:b]
    target = np.zeros(len(counts), dtype=bool)
    target[order] = True
    new = order[~resident[order]]
    n_free = int((in_slot == -1).sum())
    n_evict = max(0, len(new) - n_free)
    evict = np.zeros(0, dtype=np.int64)
    if n_evict:
        cand = np.flatnonzero(resident & ~target)
        ev_order = np.lexsort((cand, last_use[cand], counts[cand]))
        evict = cand[ev_order[:n_evict]]
    return _place(slot_of, in_slot, new.astype(np.int32), evict)


def _swap_layer(state: PlacementState, l: int, counts: np.ndarray, b: int) -> tuple[list[Wave], list[np.ndarray]]:
    slot_of, in_slot, last_use = state.slot_of[l], state.in_slot[l], state.last_use[l]
    chosen = rank(counts)
    chosen = chosen[counts[chosen] > 0]
    waves, all_copies = [], []
    for start in range(0, len(chosen), b):
        if start:
            state.clock += 1
        chunk = chosen[start:start + b].astype(np.int32)
        in_chunk = np.zeros(len(counts), dtype=bool)
        in_chunk[chunk] = True
        new = chunk[slot_of[chunk] < 0]
        n_evict = max(0, len(new) - int((in_slot == -1).sum()))
        evict = np.zeros(0, dtype=np.int64)
        if n_evict:
            cand = np.flatnonzero((slot_of >= 0) & ~in_chunk)
            evict = cand[np.lexsort((cand, last_use[cand]))[:n_evict]]
        copies = _place(slot_of, in_slot, new, evict)
        last_use[chunk] = state.clock
        waves.append(Wave(copies=copies, gpu_experts=chunk))
        all_copies.append(copies)
    return waves, all_copies


def begin_forward(policy: Policy, kind: str, step_in_block: int) -> np.ndarray | None:
    """Which layers refresh at this forward (tide/plan; None for other policies)."""
    if kind not in FORWARD_KINDS:
        raise TideError(f"unknown forward kind {kind!r}")
    return policy.refresh_mask(kind, step_in_block) if policy.tau is not None else None


def step_layer(policy: Policy, state: PlacementState, l: int, counts_l: np.ndarray,
               refresh: np.ndarray | None) -> tuple[np.ndarray, list[Wave] | None]:
    """Decide one MoE layer of the current forward, mutating ``state``'s row ``l``.

    Returns the copies ``[n, 2]`` (expert, slot) and, for swap, the waves. Layers are
    independent, so the runtime can decide each layer as soon as its router has chosen.
    """
    waves = None
    copies = _NO_COPIES
    if policy.name == "swap":
        waves, c = _swap_layer(state, l, counts_l, int(policy.budget[l]))
        copies = np.concatenate(c) if c else _NO_COPIES
    else:
        if refresh is not None and refresh[l] and policy.budget[l] > 0:
            copies = _tide_refresh(state, l, counts_l, int(policy.budget[l]))
        used = (counts_l > 0) & (state.slot_of[l] >= 0)
        state.last_use[l, used] = state.clock
    return copies, waves


def setup_layer(policy: Policy, state: PlacementState, l: int, setup_counts_l: np.ndarray) -> np.ndarray:
    """Fill layer ``l``'s ``B`` slots with its top ``B`` experts by setup count; the copies."""
    top = rank(np.asarray(setup_counts_l))[: int(policy.budget[l])].astype(np.int32)
    copies = _place(state.slot_of[l], state.in_slot[l], top, np.zeros(0, np.int64))
    state.last_use[l, top] = 0
    return copies


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
    the simulator drive, one forward at a time or one layer at a time."""

    policy: Policy
    experts: int
    setup_counts: np.ndarray | None = None
    state: PlacementState | None = field(default=None, init=False)

    def begin(self, kind: str, step_in_block: int) -> None:
        """Start a forward; then call :meth:`layer` for every MoE layer in order, then :meth:`end`."""
        self._refresh = begin_forward(self.policy, kind, step_in_block)
        self._first = self.state is None
        if self._first:
            self.state = PlacementState.empty(self.policy, self.experts)
        self.state.clock += 1
        L = self.policy.n_layers
        self._setup: list[np.ndarray] = [_NO_COPIES] * L
        self._copies: list[np.ndarray] = [_NO_COPIES] * L
        self._waves: list[list[Wave]] | None = [[] for _ in range(L)] if self.policy.name == "swap" else None

    def layer(self, l: int, counts_l: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Wave] | None]:
        """Decide layer ``l``: setup copies (first forward only), copies, swap waves."""
        counts_l = np.asarray(counts_l)
        if self._first:
            src = counts_l if self.setup_counts is None else np.asarray(self.setup_counts[l])
            self._setup[l] = setup_layer(self.policy, self.state, l, src)
        copies, waves = step_layer(self.policy, self.state, l, counts_l, self._refresh)
        self._copies[l] = copies
        if self._waves is not None:
            self._waves[l] = waves
        return self._setup[l], copies, waves

    def end(self) -> Decision:
        if self._first:
            self.state.setup_done = True
        return Decision(resident=self.state.slot_of >= 0, setup_copies=self._setup, copies=self._copies,
                        waves=self._waves, refreshed=self._refresh)

    def step(self, counts: np.ndarray, kind: str, step_in_block: int) -> Decision:
        """One whole forward: ``counts`` is ``[L, E]``."""
        counts = np.asarray(counts)
        self.begin(kind, step_in_block)
        for l in range(self.policy.n_layers):
            self.layer(l, counts[l])
        return self.end()
