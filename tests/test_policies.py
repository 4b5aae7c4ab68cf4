"""Policy semantics on hand-made count sequences: every rule, tie-breaks included."""
import numpy as np
import pytest

from traces.common.errors import TideError
from traces.policies.counters import forward_counters
from traces.policies.runner import PolicyRunner, step
from traces.policies.spec import Policy

E = 8


def c(**kw) -> np.ndarray:
    """One layer's counts from e0=.., e5=.. keywords, as a [1, E] array."""
    a = np.zeros((1, E), dtype=np.int64)
    for k, v in kw.items():
        a[0, int(k[1:])] = v
    return a


def resident_set(decision, layer=0) -> set[int]:
    return set(np.flatnonzero(decision.resident[layer]).tolist())


def gpu_cpu(decision, counts):
    f = forward_counters(decision, counts, expert_bytes=100, act_bytes_per_token=10)
    return int(f["gpu_tokens"][0]), int(f["cpu_tokens"][0])


def test_setup_fills_top_b_by_count_ties_lower_id():
    counts = c(e1=3, e2=3, e3=1, e5=5)
    for b, expect in [(3, [5, 1, 2]), (4, [5, 1, 2, 3]), (5, [5, 1, 2, 3, 0])]:
        r = PolicyRunner(Policy.make("static", 1, E, budget=b), E)
        d = r.step(counts, "prefill", 0)
        assert d.setup_copies[0][:, 0].tolist() == expect  # rank order
        assert d.setup_copies[0][:, 1].tolist() == list(range(b))  # slots filled from 0
        assert d.setup_migrations.tolist() == [b] and d.migrations.tolist() == [0]


def test_popularity_replaces_first_forward_counts_for_setup():
    pop = c(e6=10, e7=9)
    r = PolicyRunner(Policy.make("static", 1, E, budget=2), E, setup_counts=pop)
    d = r.step(c(e0=4, e1=4), "prefill", 0)
    assert resident_set(d) == {6, 7}
    assert gpu_cpu(d, c(e0=4, e1=4)) == (0, 8)


def test_all_and_cpu():
    counts = c(e0=3, e4=5)
    d = PolicyRunner(Policy.make("all", 1, E), E).step(counts, "prefill", 0)
    assert resident_set(d) == set(range(E)) and d.setup_migrations[0] == E
    assert gpu_cpu(d, counts) == (8, 0)
    r = PolicyRunner(Policy.make("cpu", 1, E), E)
    for kind in ("prefill", "step", "commit"):
        d = r.step(counts, kind, 0)
        assert resident_set(d) == set() and d.setup_migrations[0] == 0 and d.migrations[0] == 0
        assert gpu_cpu(d, counts) == (0, 8)


def test_static_never_changes():
    r = PolicyRunner(Policy.make("static", 1, E, budget=2), E)
    r.step(c(e0=2, e1=1), "prefill", 0)
    for s in range(5):
        counts = c(e5=3, e6=2, e0=1)
        d = r.step(counts, "step", s)
        assert resident_set(d) == {0, 1} and d.migrations[0] == 0
        assert gpu_cpu(d, counts) == (1, 5)


def test_swap_copies_missing_experts_evicting_lru():
    r = PolicyRunner(Policy.make("swap", 1, E, budget=2), E)
    d = r.step(c(e0=3, e1=2), "prefill", 0)
    assert resident_set(d) == {0, 1} and d.migrations[0] == 0
    # e1 used again at forward 2; e0 not: e0 is least recently used
    d = r.step(c(e1=1), "step", 0)
    assert d.migrations[0] == 0
    d = r.step(c(e4=2, e1=1), "step", 1)
    assert resident_set(d) == {1, 4}
    assert d.copies[0].tolist() == [[4, 0]]  # e4 into e0's slot
    assert gpu_cpu(d, c(e4=2, e1=1)) == (3, 0)


def test_swap_lru_ties_by_lower_id():
    r = PolicyRunner(Policy.make("swap", 1, E, budget=2), E)
    r.step(c(e2=1, e3=1), "prefill", 0)  # both used at the same time
    d = r.step(c(e5=1), "step", 0)
    assert resident_set(d) == {3, 5}  # e2 (lower id) evicted
    assert d.copies[0].tolist() == [[5, 0]]


def test_swap_runs_in_waves_when_a_layer_needs_more_than_b():
    r = PolicyRunner(Policy.make("swap", 1, E, budget=2), E)
    r.step(c(e0=1, e1=1), "prefill", 0)
    counts = c(e2=5, e3=4, e4=3, e5=2, e0=1)
    d = r.step(counts, "step", 0)
    waves = d.waves[0]
    assert [w.gpu_experts.tolist() for w in waves] == [[2, 3], [4, 5], [0]]
    assert [w.copies[:, 0].tolist() for w in waves] == [[2, 3], [4, 5], [0]]
    assert d.migrations[0] == 5
    assert gpu_cpu(d, counts) == (15, 0)
    assert resident_set(d) == {0, 5}  # last wave plus the most recent of the previous wave


def test_swap_needs_a_slot():
    with pytest.raises(TideError, match="swap needs"):
        Policy.make("swap", 1, E, budget=0)


def test_tide_refresh_points():
    p = Policy.make("tide", 2, E, budget=2, tau=3)
    assert p.refresh_mask("prefill", 0).all()
    assert p.refresh_mask("step", 0).all()
    assert not p.refresh_mask("step", 1).any() and not p.refresh_mask("step", 2).any()
    assert p.refresh_mask("step", 3).all() and p.refresh_mask("step", 6).all()
    assert not p.refresh_mask("commit", 0).any()
    plan = Policy.make("plan", 2, E, budget=[2, 2], tau=[1, 4])
    assert plan.refresh_mask("step", 2).tolist() == [True, False]
    assert plan.refresh_mask("step", 4).tolist() == [True, True]


def test_tide_freezes_between_refreshes_and_runs_misses_on_cpu():
    r = PolicyRunner(Policy.make("tide", 1, E, budget=2, tau=2), E)
    r.step(c(e0=3, e1=2), "prefill", 0)
    counts = c(e5=4, e0=1)
    d = r.step(counts, "step", 1)  # step 1: no refresh at tau 2
    assert resident_set(d) == {0, 1} and d.migrations[0] == 0
    assert gpu_cpu(d, counts) == (1, 4)
    d = r.step(counts, "commit", 0)  # commit never refreshes
    assert resident_set(d) == {0, 1} and d.migrations[0] == 0
    d = r.step(counts, "step", 2)  # refresh: runs on the new placement
    assert resident_set(d) == {0, 5} and d.migrations[0] == 1
    assert d.copies[0].tolist() == [[5, 1]]
    assert gpu_cpu(d, counts) == (5, 0)


def test_tide_ranking_ties_prefer_resident_then_lower_id():
    r = PolicyRunner(Policy.make("tide", 1, E, budget=2, tau=1), E)
    r.step(c(e0=2, e1=2), "prefill", 0)
    counts = c(e1=1, e2=1, e3=1)
    d = r.step(counts, "step", 0)
    # e1 kept (resident wins the tie), e2 beats e3 by lower id; e0 (count 0) evicted
    assert resident_set(d) == {1, 2}
    assert d.copies[0].tolist() == [[2, 0]]
    assert gpu_cpu(d, counts) == (2, 1)


def test_tide_only_copies_non_resident_and_evicts_only_for_room():
    r = PolicyRunner(Policy.make("tide", 1, E, budget=3, tau=1), E)
    r.step(c(e0=3, e1=2, e2=1), "prefill", 0)
    d = r.step(c(e2=5, e0=1), "step", 0)  # both resident: nothing moves, e1 stays
    assert d.migrations[0] == 0 and resident_set(d) == {0, 1, 2}


def test_tide_eviction_lru_then_lower_id_and_slot_reuse_in_eviction_order():
    r = PolicyRunner(Policy.make("tide", 1, E, budget=4, tau=2), E)
    r.step(c(e0=4, e1=3, e2=2, e3=1), "prefill", 0)  # slots 0..3 hold e0..e3
    r.step(c(e2=1), "step", 1)  # no refresh; e2 used more recently than e0, e1, e3
    d = r.step(c(e6=5, e5=3, e3=1), "step", 2)
    # target {6, 5, 3}; two evictions among {0, 1, 2}, all count 0: LRU e0, e1 (tie by id)
    assert resident_set(d) == {2, 3, 5, 6}
    assert d.copies[0].tolist() == [[6, 0], [5, 1]]


def test_plan_has_per_layer_tau_and_budget():
    r = PolicyRunner(Policy.make("plan", 2, E, budget=[2, 0], tau=[1, 4]), E)
    counts = np.vstack([c(e0=2, e1=1), c(e0=2, e1=1)])
    d = r.step(counts, "prefill", 0)
    f = forward_counters(d, counts, 100, 10)
    assert f["cpu_tokens"].tolist() == [0, 3]
    counts = np.vstack([c(e4=2), c(e4=2)])
    d = r.step(counts, "step", 1)  # layer 0 refreshes (tau 1)
    assert d.migrations.tolist() == [1, 0]


def test_per_layer_budgets_are_never_exceeded():
    rng = np.random.default_rng(0)
    budgets = [0, 1, 3, 8]
    r = PolicyRunner(Policy.make("plan", 4, E, budget=budgets, tau=[1, 2, 1, 3]), E)
    for f in range(30):
        counts = rng.multinomial(12, np.ones(E) / E, size=4)
        d = r.step(counts, "step", f % 5)
        assert d.resident.sum(axis=1).tolist() == [min(b, E) for b in budgets]
        assert all((r.state.in_slot[l, :b] >= 0).all() for l, b in enumerate(budgets))


def test_counters_bytes():
    r = PolicyRunner(Policy.make("tide", 1, E, budget=2, tau=1), E)
    r.step(c(e0=2, e1=2), "prefill", 0)
    counts = c(e0=1, e1=1, e2=1, e3=1, e4=1, e5=1)
    d = r.step(counts, "step", 0)
    # tokens choose top-2: t0 {0, 1}, t1 {2, 3}, t2 {4, 5}; resident after refresh {0, 1}
    choices = np.array([[[0, 1]], [[2, 3]], [[4, 5]]])
    f = forward_counters(d, counts, expert_bytes=100, act_bytes_per_token=10, choices=choices, tokens_run=3)
    assert f["gpu_tokens"][0] == 2 and f["cpu_tokens"][0] == 4
    assert f["bytes_act"][0] == 2 * 10  # two tokens have a CPU assignment
    assert f["bytes_h2d"][0] == 100 * f["migrations"][0]
    # without choices for some tokens: an upper bound, never above the CPU assignments
    f = forward_counters(d, counts, 100, 10, choices=choices[:1], tokens_run=3)
    assert f["bytes_act"][0] == 2 * 10


def test_step_is_pure():
    p = Policy.make("tide", 1, E, budget=2, tau=1)
    s0, _ = step(p, None, c(e0=1, e1=1), "prefill", 0)
    before = s0.slot_of.copy()
    s1, _ = step(p, s0, c(e5=3, e6=3), "step", 0)
    assert (s0.slot_of == before).all() and not (s1.slot_of == before).all()


@pytest.mark.parametrize("args, fragment", [
    (("nope", 1, E), "unknown policy"),
    (("tide", 1, E, 2, 0), "tau must be at least 1"),
    (("tide", 1, E, 9, 1), "budgets must lie"),
    (("static", 1, E, -1), "budgets must lie"),
    (("static", 1, E), "needs a budget"),
])
def test_bad_policy_settings(args, fragment):
    with pytest.raises(TideError, match=fragment):
        Policy.make(*args)


def test_resident_sets_carry_over_between_requests(small_trace):
    from traces.costs.policy_run import replay_policy
    L, E = small_trace.shape.n_moe_layers, small_trace.shape.experts
    for name, b in (("static", 8), ("swap", 8), ("tide", 8)):
        rep = replay_policy(small_trace, Policy.make(name, L, E, budget=b, tau=2))
        setup = rep.counters["setup_migrations"]
        assert (setup[0] == b).all() and setup[1:].sum() == 0
    second = small_trace.forwards.index[small_trace.forwards["request"] == 1][0]
    rep = replay_policy(small_trace, Policy.make("static", L, E, budget=8))
    assert rep.counters["migrations"][second:].sum() == 0


@pytest.mark.parametrize("name,budget,tau", [("tide", 6, 1), ("tide", 3, 2), ("plan", [0, 5, 12, 3], [1, 3, 2, 1]),
                                             ("swap", 5, None),
                                             ("static", 6, None), ("tide", 32, 1)])
def test_the_runtimes_one_layer_path_decides_as_the_batched_one(name, budget, tau):
    """Layer by layer (the runtime's fast path) and a whole forward at once (the simulator)
    give the same copies and residents, forward after forward."""
    rng = np.random.default_rng(7)
    L, E = 4, 32
    policy = Policy.make(name, L, E, budget=budget, tau=tau)
    one, whole = PolicyRunner(policy, E), PolicyRunner(policy, E)
    for f in range(60):
        kind, step = ("commit", 0) if f % 9 == 8 else ("step", f % 9)
        counts = np.where(rng.random((L, E)) < 0.3, rng.integers(1, 6, (L, E)), 0)
        one.begin(kind, step)
        for l in range(L):
            one.layer(l, counts[l])
        a = one.end()
        b = whole.step(counts, kind, step)
        assert np.array_equal(a.resident, b.resident), f
        assert np.array_equal(a.copy_table, b.copy_table) and np.array_equal(a.setup_table, b.setup_table), f


def _reference_swap(budget: int, seq: list[np.ndarray]) -> list[tuple[list[list[int]], list[list[list[int]]], set[int]]]:
    """Swap's rules written out plainly for one layer: per forward, each wave's experts,
    each wave's copies (expert, slot) and the resident set after the forward."""
    slot_of: dict[int, int] = {}
    last: dict[int, int] = {}
    clock, out = 0, []
    for f, counts in enumerate(seq):
        if f == 0:  # setup: top B by count, at clock 0
            for s, e in enumerate(sorted(range(len(counts)), key=lambda e: (-counts[e], e))[:budget]):
                slot_of[e], last[e] = s, 0
        clock += 1
        chosen = [e for e in sorted(range(len(counts)), key=lambda e: (-counts[e], e)) if counts[e] > 0]
        waves, copies = [], []
        for start in range(0, len(chosen), budget):
            if start:
                clock += 1
            chunk = chosen[start:start + budget]
            new = [e for e in chunk if e not in slot_of]
            free = sorted(set(range(budget)) - set(slot_of.values()))
            cand = sorted((e for e in slot_of if e not in chunk), key=lambda e: (last[e], e))
            for e in cand[:max(0, len(new) - len(free))]:
                del slot_of[e]
            free = sorted(set(range(budget)) - set(slot_of.values()))
            wave_copies = []
            for e, s in zip(new, free):
                slot_of[e] = s
                wave_copies.append([e, s])
            for e in chunk:
                last[e] = clock
            waves.append(sorted(chunk))
            copies.append(wave_copies)
        out.append((waves, copies, set(slot_of)))
    return out


@pytest.mark.parametrize("budget", [1, 3, 8, 20])
def test_swap_follows_its_rules_written_out_plainly(budget):
    rng = np.random.default_rng(budget)
    E = 24
    seq = [np.where(rng.random(E) < 0.4, rng.integers(1, 5, E), 0) for _ in range(40)]
    want = _reference_swap(budget, seq)
    r = PolicyRunner(Policy.make("swap", 1, E, budget=budget), E)
    for f, counts in enumerate(seq):
        d = r.step(counts[None, :], "step", f % 4)
        waves = d.waves[0]
        assert [w.gpu_experts.tolist() for w in waves] == want[f][0], f
        assert [w.copies.tolist() for w in waves] == want[f][1], f
        assert set(np.flatnonzero(d.resident[0]).tolist()) == want[f][2], f


def test_a_plan_decides_each_layer_as_the_uniform_policy_of_its_kind():
    """Mixed kinds share one clock, yet every layer's copies, slots and waves are those of the
    uniform policy of its kind (the planner prices each candidate alone)."""
    rng = np.random.default_rng(3)
    L, E = 5, 16
    kinds, budgets, taus = ["swap", "tide", "static", "cpu", "tide"], [3, 4, 5, 0, 6], [0, 2, 0, 0, 1]
    plan = PolicyRunner(Policy.make("plan", L, E, budget=budgets, tau=taus, kind=kinds), E)
    alone = [PolicyRunner(Policy.make(k, L, E, budget=b, **({"tau": t} if k == "tide" else {})), E)
             if k != "cpu" else PolicyRunner(Policy.make("cpu", L, E), E) for k, b, t in zip(kinds, budgets, taus)]
    for f in range(50):
        kind, step = ("commit", 0) if f % 7 == 6 else ("step", f % 7)
        counts = np.where(rng.random((L, E)) < 0.4, rng.integers(1, 6, (L, E)), 0)
        d = plan.step(counts, kind, step)
        for l, runner in enumerate(alone):
            a = runner.step(counts, kind, step)
            assert np.array_equal(d.resident[l], a.resident[l]), (f, l)
            assert np.array_equal(d.copies[l], a.copies[l]) and np.array_equal(d.setup_copies[l], a.setup_copies[l])
            got, ref = d.waves[l], a.waves[l]
            assert (got is None) == (ref is None)
            if got is not None:
                assert [w.gpu_experts.tolist() for w in got] == [w.gpu_experts.tolist() for w in ref]
                assert [w.copies.tolist() for w in got] == [w.copies.tolist() for w in ref]


def test_plan_kinds_are_checked():
    with pytest.raises(TideError, match="unknown kind 'lru'"):
        Policy.make("plan", 2, E, budget=[1, 1], tau=[1, 1], kind=["tide", "lru"])
    with pytest.raises(TideError, match="swap needs"):
        Policy.make("plan", 2, E, budget=[0, 1], tau=[0, 1], kind=["swap", "tide"])
    with pytest.raises(TideError, match="cpu layer"):
        Policy.make("plan", 2, E, budget=[2, 1], tau=[0, 1], kind=["cpu", "tide"])
    with pytest.raises(TideError, match="only a plan"):
        Policy.make("tide", 2, E, budget=1, tau=1, kind="tide")
    p = Policy.make("plan", 3, E, budget=[0, 2, 3], tau=[0, 4, 0], kind=["cpu", "tide", "swap"])
    assert p.kinds == ["cpu", "tide", "swap"] and p.tau.tolist() == [0, 4, 0]
    assert Policy.from_json(p.to_json(), 3, E).kinds == p.kinds
    assert p.refresh_mask("step", 0).tolist() == [False, True, False]
