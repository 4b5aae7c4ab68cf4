"""The host tier: experts on the drive, read as forwards need them. Lossless under every host
kind and budget, the runtime reading exactly what the simulator replays, the planner's host
budgets, the formats that record them, and bad input."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run_module

from runtime.capture import TraceRecorder
from runtime.checkpoint import drive_files, load_model
from runtime.decoding import Generator
from runtime.offload import OffloadEngine
from sim.candidates import Candidates, HostGrid, price_candidates
from sim.planner import make_plan
from sim.simulate import simulate
from traces.common.errors import TideError
from traces.costs.cost_model import CostModel
from traces.costs.memory import MemoryBudget
from traces.costs.policy_run import replay_policy
from traces.formats.plan_file import Plan
from traces.formats.profile_file import Profile
from traces.formats.shapes import ModelShape
from traces.formats.trace_file import Decoding
from traces.policies.host import HostPolicy, HostRunner
from traces.policies.spec import Policy
from traces.workloads.synthetic import synthesize

PROMPTS = [list(range(3, 23)), list(range(100, 140)), list(range(40, 52)), list(range(200, 230))]


def drive_model(ckpt, dtype, policy):
    """The checkpoint loaded with the policy's drive layers left on the drive, and its engine."""
    from runtime.config import ModelConfig
    cfg = ModelConfig.load(ckpt)
    layers = [cfg.shape.moe_layers[l] for l in np.flatnonzero(policy.drive_layers(cfg.shape.experts))]
    model = load_model(ckpt, dtype=dtype, drive_layers=layers)
    eng = OffloadEngine(model, policy, torch.device("cpu"), drive=drive_files(ckpt, cfg, set(layers)))
    return model, eng


def generate(model, eng, prompts, batch, recorder=None):
    gen = Generator(model, Decoding(32, 32, 0.3, True), recorder=recorder, engine=eng)
    try:
        return [r.tokens for r in gen.generate_batch(prompts, [64] * len(prompts), batch)]
    finally:
        if eng is not None:
            eng.detach()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 4])
def test_every_host_kind_and_budget_gives_the_tokens_of_all(tiny_ckpt, dtype, batch):
    """Host budgets below the model's experts (some read from the drive every forward, some
    never held at all): exactly the tokens of ``all``, every host kind, GPU kinds mixed."""
    model = load_model(tiny_ckpt, dtype=dtype)
    L, E = model.cfg.shape.n_moe_layers, model.cfg.shape.experts
    prompts = PROMPTS if batch > 1 else PROMPTS[:1]
    ref = generate(model, OffloadEngine(model, Policy.make("all", L, E), torch.device("cpu")), prompts, batch)
    gpu = Policy.make("plan", L, E, budget=[0, 5, 12], tau=[1, 4, 2], kind=["cpu", "swap", "tide"])
    cases = [("tide", [0, 8, 16], 2), ("lru", 6, 1), ("static", [4, 31, 32], 1)] if dtype == "float32" \
        else [("lru", 6, 1)]
    for kind, budget, tau in cases:
        policy = gpu.with_host(HostPolicy.make(kind, L, E, budget, tau))
        m, eng = drive_model(tiny_ckpt, dtype, policy)
        got = generate(m, eng, prompts, batch)
        assert got == ref, (kind, budget)
        t = eng.totals()
        assert t["drive_reads"] > 0 and t["drive_bytes"] > 0, (kind, budget)


def test_the_runtime_reads_what_the_simulator_replays(tiny_ckpt, tiny_profile):
    """Reads and fills per run: the engine's host tier and the policy walk, on one trace."""
    model = load_model(tiny_ckpt, dtype="float32")
    L, E = model.cfg.shape.n_moe_layers, model.cfg.shape.experts
    for kind, budget, tau in (("tide", 8, 3), ("lru", [4, 10, 16], 1), ("static", 12, 1)):
        policy = Policy.make("tide", L, E, budget=4, tau=2).with_host(HostPolicy.make(kind, L, E, budget, tau))
        m, eng = drive_model(tiny_ckpt, "float32", policy)
        rec = TraceRecorder(m, Decoding(32, 32, 0.3, True), "float32")
        with rec:
            generate(m, eng, PROMPTS[:2], 2, recorder=rec)
        trace = rec.trace()
        t = eng.totals()
        r = replay_policy(trace, policy)
        assert (t["drive_reads"], t["drive_fills"]) == (r.drive["reads"].sum(), r.drive["fills"].sum()), kind
        box = Profile({**Profile.load(tiny_profile).data, "drive": Profile.load("rtx4090").data["drive"]})
        res = simulate(trace, box, policy)
        assert (res.drive_reads, res.drive_fills) == (t["drive_reads"], t["drive_fills"])


def test_host_kinds_hold_what_their_rules_say():
    E = 8
    lru = HostRunner(HostPolicy.make("lru", 1, E, 3), E)
    for step, used in enumerate(([0, 1, 2], [3], [1], [4])):
        lru.begin("step", step)
        d = np.isin(np.arange(E), used)
        reads, fills, held = lru.layer(0, d.astype(int), d)
        assert not fills.any()
    assert np.flatnonzero(held).tolist() == [1, 3, 4]  # 0 and 2 least recently used, gone
    assert reads.tolist() == np.isin(np.arange(E), [4]).tolist()
    tide = HostRunner(HostPolicy.make("tide", 1, E, 2, 2), E)
    counts = [np.array([0, 5, 0, 0, 9, 0, 0, 1]), np.array([7, 0, 0, 0, 0, 0, 8, 0]), np.array([0, 0, 3, 4, 0, 0, 0, 0])]
    held_sets = []
    for step, c in enumerate(counts):
        tide.begin("step", step)
        reads, fills, held = tide.layer(0, c, c > 0)
        held_sets.append(np.flatnonzero(held).tolist())
    assert held_sets == [[1, 4], [1, 4], [2, 3]]  # re-ranked at steps 0 and 2 only (tau 2)
    static = HostRunner(HostPolicy.make("static", 1, E, 2), E, setup_counts=np.array([[0, 0, 0, 0, 0, 3, 9, 0]]))
    static.begin("prefill", 0)
    reads, fills, held = static.layer(0, counts[0], counts[0] > 0)
    assert np.flatnonzero(held).tolist() == [5, 6] and fills.tolist() == held.tolist()


def test_one_pass_prices_every_host_budget_as_its_own_walk():
    """The planner's host columns: each host budget and tau as a policy of its own walks it."""
    prof = Profile.load("rtx4090")
    small_trace = synthesize(ModelShape.named("llada2-mini").replace(num_hidden_layers=3), 64, 16, seed=1)
    s = small_trace.shape
    cands = Candidates.grid([1, 3], [0, 8, 32])
    grid = HostGrid(np.array([0, 64, 160, 256]), np.array([1, 3]))
    priced = price_candidates(small_trace, [prof], cands, host=grid)
    for c in (1, 3, len(cands) - 1):
        for t in range(grid.n_options):
            for h in (1, 2):
                kind, tau = grid.option(t)
                p = Policy.make("plan", s.n_moe_layers, s.experts, budget=int(cands.budget[c]), tau=int(cands.tau[c]) or 1,
                                kind=["cpu", "static", "swap", "tide"][cands.kind[c]])
                p = p.with_host(HostPolicy.make(kind, s.n_moe_layers, s.experts, int(grid.budgets[h]), tau))
                r = replay_policy(small_trace, p, cost=CostModel(prof, s, small_trace.dtype))
                assert priced.host_reads[:, c, t, h].sum() == r.drive["reads"].sum() + r.drive["fills"].sum()
                assert priced.host_seconds[0, :, c, t, h].sum() == pytest.approx(r.times["layer_s"].sum())


def test_flash_plans_on_the_4090_box_with_64_gb(tmp_path):
    """The box most people own (the 128 GB one: experiments.drive_study)."""
    tr = synthesize(ModelShape.named("llada2-flash"), 32, 16, seed=0)
    for box in ("rtx4090-64gb",):
        prof = Profile.load(box)
        plan, frame = make_plan([tr], prof, 22, budget_step=64, progress=False)
        assert plan.host is not None and min(plan.host["budget"]) < tr.shape.experts
        mem = MemoryBudget.for_traces([tr], 22e9, host_limit_bytes=prof.capacity("host_mem_bytes"))
        need = mem.host_need_bytes(plan.kinds, plan.budget, plan.host["budget"])
        assert need <= prof.capacity("host_mem_bytes") and plan.predicted["host_gb"] == pytest.approx(need / 1e9)
        assert {"static+lru", "tide_tau1+lru"} <= set(frame["policy"])
        res = simulate(tr, prof, Policy.from_plan(Plan.read(plan.write(tmp_path / f"{box}.json")), tr.shape))
        assert res.seconds == pytest.approx(plan.predicted["seconds"]) and res.drive_reads > 0
        assert plan.predicted["seconds"] <= frame.set_index("policy").loc["static+lru", "seconds"] * (1 + 1e-9)


def test_formats_record_the_host_tier(tmp_path):
    s = ModelShape.named("llada2-mini")
    L = s.n_moe_layers
    plan = Plan.for_shape(s, 2, 16, host={"kind": ["lru"] * (L - 1) + ["tide"], "budget": [64] * L, "tau": [1] * L})
    back = Plan.read(plan.write(tmp_path / "p.json"))
    pol = Policy.from_plan(back, s)
    assert pol.host.kinds[-1] == "tide" and pol.host.budget.tolist() == [64] * L
    d = json.loads((tmp_path / "p.json").read_text())
    (tmp_path / "v3.json").write_text(json.dumps({**d, "version": 3}))
    assert Policy.from_plan(Plan.read(tmp_path / "v3.json"), s).host is None  # version 3: no host tier
    bad = {**d, "host": {**d["host"], "budget": [64] * (L - 1)}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(TideError, match="host.budget: expected one value per MoE layer"):
        Plan.read(tmp_path / "bad.json")
    data = Profile.load("rtx4090").data
    for v in (0, -1.5):
        broken = json.loads(json.dumps(data))
        broken["drive"]["read_gbps"]["value"] = v
        with pytest.raises(TideError, match="drive.read_gbps"):
            Profile(broken, where="box.json")


def test_memory_names_the_tier_that_falls_short():
    s = ModelShape.named("llada2-flash")
    mem = MemoryBudget(s, "bfloat16", 22e9, host_limit_bytes=64e9, drive_bytes=1e11)
    with pytest.raises(TideError, match="the drive falls short"):
        mem.check_holds("flash")
    mem = MemoryBudget(s, "bfloat16", 22e9, host_limit_bytes=5e9, drive_bytes=2e12)
    with pytest.raises(TideError, match="host memory falls short"):
        mem.check_holds("flash")
    MemoryBudget(s, "bfloat16", 22e9, host_limit_bytes=64e9, drive_bytes=2e12).check_holds("flash")


def test_bad_host_settings_and_a_checkpoint_that_goes_away(tiny_ckpt, tmp_path, small_trace):
    base = ["runtime.generate", "--checkpoint", str(tiny_ckpt), "--prompt-ids", "1,2,3", "--gen-length", "8",
            "--policy", "tide", "--gpu-experts", "4"]
    for v, frag in (("0", "--host-mem-gb"), ("-1", "--host-mem-gb"), ("nan", "--host-mem-gb"),
                    ("1e9", "more than the memory of this machine"), ("0.0001", "too little")):
        assert_clean_error(run_module(*base, "--host-mem-gb", v), frag)
    assert_clean_error(run_module(*base[:-4], "--host-mem-gb", "1"), "--host-mem-gb needs --policy")
    trace = small_trace.write(tmp_path / "t.parquet")
    for v, frag in (("0", "--host-mem-gb"), ("1e9", "more than the memory")):
        assert_clean_error(run_module("sim.replay", "--trace", str(trace), "--profile", "rtx4090", "--policy", "tide",
                                      "--gpu-experts", "4", "--host-mem-gb", v), frag)
    # a checkpoint file truncated while a run reads experts from it: one line, naming the file
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    model = load_model(ck, dtype="float32")
    L, E = model.cfg.shape.n_moe_layers, model.cfg.shape.experts
    policy = Policy.make("tide", L, E, budget=4, tau=2).with_host(HostPolicy.make("lru", L, E, 4))
    m, eng = drive_model(ck, "float32", policy)
    os.truncate(ck / "model.safetensors", 100_000)
    with pytest.raises(TideError, match="model.safetensors.*(truncated|ends at byte)"):
        generate(m, eng, PROMPTS[:1], 1)


def test_a_model_with_every_layer_on_the_drive_runs_any_policy(tiny_ckpt):
    """What validation runs a host-tier plan's baselines on: every layer's experts left on the
    drive, a layer whose host budget is every expert read in whole when the engine is made
    (so it reads nothing later, as the simulator says), a policy without a host tier too."""
    from runtime.config import ModelConfig
    cfg = ModelConfig.load(tiny_ckpt)
    L, E = cfg.shape.n_moe_layers, cfg.shape.experts
    layers = set(cfg.shape.moe_layers)
    ref = generate(*(lambda m: (m, OffloadEngine(m, Policy.make("all", L, E), torch.device("cpu"))))(
        load_model(tiny_ckpt, dtype="float32")), PROMPTS[:1], 1)
    on_drive = load_model(tiny_ckpt, dtype="float32", drive_layers=layers)
    files = drive_files(tiny_ckpt, cfg, layers)
    tide = Policy.make("tide", L, E, budget=4, tau=2)
    for policy in (tide, tide.with_host(HostPolicy.make("lru", L, E, [E, 8, E]))):
        eng = OffloadEngine(on_drive, policy, torch.device("cpu"), drive=files)
        assert generate(on_drive, eng, PROMPTS[:1], 1) == ref
        t = eng.totals()
        assert t["drive_demand"] > 0
        assert (t["drive_reads"] > 0) == (policy.host is not None)  # a layer held whole reads nothing after
    with pytest.raises(TideError, match="reads layers whose experts the model holds"):
        OffloadEngine(load_model(tiny_ckpt, dtype="float32"), tide.with_host(HostPolicy.make("lru", L, E, 8)),
                      torch.device("cpu"))


def test_validation_runs_a_plan_with_a_host_tier(tiny_ckpt, tmp_path):
    from experiments.validate import validate
    from runtime.config import ModelConfig
    from traces.formats.trace_read import read_trace
    shape = ModelConfig.load(tiny_ckpt).shape
    L, E = shape.n_moe_layers, shape.experts
    trace = synthesize(shape, 32, 16, seed=2, dtype="float32")
    mem = MemoryBudget.for_traces([trace], 1e12)
    gpu = mem.fixed_bytes + 6 * L * mem.expert_bytes  # the baselines at 6 slots per layer
    host = (L * 12 + E) * mem.expert_bytes  # their lru caches: 12 experts per layer beside the staging
    plan = Plan.for_shape(shape, 2, 6, kind="tide", dtype="float32", gpu_mem_bytes=gpu,
                          host={"kind": "lru", "budget": [8, E, 12], "tau": [1] * L, "host_mem_bytes": host})
    df, rounds, failures = validate(str(tiny_ckpt), plan, [("t", read_trace(trace.write(tmp_path / "t.parquet")))],
                                    rounds=1)
    assert not failures
    assert {"plan", "static+lru"} <= set(df["policy"])
    # priced on the round's profile with this drive measured; how close is a benchmark's
    # figure (experiments.accuracy --host-only), not a test's: one round of ms-long tiny runs
    # reading a VM's drive once read +119%
    assert (df["predicted_s"] > 0).all() and np.isfinite(df["error"]).all()
