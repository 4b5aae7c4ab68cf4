"""Block-diffusion generation: KV cache exactness, semantics, trace capture, the command."""
import json

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run_module

from runtime.capture import TraceRecorder
from runtime.checkpoint import load_model
from runtime.decoding import Generator, Sampling, transfer_schedule
from runtime.make_checkpoint import preset_config, write_checkpoint
from traces.formats.trace_file import Decoding
from traces.formats.trace_read import read_trace

PROMPTS = [list(range(1, 11)), list(range(40, 72)), [5] * 45, [7, 300, 12]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = []
    for seed in (0, 1):
        d = write_checkpoint(tmp_path_factory.mktemp(f"m{seed}") / "ckpt", preset_config("tiny"), seed=seed,
                             dtype="float32", router_skew=0.25)
        out.append(load_model(d))
    return out


def test_transfer_schedule():
    assert transfer_schedule(32, 32) == [1] * 32
    assert transfer_schedule(32, 10) == [4, 4, 3, 3, 3, 3, 3, 3, 3, 3]


@pytest.mark.parametrize("threshold", [0.95, 0.3])
def test_kv_cache_and_no_cache_give_identical_tokens_in_fp32(models, threshold):
    for model in models:
        for prompt in PROMPTS:
            kv = Generator(model, Decoding(32, 32, threshold, True)).generate(prompt, 70)
            full = Generator(model, Decoding(32, 32, threshold, False)).generate(prompt, 70)
            assert kv.tokens == full.tokens
            assert kv.step_forwards == full.step_forwards


def test_sampling_with_a_seed_is_reproducible_and_cache_exact(models):
    s = Sampling(temperature=0.8, top_k=50, top_p=0.9, seed=7)
    a = Generator(models[0], Decoding(32, 16, 0.5, True), s).generate(PROMPTS[0], 64)
    b = Generator(models[0], Decoding(32, 16, 0.5, True), s).generate(PROMPTS[0], 64)
    c = Generator(models[0], Decoding(32, 16, 0.5, False), s).generate(PROMPTS[0], 64)
    d = Generator(models[0], Decoding(32, 16, 0.5, True), Sampling(0.8, 50, 0.9, seed=8)).generate(PROMPTS[0], 64)
    assert a.tokens == b.tokens == c.tokens
    assert a.tokens != d.tokens


def test_threshold_accepts_several_tokens_and_schedule_finishes_blocks(models):
    r = Generator(models[0], Decoding(32, 32, 0.3, True)).generate(PROMPTS[0], 96)
    assert r.committed / r.step_forwards > 1.0
    one = Generator(models[0], Decoding(32, 32, 1.0, True)).generate(PROMPTS[0], 96)
    assert one.committed == one.step_forwards  # nothing passes a threshold of 1: one token per step
    few = Generator(models[0], Decoding(32, 4, 1.0, True)).generate(PROMPTS[0], 96)
    assert few.step_forwards <= 4 * 4  # 4 steps per block at most
    assert len(few.tokens) == 96 and models[0].cfg.mask_id not in few.tokens


def test_generation_stops_at_eos(tmp_path, models):
    base = Generator(models[0], Decoding(32, 32, 0.95, True)).generate(PROMPTS[0], 96)
    eos = base.tokens[40]  # a token generated in the second block
    first = base.tokens.index(eos)
    cfg = dict(preset_config("tiny"), eos_token_id=eos)
    d = write_checkpoint(tmp_path / "eos", cfg, seed=0, dtype="float32", router_skew=0.25)
    r = Generator(load_model(d), Decoding(32, 32, 0.95, True)).generate(PROMPTS[0], 96)
    assert r.tokens == base.tokens[: first + 1]
    assert r.step_forwards < base.step_forwards


def test_captured_trace_matches_the_router(tmp_path, models):
    model = models[1]
    seen = []  # an independent observer of every MoE layer's choices
    for kv in (True, False):
        rec = TraceRecorder(model, Decoding(32, 32, 0.3, kv), "float32").attach()
        seen.clear()
        inner = rec._observe

        def both(layer, idx, inner=inner):
            seen.append((layer, idx.clone()))
            inner(layer, idx)
        for blk in model.moe_blocks:
            blk.observer = both
        gen = Generator(model, Decoding(32, 32, 0.3, kv), recorder=rec)
        r0 = gen.generate(PROMPTS[1], 64, request=0)
        gen.generate(PROMPTS[0], 40, request=1)
        rec.detach()
        path = rec.trace().write(tmp_path / f"t{kv}.parquet")
        t = read_trace(path)  # validates
        L = model.cfg.shape.n_moe_layers
        assert t.n_forwards * L == len(seen)
        for f in range(t.n_forwards):
            idx = np.stack([seen[f * L + i][1].numpy() for i in range(L)])  # [L, T, k]
            counts = np.stack([np.bincount(idx[i].reshape(-1), minlength=t.shape.experts) for i in range(L)])
            assert np.array_equal(t.counts[f], counts)
            n = int(t.forwards.at[f, "choice_tokens"])
            assert np.array_equal(t.choices_of(f), idx[:, idx.shape[1] - n:].transpose(1, 0, 2))
        fw = t.forwards
        assert fw.loc[fw["request"] == 0, "tokens_committed"].sum() == 96 - 32  # prompt 32 + 64 masks
        if kv:
            assert set(fw["kind"]) == {"prefill", "step", "commit"}
            assert (fw["choice_tokens"] == fw["tokens_run"]).all()
        else:
            assert set(fw["kind"]) == {"step"} and (fw["choice_tokens"] == 32).all()
        assert r0.step_forwards == int(((fw["request"] == 0) & (fw["kind"] == "step")).sum())


def test_generate_command_json_and_trace(tmp_path, tiny_ckpt):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2, 3]}\n{"prompt_ids": [4, 5, 6, 7]}\n')
    out = tmp_path / "t.parquet"
    proc = run_module("runtime.generate", "--checkpoint", str(tiny_ckpt), "--prompts", str(prompts),
                      "--gen-length", "40", "--threshold", "0.3", "--trace-out", str(out), "--json",
                      real=True)  # one real process: the command as a user starts it
    assert proc.returncode == 0, proc.stderr
    j = json.loads(proc.stdout)
    assert len(j["tokens"]) == 2 and all(len(t) <= 40 for t in j["tokens"])
    assert j["forwards"] > 0 and j["seconds"] > 0 and j["tokens_per_s"] > 0 and j["tokens_per_forward"] >= 1
    t = read_trace(out)
    assert len(t.requests) == 2
    stats = run_module("traces.stats", str(out), "--json")
    assert stats.returncode == 0 and json.loads(stats.stdout)["forwards"] == t.n_forwards


def test_generate_bad_input(tmp_path, tiny_ckpt):
    base = ["runtime.generate", "--checkpoint", str(tiny_ckpt), "--gen-length", "8"]
    assert_clean_error(run_module(*base, "--prompt", "hello"), "no tokenizer")
    assert_clean_error(run_module(*base, "--prompt-ids", "1,x"), "--prompt-ids")
    assert_clean_error(run_module(*base, "--prompt-ids", "1,9999"), "outside the vocabulary")
    if not torch.cuda.is_available():
        assert_clean_error(run_module(*base, "--prompt-ids", "1", "--device", "cuda"), "--device cuda")
    assert_clean_error(run_module(*base, "--prompt-ids", "1", "--dtype", "int8"), "--dtype")
    bad = tmp_path / "p.jsonl"
    bad.write_text("{nope\n")
    assert_clean_error(run_module(*base, "--prompts", str(bad)), "p.jsonl:1")


def test_forward_takes_a_batch_of_one_as_hugging_face_callers_pass_it(models):
    from runtime.model import block_causal_mask
    ids = torch.arange(1, 65)
    mask = block_causal_mask(64, 32, ids.device)
    a = models[0](ids, 0, None, mask)
    b = models[0](ids[None], 0, None, mask[None, None])
    assert b.shape == (1, 64, models[0].cfg.shape.vocab) and torch.equal(a, b[0])
