"""Batches of requests in the runtime: continuous batching, lossless per request, the
admission rule, the tide refresh rule in a batch, and batched forwards rebuilt from a
batch-1 trace."""
import json

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run_module

from runtime.capture import TraceRecorder
from runtime.checkpoint import load_model
from runtime.decoding import Generator
from runtime.model import KVCache, Segment
from runtime.offload import OffloadEngine
from traces.common.errors import TideError
from traces.costs.policy_run import replay_policy
from traces.formats.trace_file import Decoding
from traces.formats.trace_read import read_trace
from traces.policies.runner import PolicyRunner
from traces.policies.spec import Policy
from traces.serving.admission import Admission, compose, compose_trace

#: ragged: different prompt and generation lengths, one prompt shorter than a block
PROMPTS = [list(range(1, 41)), list(range(5, 17)), list(range(100, 170)), [7, 8, 9]]
LENGTHS = [48, 64, 40, 80]
DEC = Decoding(32, 32, 0.5, True)
POLICIES = [("all", {}), ("cpu", {}), ("static", {"budget": 6}), ("swap", {"budget": 6}),
            ("tide", {"budget": 6, "tau": 2}), ("plan", {"kind": ["swap", "cpu", "tide"], "budget": [4, 0, 8], "tau": 3})]


@pytest.fixture(scope="module")
def fp32(tiny_ckpt):
    return load_model(tiny_ckpt, dtype="float32", experts_device="cpu")


def test_a_batched_forward_gives_each_request_its_own_logits_bit_for_bit(fp32):
    """Ragged segments (other lengths, positions, caches) in one forward: each request's
    logits are exactly those of the same forward alone (on the CPU an expert's rows are
    computed per request: a matmul over more rows rounds differently)."""
    cfg = fp32.cfg
    caches = [KVCache(cfg, 96, fp32.device, fp32.dtype) for _ in range(3)]
    segs = [Segment(torch.arange(1, 33), 0, caches[0], None, 0),
            Segment(torch.arange(40, 72), 32, caches[1], None, 0),
            Segment(torch.full((32,), cfg.mask_id), 64, caches[2], None, 0)]
    batch = fp32.forward_batch(segs)
    for sg, b in zip(segs, batch):
        alone = fp32.forward_batch([Segment(sg.ids, sg.pos0, KVCache(cfg, 96, fp32.device, fp32.dtype), None, 0)])[0]
        assert torch.equal(b, alone)


def _solo(model, policy=None):
    out = []
    for i, (p, g) in enumerate(zip(PROMPTS, LENGTHS)):
        with (OffloadEngine(model, policy, model.device) if policy else _null()) as eng:
            out.append(Generator(model, DEC, engine=eng).generate(p, g, request=i).tokens)
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return None


def _choices_by_request(model, run):
    """Every router choice a run makes, per request and in order (each request's router runs
    on its own tokens, in seat order: by request within a forward)."""
    calls = []
    orig = type(model.moe_blocks[0].gate).choose

    def choose(self, scores):
        idx = orig(self, scores)
        calls.append(idx.clone())
        return idx
    for blk in model.moe_blocks:
        blk.gate.choose = choose.__get__(blk.gate)
    try:
        results = run()
    finally:
        for blk in model.moe_blocks:
            del blk.gate.choose
    return results, calls


def test_batched_generation_is_each_requests_own_run(fp32):
    """fp32 on the CPU: at batch 2, 3 and 4 (more than the prompts too) each request's tokens
    and every one of its expert choices equal its own batch-1 run."""
    L = fp32.cfg.shape.n_moe_layers
    solo_tokens, solo_calls = [], []
    for i, (p, g) in enumerate(zip(PROMPTS, LENGTHS)):
        res, calls = _choices_by_request(fp32, lambda: Generator(fp32, DEC).generate(p, g, request=i))
        solo_tokens.append(res.tokens)
        solo_calls.append(calls)
    for bs in (2, 3, 4, 9):
        results, calls = _choices_by_request(fp32, lambda: Generator(fp32, DEC).generate_batch(PROMPTS, LENGTHS, bs))
        assert [r.tokens for r in results] == solo_tokens, bs
        per_request = {i: [] for i in range(len(PROMPTS))}
        it = iter(calls)
        for f in range(max(max(r.batch_forwards) for r in results) + 1):
            members = [i for i, r in enumerate(results) if f in r.batch_forwards]
            assert 1 <= len(members) <= bs
            for _ in range(L):
                for i in members:
                    per_request[i].append(next(it))
        for i in per_request:
            assert len(per_request[i]) == len(solo_calls[i])
            assert all(torch.equal(a, b) for a, b in zip(per_request[i], solo_calls[i])), (bs, i)


def test_continuous_batching_seats_the_next_request_at_the_next_forward(fp32):
    results = Generator(fp32, DEC).generate_batch(PROMPTS, LENGTHS, 2)
    first_end = min(max(r.batch_forwards) for r in results[:2])
    assert min(results[2].batch_forwards) == first_end + 1  # joined right after a seat freed
    for r in results:
        assert r.batch_forwards == list(range(r.batch_forwards[0], r.batch_forwards[-1] + 1))  # no gaps
        assert r.forwards == len(r.batch_forwards) and 0 <= r.start_s <= r.end_s
    per_forward = np.bincount(np.concatenate([r.batch_forwards for r in results]))
    assert per_forward.max() == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_policy_gives_the_tokens_of_all_in_the_same_batched_run(tiny_ckpt, dtype):
    model = load_model(tiny_ckpt, dtype=dtype, experts_device="cpu")
    L, E = model.cfg.shape.n_moe_layers, model.cfg.shape.experts
    ref, counters = None, {}
    for name, kw in (POLICIES if dtype == "float32" else POLICIES[:5]):  # bf16 on the CPU is slow: no plan there
        policy = Policy.make(name, L, E, **kw)
        with OffloadEngine(model, policy, model.device) as eng:
            toks = [r.tokens for r in Generator(model, DEC, engine=eng).generate_batch(PROMPTS, LENGTHS, 3)]
        counters[name] = eng.totals()
        ref = toks if ref is None else ref
        assert toks == ref, name
    assert counters["cpu"]["gpu_tokens"] == 0 and counters["all"]["cpu_tokens"] == 0
    assert counters["swap"]["cpu_tokens"] == 0 and counters["swap"]["migrations"] > 0
    if dtype == "float32":
        assert ref == _solo(model)  # and every request's tokens are its batch-1 run's


def test_the_admission_rule():
    a = Admission.of([3, 1, 2], 2)
    assert a.seat() == [3, 1]
    a.leave(3)
    assert a.seat() == [1, 2] and not a.done
    a.leave(1), a.leave(2)
    assert a.done
    assert compose([(0, 2), (1, 1), (2, 3)], 2) == [[(0, 0), (1, 0)], [(0, 1), (2, 0)], [(2, 1)], [(2, 2)]]
    assert compose([(0, 2), (1, 1)], 5) == [[(0, 0), (1, 0)], [(0, 1)]]  # a batch above the requests runs them all
    assert compose([(0, 2), (1, 1)], 1) == [[(0, 0)], [(0, 1)], [(1, 0)]]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(TideError, match="--batch-size"):
            Admission(bad)


def test_tide_refreshes_where_any_request_of_the_forward_would():
    """tau counts each request's own steps: a batched forward refreshes a tide layer when any
    member is at its prefill, its block's first step, or a multiple of tau; a batch of one
    decides as before."""
    policy = Policy.make("plan", 3, 8, kind=["tide", "static", "tide"], budget=[2, 2, 2], tau=[4, 1, 2])
    r = PolicyRunner(policy, 8)
    r.begin("step", 3)
    assert not r._refresh.any()
    r.begin("step", 3, [("step", 2)])
    assert r._refresh.tolist() == [False, False, True]  # layer 2's tau=2 hits at step 2
    r.begin("commit", 0, [("prefill", 0)])
    assert r._refresh.tolist() == [True, False, True]  # a joining request's prefill refreshes
    r.begin("step", 5, [("commit", 0), ("step", 4)])
    assert r._refresh.tolist() == [True, False, True]


def test_batched_forwards_rebuilt_from_a_batch1_trace_match_a_real_batched_run(fp32, tmp_path):
    """A batch-1 trace of several requests rebuilds, exactly, the forwards the same prompts
    make at batch N (routing is per token, attention per request): the composed trace's
    per-forward counts equal what the engine counted running them batched, and what a trace
    recorded of that batched run holds, member by member."""
    L, E = fp32.cfg.shape.n_moe_layers, fp32.cfg.shape.experts
    with TraceRecorder(fp32, DEC, "float32") as rec:
        Generator(fp32, DEC, recorder=rec).generate_batch(PROMPTS, LENGTHS, 1)
    trace = rec.trace()
    assert not trace.batched and trace.batch_size == 1
    for bs in (2, 3):
        policy = Policy.make("tide", L, E, budget=6, tau=2)
        with OffloadEngine(fp32, policy, fp32.device) as eng, TraceRecorder(fp32, DEC, "float32") as rec:
            Generator(fp32, DEC, engine=eng, recorder=rec).generate_batch(PROMPTS, LENGTHS, bs)
        composed = compose_trace(trace, bs)
        got = read_trace(rec.trace(policy=policy.to_json()).write(tmp_path / f"b{bs}.parquet"))
        assert got.batched and got.batch_size == bs and got.n_batched == len(eng.forward_counts)
        assert np.array_equal(composed.forward_counts(), np.stack(eng.forward_counts))
        assert np.array_equal(got.forward_counts(), np.stack(eng.forward_counts))
        cols = ["forward", "request", "kind", "block", "step", "tokens_run", "tokens_committed", "context"]
        assert got.forwards[cols].equals(composed.forwards[cols].astype(got.forwards[cols].dtypes))
        assert np.array_equal(got.counts, composed.counts) and np.array_equal(got.choices, composed.choices)
        # the engine's counters, per forward, are the policy walk's over the recorded schedule
        walked = replay_policy(got, policy)
        assert all(np.array_equal(walked.counters[k], got.counters[k]) for k in got.counters)
    # and the engine runs the trace's requests composed at batch N (realistic traffic, any batch size)
    with OffloadEngine(fp32, Policy.make("tide", L, E, budget=6, tau=2), fp32.device) as eng:
        out = Generator(fp32, DEC, engine=eng).replay_batch(trace, [r["request"] for r in trace.requests], 3)
    assert len(out) == len(PROMPTS)
    assert np.array_equal(np.stack(eng.forward_counts), compose_trace(trace, 3).forward_counts())


def test_a_batched_trace_replays_its_recorded_forwards(fp32):
    """``replay_batch`` without a batch size runs the forwards the trace recorded: the same
    members in each forward, the same counts and counters."""
    L, E = fp32.cfg.shape.n_moe_layers, fp32.cfg.shape.experts
    policy = Policy.make("swap", L, E, budget=6)
    with OffloadEngine(fp32, policy, fp32.device) as eng, TraceRecorder(fp32, DEC, "float32") as rec:
        Generator(fp32, DEC, engine=eng, recorder=rec).generate_batch(PROMPTS, LENGTHS, 3)
    trace = rec.trace()
    with OffloadEngine(fp32, policy, fp32.device) as eng2:
        out = Generator(fp32, DEC, engine=eng2).replay_batch(trace, [r["request"] for r in trace.requests])
    member = {int(r): [] for r in trace.forwards["request"]}
    for f, rows in enumerate(trace.schedule()):
        for i in rows:
            member[int(trace.forwards.at[i, "request"])].append(f)
    assert [r.batch_forwards for r in out] == [member[r["request"]] for r in trace.requests]
    assert np.array_equal(np.stack(eng2.forward_counts), trace.forward_counts())
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(eng.forward_counters, eng2.forward_counters) for k in a)


def test_generate_batch_size_on_the_command_line(tiny_ckpt, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_ids": p, **({"gen_length": g} if i % 2 else {})})
                                 for i, (p, g) in enumerate(zip(PROMPTS, LENGTHS))) + "\n")
    base = ["runtime.generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(prompts), "--gen-length", "48",
            "--threshold", "0.5", "--json"]
    one = run_module(*base)
    assert one.returncode == 0, one.stderr
    solo = json.loads(one.stdout)
    from runtime.config import ModelConfig
    from traces.formats.plan_file import Plan
    plan = Plan.for_shape(ModelConfig.load(tiny_ckpt).shape, 2, 6, kind="tide", batch_size=8).write(tmp_path / "p.json")
    for bs in ("3", "8"):  # 8: the plan's batch size (no flag), above the 4 prompts: all at once, with a note
        flags = ["--batch-size", bs, "--policy", "tide", "--gpu-experts", "6", "--tau", "2"] if bs == "3" else \
            ["--policy", "plan", "--plan", str(plan)]
        p = run_module(*base, *flags)
        assert p.returncode == 0, p.stderr
        assert ("above the 4 prompts" in p.stderr) == (bs == "8")
        out = json.loads(p.stdout)
        assert out["batch_size"] == int(bs) and [r["request"] for r in out["requests"]] == [0, 1, 2, 3]
        assert [r["tokens"] for r in out["requests"]] == [r["tokens"] for r in solo["requests"]]
        assert out["forwards"] < solo["forwards"] and out["forwards_per_s"] > 0
        assert all(r["forwards"] == len(r["batch_forwards"]) and r["end_s"] >= r["start_s"] for r in out["requests"])
    assert len(solo["requests"][1]["tokens"]) <= LENGTHS[1]  # a line's own gen_length
    assert solo["forwards"] == sum(r["forwards"] for r in solo["requests"])  # batch 1: one request per forward


@pytest.mark.parametrize("flags,fragment", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--batch-size", "-2"], "--batch-size must be at least 1"),
    (["--batch-size", "1.5"], "--batch-size"),
    (["--batch-size", str(2**64)], "does not fit in 64 bits"),
    (["--batch-size", "64", "--policy", "static", "--gpu-mem-gb", "0.0008"], "KV cache"),
])
def test_bad_batch_flags(tiny_ckpt, tmp_path, flags, fragment):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_ids": list(range(1, 200))}) for _ in range(64)) + "\n")
    assert_clean_error(run_module("runtime.generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(prompts),
                                  "--gen-length", "64", *flags), fragment)


def test_a_prompt_too_long_for_the_positions_names_its_line(tiny_ckpt, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [1, 2]}) + "\n" + json.dumps({"prompt_ids": [1] * 4000}) + "\n")
    assert_clean_error(run_module("runtime.generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(prompts),
                                  "--gen-length", "200", "--batch-size", "2"), "p.jsonl:2", "max_position_embeddings")


def test_record_and_replay_a_batch_on_the_command_line(tiny_ckpt, tiny_profile, tmp_path):
    """--trace-out of a batched run writes a version-2 trace; --replay-trace runs its recorded
    forwards, or with --batch-size its requests composed anew; the simulator replays the
    recorded forwards with exactly the runtime's counters."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_ids": p}) for p in PROMPTS[:3]) + "\n")
    t = tmp_path / "t.parquet"
    base = ["runtime.generate", "--checkpoint", str(tiny_ckpt), "--threshold", "0.5", "--json",
            "--policy", "tide", "--gpu-experts", "6", "--tau", "2"]
    p = run_module(*base, "--prompts", str(prompts), "--gen-length", "40", "--batch-size", "2", "--trace-out", str(t))
    assert p.returncode == 0, p.stderr
    live, trace = json.loads(p.stdout), read_trace(t)
    assert trace.batched and trace.batch_size == 2 and trace.n_batched == live["forwards"]
    assert [r["request"] for r in trace.requests] == [0, 1, 2]
    again = run_module(*base, "--replay-trace", str(t))
    assert again.returncode == 0, again.stderr
    out = json.loads(again.stdout)
    assert out["batch_size"] == 2 and out["forwards"] == trace.n_batched
    assert [r["batch_forwards"] for r in out["requests"]] == [r["batch_forwards"] for r in live["requests"]]
    three = json.loads(run_module(*base, "--replay-trace", str(t), "--batch-size", "3").stdout)
    assert three["batch_size"] == 3 and three["forwards"] == compose_trace(trace, 3).n_batched < trace.n_batched
    stats = run_module("traces.stats", str(t), "--json")
    assert stats.returncode == 0, stats.stderr
    sim = run_module("sim.replay", "--trace", str(t), "--profile", str(tiny_profile), "--policy", "tide",
                     "--gpu-experts", "6", "--tau", "2", "--json")
    assert sim.returncode == 0, sim.stderr
    s = json.loads(sim.stdout)
    assert s["forwards"] == trace.n_batched and s["requests"] == 3 and s["max_batch"] == 2
    assert all(s[k] == int(v.sum()) for k, v in trace.counters.items())


def test_each_requests_rows_of_an_expert_are_computed_as_alone():
    """run_by_request on rows of several requests, experts listed in any order (a swap wave
    lists them by rank): every (expert, request) segment's output is that segment computed
    alone; in fp32 on the CPU the engine's kernel is the matmul chain (the grouped kernel
    rounds a group differently beside others)."""
    from runtime.experts import ExpertWeights, choose_kernel, run_by_request, run_experts
    torch.manual_seed(0)
    E, H, I = 6, 16, 8
    w = ExpertWeights(torch.randn(E, I, H), torch.randn(E, I, H), torch.randn(E, H, I))
    counts = np.array([3, 0, 5, 2, 4, 1])
    bounds = np.concatenate([[0], np.cumsum(counts)])
    tok = torch.randn(int(counts.sum()), H)
    req = np.array([0, 1, 1, 0, 0, 1, 2, 2, 0, 2, 1, 1, 2, 2, 0])
    for experts in (np.array([4, 0, 2]), np.array([0, 2, 3, 4, 5]), np.array([5, 3])):
        out = torch.zeros_like(tok)
        run_by_request(run_experts, tok, out, bounds, experts, w, np.arange(E), req)
        for e in range(E):
            for r in np.unique(req[bounds[e]:bounds[e + 1]]):
                rows = np.arange(bounds[e], bounds[e + 1])[req[bounds[e]:bounds[e + 1]] == r]
                alone = torch.empty(len(rows), H)
                run_experts(tok[rows], alone, np.array([0, len(rows)]), np.array([0]), w, np.array([e]))
                assert torch.equal(out[rows], alone) == (e in experts) or not len(rows)
    assert choose_kernel(torch.device("cpu"), torch.float32, 64, 32)[0] == "loop"


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_stopping_a_batch_midway_leaves_no_trace(tiny_ckpt, tmp_path, monkeypatch, how):
    """Ctrl-C or SIGTERM in the middle of a batched run: exit 130 / 143, one line, no trace
    (not even a temporary)."""
    import os
    import signal

    from runtime.model import LLaDA2
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_ids": p}) for p in PROMPTS) + "\n")
    out = tmp_path / "t.parquet"
    real, calls = LLaDA2.forward_batch, []

    def forward_batch(self, segments):
        calls.append(len(segments))
        if len(calls) == 12:  # well inside the batched run (warm-up is the first call)
            assert len(segments) > 1
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, segments)
    monkeypatch.setattr(LLaDA2, "forward_batch", forward_batch)
    p = run_module("runtime.generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(prompts), "--gen-length", "64",
                   "--batch-size", "3", "--threshold", "0.5", "--trace-out", str(out))
    assert p.returncode == (130 if how == "ctrl-c" else 143)
    assert p.stderr.strip() == ("error: interrupted" if how == "ctrl-c" else "error: terminated")
    assert list(tmp_path.iterdir()) == [prompts]
