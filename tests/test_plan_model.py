"""The planner's program on hand-made candidate tables, checked against brute force."""
import itertools

import numpy as np
import pytest

from sim.plan_model import CandidateTable, solve
from traces.errors import TideError


def table(seconds, budgets=(0, 8, 16), taus=(1, 2, 4), limit=1e9, expert=1.0, fixed=0.0):
    seconds = np.asarray(seconds, dtype=float)
    return CandidateTable(layers=list(range(1, seconds.shape[0] + 1)), taus=list(taus), budgets=list(budgets),
                          seconds=seconds, expert_bytes=expert, fixed_bytes=fixed, mem_limit=limit)


def brute(t: CandidateTable, uniform=False):
    L, T, B = t.seconds.shape
    cands = [(ti, bi) for ti in range(T) for bi in range(B)]
    best = None
    choices = [[c] * L for c in cands] if uniform else itertools.product(cands, repeat=L)
    for combo in choices:
        mem = t.fixed_bytes + t.expert_bytes * sum(t.budgets[b] for _, b in combo)
        if mem > t.mem_limit:
            continue
        v = sum(t.seconds[l, ti, bi] for l, (ti, bi) in enumerate(combo))
        if best is None or v < best:
            best = v
    return best


def test_ample_memory_takes_each_layers_best():
    rng = np.random.default_rng(0)
    s = rng.uniform(1, 2, size=(4, 3, 3))
    sol = solve(table(s))
    assert sol.seconds == pytest.approx(s.min(axis=(1, 2)).sum())


@pytest.mark.parametrize("seed", range(4))
def test_memory_trade_off_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    s = rng.uniform(1, 3, size=(3, 3, 3))
    s[:, :, 0] += 2  # no slots: slow; more slots faster
    s[:, :, 2] -= 0.5
    t = table(s, limit=24.0)  # at most 24 slots in all: not every layer gets 16
    sol = solve(t)
    assert sol.seconds == pytest.approx(brute(t))
    assert sum(sol.budget) <= 24
    uni = solve(t, uniform=True)
    assert uni.seconds == pytest.approx(brute(t, uniform=True))
    assert len(set(zip(uni.tau, uni.budget))) == 1
    assert sol.seconds <= uni.seconds + 1e-9


def test_a_limit_that_no_candidate_fits_is_refused():
    with pytest.raises(TideError, match="no plan fits"):  # 3 layers x 8 experts at least, 2.5 experts' bytes
        solve(table(np.ones((3, 3, 2)), budgets=(8, 16), limit=2.5, expert=1.0))
    assert solve(table(np.ones((3, 3, 3)), limit=2.5, expert=1.0)).budget == [0, 0, 0]  # B = 0: all on the CPU
