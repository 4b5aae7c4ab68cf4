"""The offload engine: lossless for every policy and budget, counters exact, replay, errors."""
import json

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run_module

from runtime.capture import TraceRecorder
from runtime.checkpoint import load_model
from runtime.decoding import Generator
from runtime.offload import OffloadEngine
from traces.costs.policy_run import replay_policy
from traces.formats.plan_file import Plan
from traces.formats.trace_file import Decoding
from traces.formats.trace_read import read_trace
from traces.policies.spec import Policy
from traces.workloads.synthetic import synthesize

CASES = [("cpu", None, None), ("static", 0, None), ("static", 1, None), ("static", 8, None), ("swap", 1, None),
         ("swap", 6, None), ("tide", 0, 1), ("tide", 1, 1), ("tide", 8, 3), ("tide", 32, 2),
         ("plan", [0, 5, 12], [1, 4, 2])]
PROMPTS = [list(range(3, 23)), list(range(100, 140))]
#: bf16 on the CPU is slow: one case per policy kind and one prompt there (fp32 takes them all)
CASES_BF16 = [("cpu", None, None), ("static", 8, None), ("swap", 6, None), ("tide", 8, 3), ("plan", [0, 5, 12], [1, 4, 2])]


def _cases(model, kv: bool = True) -> tuple[list, list]:
    """fp32 with the KV cache: every case and prompt; without it (whole prefix re-run each
    step) or in bf16 (slow on the CPU): one case per policy kind and one prompt."""
    return (CASES, PROMPTS) if model.dtype == torch.float32 and kv else (CASES_BF16, PROMPTS[:1])


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, tiny_ckpt):
    return load_model(tiny_ckpt, dtype=request.param)


def _run(model, policy, kv, prompt, threshold=0.3, recorder=None, popularity=None):
    eng = OffloadEngine(model, policy, torch.device("cpu"), setup_counts=popularity) if policy else None
    try:
        return Generator(model, Decoding(32, 32, threshold, kv), recorder=recorder, engine=eng).generate(prompt, 64), eng
    finally:
        if eng is not None:
            eng.detach()


@pytest.mark.parametrize("kv", [True, False])
def test_every_policy_and_budget_generates_exactly_what_all_does(model, kv):
    L, E = model.cfg.shape.n_moe_layers, model.cfg.shape.experts
    cases, prompts = _cases(model, kv)
    for prompt in prompts:
        ref, _ = _run(model, Policy.make("all", L, E), kv, prompt)
        plain, _ = _run(model, None, kv, prompt)
        assert ref.tokens == plain.tokens
        for name, b, tau in cases:
            r, eng = _run(model, Policy.make(name, L, E, budget=b, tau=tau), kv, prompt)
            assert r.tokens == ref.tokens, (name, b, tau)
            t = eng.totals()
            assert t["gpu_tokens"] + t["cpu_tokens"] == sum(c["gpu_tokens"].sum() + c["cpu_tokens"].sum()
                                                            for c in eng.forward_counters)
            if name == "cpu" or b == 0:
                assert t["gpu_tokens"] == 0 and t["migrations"] == 0


def test_a_plan_mixing_kinds_generates_what_all_does_and_counts_what_the_policy_functions_give(tmp_path, model):
    L, E = model.cfg.shape.n_moe_layers, model.cfg.shape.experts
    kinds = (["swap", "tide", "cpu", "static"] * L)[:L]
    budget = [{"swap": 3, "tide": 5, "cpu": 0, "static": 6}[k] for k in kinds]
    policy = Policy.make("plan", L, E, budget=budget, tau=[2] * L, kind=kinds)
    dtype = "float32" if model.dtype == torch.float32 else "bfloat16"
    for kv in (True, False):
        ref, _ = _run(model, Policy.make("all", L, E), kv, PROMPTS[0])
        with TraceRecorder(model, Decoding(32, 32, 0.3, kv), dtype) as rec, \
                OffloadEngine(model, policy, torch.device("cpu")) as eng:
            r = Generator(model, Decoding(32, 32, 0.3, kv), recorder=rec, engine=eng).generate(PROMPTS[0], 64)
        assert r.tokens == ref.tokens
        trace = read_trace(rec.trace().write(tmp_path / "mixed.parquet"))
        rep = replay_policy(trace, policy)
        for k in ("gpu_tokens", "cpu_tokens", "migrations", "setup_migrations"):
            assert np.array_equal(trace.counters[k], rep.counters[k]), (kv, k)
        swap_layers = [i for i, k in enumerate(kinds) if k == "swap"]
        assert rep.counters["cpu_tokens"][:, swap_layers].sum() == 0 and rep.counters["cpu_tokens"].sum() > 0


def test_counters_are_exactly_what_the_policy_functions_give(tmp_path, model):
    L, E = model.cfg.shape.n_moe_layers, model.cfg.shape.experts
    dtype = "float32" if model.dtype == torch.float32 else "bfloat16"
    for kv in (True, False) if dtype == "float32" else (True,):  # the counting is the dtype's own in neither
        for name, b, tau in _cases(model, kv)[0]:
            policy = Policy.make(name, L, E, budget=b, tau=tau)
            with TraceRecorder(model, Decoding(32, 32, 0.3, kv), dtype) as rec, \
                    OffloadEngine(model, policy, torch.device("cpu")) as eng:
                gen = Generator(model, Decoding(32, 32, 0.3, kv), recorder=rec, engine=eng)
                gen.generate(PROMPTS[0], 64, request=0)
                gen.generate(PROMPTS[1], 40, request=1)  # resident sets carry over
            trace = read_trace(rec.trace().write(tmp_path / "t.parquet"))
            rep = replay_policy(trace, policy)
            for k, v in rep.counters.items():
                if k == "bytes_act" and not kv:
                    assert (trace.counters[k] <= v).all()  # no-KV traces keep the block's choices only: a bound
                    continue
                assert np.array_equal(trace.counters[k], v), (name, b, tau, kv, k)


def test_popularity_fills_the_slots_at_setup(model):
    L, E = model.cfg.shape.n_moe_layers, model.cfg.shape.experts
    pop = np.zeros((L, E), dtype=np.int64)
    pop[:, -4:] = 10
    r, eng = _run(model, Policy.make("static", L, E, budget=4), True, PROMPTS[0], popularity=pop)
    assert (eng.runner.state.slot_of[:, -4:] >= 0).all()
    ref, _ = _run(model, None, True, PROMPTS[0])
    assert r.tokens == ref.tokens


def test_replaying_a_trace_follows_its_schedule_and_choices(model):
    shape = model.cfg.shape
    trace = synthesize(shape, 96, 40, seed=4, requests=2, dtype="float32")
    L, E = shape.n_moe_layers, shape.experts
    policy = Policy.make("tide", L, E, budget=8, tau=2)
    rec = TraceRecorder(model, trace.decoding, "float32").attach()
    eng = OffloadEngine(model, policy, torch.device("cpu"))
    gen = Generator(model, trace.decoding, recorder=rec, engine=eng)
    for r in trace.requests:
        gen.replay(trace, r["request"])
    eng.detach(), rec.detach()
    got = rec.trace()
    assert np.array_equal(got.counts, trace.counts) and np.array_equal(got.choices, trace.choices)
    assert got.forwards[["kind", "block", "step", "tokens_committed"]].equals(
        trace.forwards[["kind", "block", "step", "tokens_committed"]])
    if model.dtype == torch.float32:
        rep = replay_policy(trace, policy)
        for k in rep.counters:
            assert np.array_equal(got.counters[k], rep.counters[k]), k


def test_generate_command_with_policies(tmp_path, tiny_ckpt):
    base = ["runtime.generate", "--checkpoint", str(tiny_ckpt), "--prompt-ids", "5,6,7", "--gen-length", "32",
            "--threshold", "0.3", "--json"]
    ref = json.loads(run_module(*base).stdout)
    plan = Plan.for_shape(load_model(tiny_ckpt).cfg.shape, tau=[1, 2, 3], budget=[0, 4, 8])
    plan.write(tmp_path / "plan.json")
    out = tmp_path / "t.parquet"
    for extra in (["--policy", "tide", "--gpu-experts", "4", "--tau", "2", "--trace-out", str(out)],
                  ["--policy", "swap", "--gpu-experts", "2"], ["--policy", "plan", "--plan", str(tmp_path / "plan.json")],
                  ["--policy", "static", "--gpu-mem-gb", "0.0025"]):
        proc = run_module(*base, *extra)
        assert proc.returncode == 0, proc.stderr
        j = json.loads(proc.stdout)
        assert j["tokens"] == ref["tokens"]
        for k in ("gpu_tokens", "cpu_tokens", "migrations", "setup_migrations", "bytes_h2d", "bytes_act",
                  "fast_s", "cpu_s", "copy_s", "wait_s"):
            assert k in j
    t = read_trace(out)
    assert t.counters is not None and t.policy["name"] == "tide" and t.policy["tau"] == [2, 2, 2]
    synth = tmp_path / "s.parquet"
    synthesize(load_model(tiny_ckpt).cfg.shape, 64, 32, seed=1).write(synth)
    proc = run_module("runtime.generate", "--checkpoint", str(tiny_ckpt), "--replay-trace", str(synth), "--gen-length", "1",
                      "--policy", "tide", "--gpu-experts", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["forwards"] == read_trace(synth).n_forwards


def test_bad_offload_settings_fail_cleanly(tmp_path, tiny_ckpt, small_shape):
    base = ["runtime.generate", "--checkpoint", str(tiny_ckpt), "--prompt-ids", "5,6,7", "--gen-length", "8"]
    assert_clean_error(run_module(*base, "--policy", "fifo"), "unknown policy")
    assert_clean_error(run_module(*base, "--policy", "tide", "--gpu-experts", "4", "--tau", "0"), "--tau")
    assert_clean_error(run_module(*base, "--policy", "tide", "--gpu-experts", "99"), "budgets must lie")
    assert_clean_error(run_module(*base, "--policy", "swap", "--gpu-experts", "0"), "swap needs")
    assert_clean_error(run_module(*base, "--policy", "tide", "--gpu-mem-gb", "0.0001"), "no room for one expert")
    assert_clean_error(run_module(*base, "--policy", "all", "--gpu-mem-gb", "0.001"), "does not fit")
    assert_clean_error(run_module(*base, "--policy", "plan"), "needs --plan")
    assert_clean_error(run_module(*base, "--tau", "2"), "needs --policy")
    other = tmp_path / "other.parquet"
    synthesize(small_shape, 64, 32, seed=1).write(other)
    assert_clean_error(run_module("runtime.generate", "--checkpoint", str(tiny_ckpt), "--gen-length", "8",
                                  "--replay-trace", str(other)), "trace has MoE layers")
    nokv = tmp_path / "nokv.parquet"
    synthesize(load_model(tiny_ckpt).cfg.shape, 64, 32, seed=1, kv_cache=False).write(nokv)
    assert_clean_error(run_module("runtime.generate", "--checkpoint", str(tiny_ckpt), "--gen-length", "8",
                                  "--replay-trace", str(nokv)), "without the KV cache")


def test_reset_after_a_warm_up_starts_the_run_afresh(model):
    L, E = model.cfg.shape.n_moe_layers, model.cfg.shape.experts
    policy = Policy.make("tide", L, E, budget=8, tau=2)
    eng = OffloadEngine(model, policy, torch.device("cpu"))
    Generator(model, Decoding(32, 1, 0.3, True), engine=eng).generate(PROMPTS[0][:5], 1)
    eng.reset()
    r = Generator(model, Decoding(32, 32, 0.3, True), engine=eng).generate(PROMPTS[0], 64)
    fresh, eng2 = _run(model, policy, True, PROMPTS[0])
    eng.detach()
    assert r.tokens == fresh.tokens and eng.totals() == eng2.totals()


def test_bench_engine_splits_the_engines_host_time(tmp_path):
    """The benchmark's figures: every part of the engine's layer time, none negative, adding up."""
    proc = run_module("experiments.bench_engine", "--device", "cpu", "--budgets", "8", "--gen-length", "32",
                      "--repeats", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert [r["policy"] for r in d["baseline"]] == ["plain model", "all"]
    parts = ("decide", "copies", "cpu", "fast", "wait", "book", "issue")
    assert {r["policy"] for r in d["policies"]} >= {"cpu", "static", "swap", "tide_tau1", "tide tau=4"}
    for r in d["policies"] + d["baseline"][1:]:
        assert all(r[p] >= 0 for p in parts), r
        assert sum(r[p] for p in parts if p != "book") == pytest.approx(r["layer"], rel=1e-6)
        assert r["tokens_per_s"] > 0
    swap = next(r for r in d["policies"] if r["policy"] == "swap" and r["routing"] == "router")
    assert swap["migrations"] > 0 and swap["cpu"] == 0  # swap streams every chosen expert: nothing on the CPU path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_kernel_computes_what_the_loop_does_bit_for_bit_on_the_cpu(dtype):
    """Hits may run grouped while misses loop (or the other way): on the CPU the two must be
    the same numbers, or the tokens would leave all's."""
    from runtime.experts import ExpertWeights, grouped_experts, run_experts
    g = torch.Generator().manual_seed(0)
    E, H, I = 16, 64, 32
    w = ExpertWeights(*(torch.randn(E, *s, generator=g).to(dtype) for s in ((I, H), (I, H), (H, I))))
    counts = np.array([3, 0, 1, 5, 0, 2, 7, 1, 0, 0, 4, 1, 2, 0, 3, 1])
    bounds = np.concatenate([[0], np.cumsum(counts)])
    x = torch.randn(int(bounds[-1]), H, generator=g).to(dtype)
    index = np.random.default_rng(0).permutation(E)  # experts in slots out of order
    for experts in (np.array([6, 0, 3, 10, 14]), np.flatnonzero(counts), np.array([2])):
        a, b = torch.zeros_like(x), torch.zeros_like(x)
        run_experts(x, a, bounds, experts, w, index)
        grouped_experts(x, b, bounds, experts, w, index)
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", ["loop", "grouped"])
def test_every_expert_kernel_keeps_the_tokens_of_all(tiny_ckpt, kernel):
    model = load_model(tiny_ckpt, dtype="float32")
    s = model.cfg.shape
    d = Decoding(block_length=8, steps=4, threshold=0.9)
    base = Generator(model, d).generate(list(range(1, 9)), 16).tokens
    for name, b, tau in (("all", None, None), ("static", 8, None), ("tide", 8, 2), ("swap", 8, None)):
        with OffloadEngine(model, Policy.make(name, s.n_moe_layers, s.experts, budget=b, tau=tau), torch.device("cpu"),
                           kernel=kernel) as eng:
            assert Generator(model, d, engine=eng).generate(list(range(1, 9)), 16).tokens == base, (name, kernel)


def test_an_engine_refuses_a_policy_for_another_number_of_layers(tiny_ckpt):
    from traces.common.errors import TideError
    model = load_model(tiny_ckpt, dtype="float32")
    s = model.cfg.shape
    with pytest.raises(TideError, match="MoE layers"):
        OffloadEngine(model, Policy.make("static", s.n_moe_layers + 1, s.experts, budget=4), torch.device("cpu"))


def test_experts_that_never_leave_the_fast_device_load_there_with_no_host_copy(tmp_path, tiny_ckpt):
    """A plan's static layer lists its residents: the runtime loads them straight onto the
    fast device and keeps only the others in host memory; a layer wholly on the device keeps
    none there. Tokens and counters are those of the same plan on a model loaded whole (and
    of ``all``); the model refuses to run without the engine, and an engine whose policy
    would need a missing host copy is refused."""
    from traces.policies.kernels import device_only
    whole = load_model(tiny_ckpt)
    shape = whole.cfg.shape
    L, E = shape.n_moe_layers, shape.experts
    resident = {0: [1, 4, 9, 30], 2: list(range(0, 32, 4))}
    policy = Policy.make("plan", L, E, budget=[4, E, 8], tau=[0, 2, 0], kind=["static", "tide", "static"],
                         resident=resident)
    on = {shape.moe_layers[l]: ids for l, ids in device_only(policy, E).items()}
    assert on == {shape.moe_layers[0]: resident[0], shape.moe_layers[1]: list(range(E)),
                  shape.moe_layers[2]: resident[2]}
    split = load_model(tiny_ckpt, on_device=on)
    blocks = split.moe_blocks
    assert [b.experts.gate.shape[0] for b in blocks] == [E - 4, 0, E - 8]  # no host copy of the residents
    assert blocks[0].resident_ids.tolist() == resident[0]
    assert torch.equal(blocks[0].resident.up[1], whole.moe_blocks[0].experts.up[4])
    ref, _ = _run(whole, Policy.make("all", L, E), True, PROMPTS[1])
    same, eng_whole = _run(whole, policy, True, PROMPTS[1])
    got, eng = _run(split, policy, True, PROMPTS[1])
    assert got.tokens == same.tokens == ref.tokens
    assert eng.totals() == eng_whole.totals() and eng.totals()["cpu_tokens"] > 0
    with pytest.raises(Exception, match="only the offload engine runs such a model"):
        Generator(split, Decoding(32, 32, 0.3, True)).generate(PROMPTS[0], 32)
    with pytest.raises(Exception, match="Run the plan the model was loaded for"):
        OffloadEngine(split, Policy.make("tide", L, E, budget=4, tau=1), torch.device("cpu"))
    moved = Policy.make("plan", L, E, budget=[4, E, 8], tau=[0, 2, 0], kind=["static", "tide", "static"],
                        resident={0: [2, 4, 9, 30], 2: resident[2]})
    with pytest.raises(Exception, match="loaded there for another set of residents"):
        _run(split, moved, True, PROMPTS[0])
