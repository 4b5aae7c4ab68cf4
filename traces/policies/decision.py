"""What a placement decision holds: the per-row placement state and, per forward and layer,
the residents, copies, swap waves and which rows swap."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from traces.common.errors import TideError
from traces.policies.spec import Policy


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
NO_TABLE = np.zeros((0, 4), dtype=np.int32)
NEVER = np.iinfo(np.int64).max  # an eviction key that never leaves
NONE = np.zeros(0, dtype=np.int64)  # no expert


def _per_row_tables(table: np.ndarray, n_rows: int) -> list[np.ndarray]:
    """Split a ``[n, 4]`` copy table, sorted by row, into per-row tables."""
    cuts = np.cumsum(np.bincount(table[:, 0], minlength=n_rows))[:-1] if len(table) else np.zeros(n_rows - 1, int)
    return np.split(table, cuts) if n_rows else []


def _per_row(table: np.ndarray, n_rows: int) -> list[np.ndarray]:
    """Per-row ``[m, 2]`` (expert, slot) of a copy table."""
    return [c[:, 1:3] for c in _per_row_tables(table, n_rows)]


def waves_of(table: np.ndarray, wave_of: np.ndarray) -> list[Wave]:
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
                out[r] = waves_of(per_row[r], self.wave_of[i])
        return out

    def fresh(self) -> np.ndarray:
        """[rows, E] experts copied in during this forward (their hits wait for the copy)."""
        out = np.zeros(self.resident.shape, dtype=bool)
        out[self.copy_table[:, 0], self.copy_table[:, 1]] = True
        return out
