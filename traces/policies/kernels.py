"""The decision kernels: the single implementation of every expert-placement decision.

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

import numpy as np

from traces.policies.decision import NEVER, NO_TABLE, NONE, PlacementState
from traces.policies.spec import STATIC, Policy


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
        return NO_TABLE
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


def tide_refresh_row(state: PlacementState, r: int, counts: np.ndarray, budget: int) -> np.ndarray:
    """:func:`tide_refresh` for one row (the runtime's layer as its router has chosen): the
    same keys and rules, a few numpy calls on ``[E]`` instead of many on ``[1, E]``."""
    E = counts.shape[0]
    slot_of, in_slot = state.slot_of[r], state.in_slot[r]
    resident = slot_of >= 0
    key = _rank_keys(counts, resident)
    ranked = np.sort(key)
    target = ranked[:min(budget, int(np.count_nonzero(counts)))]
    new = target[target % (2 * E) >= E] % E  # in rank order
    if not len(new):
        return NO_TABLE
    n_evict = len(new) - int(np.count_nonzero(in_slot == -1))
    gone = NONE
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


def tide_refresh(state: PlacementState, rows: np.ndarray, counts: np.ndarray, budgets: np.ndarray) -> np.ndarray:
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
        return NO_TABLE
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
    out[keep_out] = NEVER
    out.sort(axis=1)
    er, ek = np.nonzero(_ids(E) < n_evict[ev][:, None])
    return _place(state, rows, order, new_mask, n_new, (ev[er], out[er, ek] % E))


def setup_rows(state: PlacementState, rows: np.ndarray, counts: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """Fill each row's ``B`` slots with its top ``B`` experts by setup count; the copies."""
    take = _ids(counts.shape[1]) < budgets[:, None]
    clock, state.clock = state.clock, 0  # setup placements predate the first forward
    copies = _place(state, rows, rank(counts), take, take.sum(axis=1))
    state.clock = clock
    return copies


def swap_rows(state: PlacementState, rows: np.ndarray, counts: np.ndarray, budgets: np.ndarray,
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
            key[~resident[ev] | in_wave[ev]] = NEVER  # residents outside the wave may leave
            key.sort(axis=1)
            er, ek = np.nonzero(_ids(E) < n_evict[ev][:, None])
            evict = (ev[er], key[er, ek] % E)
        tables.append(_place(state, r, ranked[a], new_mask, n_new, evict, wave=w))
        wr, we = np.nonzero(in_wave)
        state.placed[r[wr], we] = state.clock
    state.clock = max(c0, state.clock)
    if not tables:
        return NO_TABLE
    out = np.concatenate(tables)
    return out[np.argsort(out[:, 0], kind="stable")]  # by row, each row's waves in order


def swap_row(state: PlacementState, r: int, counts: np.ndarray, budget: int, wave_of: np.ndarray) -> np.ndarray:
    """:func:`swap` for one row (the runtime's layer as its router has chosen): the same rules
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
        gone = NONE
        if n_evict > 0:  # least recently used residents outside the wave, ties by lower id
            res = (slot_of >= 0).nonzero()[0]
            gone = res[wave_of[res] != w]
            if n_evict < len(gone):
                key = _lru_keys(state.last_use(r)[gone], gone, E)
                gone = gone[np.argpartition(key, n_evict - 1)[:n_evict]]
        tables.append(_move_row(state, r, gone, new, w))
        state.placed[r, chunk] = state.clock  # placed now, or used now: the row's last use either way
    state.clock = max(c0, state.clock)
    return np.concatenate(tables) if len(tables) > 1 else tables[0] if tables else NO_TABLE
