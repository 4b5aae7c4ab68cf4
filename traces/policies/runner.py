"""Running a policy forward by forward: which layers refresh, each layer's decision as the
runtime routes it (:class:`PolicyRunner`) or a whole forward at once (:func:`step`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from traces.common.errors import TideError
from traces.formats.vocabulary import FORWARD_KINDS
from traces.policies.decision import (
    NO_TABLE,
    Decision,
    PlacementState,
    Wave,
    waves_of,
)
from traces.policies.kernels import (
    setup_rows,
    swap_row,
    swap_rows,
    tide_refresh,
    tide_refresh_row,
)
from traces.policies.spec import SWAP, Policy


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
            tables.append(tide_refresh(state, rows[pick], counts[pick // G], policy.budget[rows[pick]]))
    swap = np.flatnonzero(policy.kind[rows] == SWAP)
    wave_of = np.empty((len(swap), counts.shape[1]), dtype=np.int16)
    if len(swap):
        tables.append(swap_rows(state, rows[swap], counts[swap // G], policy.budget[rows[swap]], wave_of))
    state.chosen[layers] = np.where(counts > 0, c0, state.chosen[layers])
    copies = NO_TABLE
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
        setup = NO_TABLE
        if self._first:
            rows = layer_rows(layers, self.group)
            src = counts if self.setup_counts is None else np.asarray(self.setup_counts)[layers]
            if self.policy.resident is not None and self.group == 1:  # a static layer's residents fixed in advance: they fill its slots
                fixed = self.policy.resident[layers]
                src = np.where(fixed.any(axis=1, keepdims=True), fixed.astype(np.int64), src)
            setup = setup_rows(self.state, rows, np.repeat(np.asarray(src), self.group, axis=0), self.policy.budget[rows])
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
            copies, waves, c0 = NO_TABLE, None, self.state.clock
            if self.policy.kind[l] == SWAP:
                wave_of = np.empty(len(counts_l), dtype=np.int16)
                copies = swap_row(self.state, l, counts_l, int(self.policy.budget[l]), wave_of)
                self._swap_rows.append(np.array([l]))
                self._wave_of.append(wave_of[None, :])
                waves = waves_of(copies, wave_of)
            elif self._refresh is not None and self._refresh[l] and self.policy.budget[l] > 0:
                copies = tide_refresh_row(self.state, l, counts_l, int(self.policy.budget[l]))
            self.state.chosen[l, counts_l > 0] = c0
            self._copies.append(copies)
            return NO_TABLE[:, 1:3], copies[:, 1:3], waves
        setup, copies, wave_of = self._decide(np.array([l]), counts_l[None, :])
        waves = waves_of(copies, wave_of[0]) if self.policy.kind[l] == SWAP else None
        return setup[:, 1:3], copies[:, 1:3], waves

    def end(self) -> Decision:
        cat = lambda ts: np.concatenate(ts) if ts else NO_TABLE  # noqa: E731
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
