"""The planner's program on hand-made candidate tables, checked against brute force."""
import itertools

import numpy as np
import pytest

from sim.candidates import Candidates
from sim.plan_program import CandidateTable, allowed_candidates, solve
from traces.common.errors import TideError
from traces.formats.vocabulary import KINDS


def table(seconds, cands=None, limit=1e9, expert=1.0, fixed=0.0, host_limit=float("inf"), experts=16):
    """A hand-made table; the host keeps what :func:`traces.costs.memory.host_experts` says of
    each candidate for a model of ``experts`` experts per layer."""
    from traces.costs.memory import host_experts
    from traces.formats.shapes import ModelShape
    cands = cands or Candidates.grid([1, 2], [0, 8, 16])  # cpu, static x2, swap x2, tide x4
    seconds = np.asarray(seconds, dtype=float)
    shape = ModelShape.named("llada2-mini").replace(num_experts=experts)
    return CandidateTable(layers=list(range(1, seconds.shape[0] + 1)), cands=cands, seconds=seconds,
                          expert_bytes=expert, fixed_bytes=fixed, mem_limit=limit,
                          host_experts=host_experts(shape, [KINDS[k] for k in cands.kind], cands.budget),
                          host_limit=host_limit)


def brute(t: CandidateTable, uniform=False, kinds=None):
    L, C = t.seconds.shape
    ok = np.flatnonzero(allowed_candidates(t.cands, kinds, uniform))
    best = None
    choices = [[c] * L for c in ok] if uniform else itertools.product(ok, repeat=L)
    for combo in choices:
        if t.fixed_bytes + t.expert_bytes * sum(t.cands.budget[c] for c in combo) > t.mem_limit:
            continue
        if t.expert_bytes * sum(t.host[c] for c in combo) > t.host_limit:
            continue
        v = sum(t.seconds[l, c] for l, c in enumerate(combo))
        if best is None or v < best:
            best = v
    return best


def test_ample_memory_takes_each_layers_best():
    rng = np.random.default_rng(0)
    s = rng.uniform(1, 2, size=(4, 9))
    sol = solve(table(s))
    assert sol.seconds == pytest.approx(s.min(axis=1).sum())


@pytest.mark.parametrize("seed", range(6))
def test_every_kind_under_a_memory_limit_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    t0 = table(np.zeros((3, 9)))
    b = t0.cands.budget
    s = rng.uniform(1, 3, size=(3, 9)) + np.where(b == 0, 2.0, 0.0) - np.where(b == 16, 0.5, 0.0)
    t = table(s, limit=24.0)  # at most 24 slots in all: not every layer gets 16
    sol = solve(t)
    assert sol.seconds == pytest.approx(brute(t))
    assert sum(sol.budget) <= 24
    for c, (k, tau, bud) in enumerate(zip(sol.kind, sol.tau, sol.budget)):  # the solution names real candidates
        idx = t.cands.find(k, bud, tau)
        assert s[c, idx] == pytest.approx(min(s[c, j] for j in range(9) if t.cands.budget[j] == bud
                                              and KINDS[t.cands.kind[j]] == k and t.cands.tau[j] == tau))
    uni = solve(t, uniform=True, kinds=KINDS)
    assert uni.seconds == pytest.approx(brute(t, uniform=True, kinds=KINDS))
    assert len(set(zip(uni.kind, uni.tau, uni.budget))) == 1
    assert sol.seconds <= uni.seconds + 1e-9  # the per-layer plan never loses to a uniform setting
    paper = solve(t, uniform=True)  # tide only (and cpu, tide's budget 0)
    assert set(paper.kind) <= {"tide", "cpu"} and paper.seconds == pytest.approx(brute(t, uniform=True))
    for kinds in (["swap"], ["static", "cpu"], ["tide"]):
        sub = solve(t, kinds=kinds)
        assert set(sub.kind) <= set(kinds) | ({"cpu"} if "tide" in kinds else set())
        assert sub.seconds == pytest.approx(brute(t, kinds=kinds))


def test_a_limit_that_no_candidate_fits_is_refused():
    c = Candidates.grid([1], [8, 16], kinds=["tide", "swap"])
    with pytest.raises(TideError, match="no plan fits"):  # 3 layers x 8 experts at least, 2.5 experts' bytes
        solve(table(np.ones((3, len(c))), cands=c, limit=2.5, expert=1.0), kinds=["swap"])
    assert solve(table(np.ones((3, 9)), limit=2.5, expert=1.0)).kind == ["cpu"] * 3  # nothing on the GPU
    with pytest.raises(TideError, match="no plan that fits both the GPU and the host"):  # static at 16 keeps
        solve(table(np.ones((3, 9)), host_limit=7.0, limit=0.5))  # none on the host, but no slot fits the GPU
    with pytest.raises(TideError, match="no plan fits in host memory"):
        c = Candidates.grid([1], [0, 8], kinds=["tide"])  # tide at 8 of 16 and cpu keep all 16 there
        solve(table(np.ones((3, len(c))), cands=c, host_limit=7.0), kinds=["tide"])


@pytest.mark.parametrize("seed", range(4))
def test_the_host_holds_only_the_experts_a_layer_can_miss(seed):
    """Host memory holds every expert of a tide, swap or cpu layer, a static layer's
    non-resident ones, none of a layer wholly on the GPU: with little host memory the
    program must choose static (or every expert on the GPU) for some layers, and it matches
    brute force."""
    rng = np.random.default_rng(seed)
    t0 = table(np.zeros((3, 9)))
    b, k = t0.cands.budget, t0.cands.kind
    s = rng.uniform(1, 3, size=(3, 9)) + np.where(k == KINDS.index("static"), 1.0, 0.0)  # static is slowest
    t = table(s, limit=24.0, host_limit=24.0)  # 24 slots: one layer at 16 at most; the other two cannot keep 32
    sol = solve(t)
    assert sol.seconds == pytest.approx(brute(t))
    held = sum(0 if bud >= 16 else (16 - bud if kind == "static" else 16) for kind, bud in zip(sol.kind, sol.budget))
    assert held <= 24 and "static" in sol.kind
    free = solve(table(s, limit=24.0))  # no host limit: static, the slowest, is not chosen
    assert "static" not in free.kind and free.seconds < sol.seconds
    with pytest.raises(TideError, match="--kinds: unknown kind"):
        solve(table(np.ones((3, 9))), kinds=["lru"])
