"""The on-disk trace format: round trip, pandas, and every malformed input refused cleanly."""
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_clean_error, run_module

from traces.common.errors import TideError
from traces.formats.trace_file import META_KEY
from traces.formats.trace_read import read_trace
from traces.serving.admission import compose_trace


def test_round_trip(tmp_path, small_trace):
    path = small_trace.write(tmp_path / "t.parquet")
    back = read_trace(path)
    assert back.n_forwards == small_trace.n_forwards
    assert np.array_equal(back.counts, small_trace.counts)
    assert np.array_equal(back.choices, small_trace.choices)
    pd.testing.assert_frame_equal(back.forwards, small_trace.forwards, check_dtype=False)
    assert back.shape == small_trace.shape and back.decoding == small_trace.decoding
    assert back.requests == small_trace.requests


def test_pandas_reads_the_file(tmp_path, small_trace):
    path = small_trace.write(tmp_path / "t.parquet")
    df = pd.read_parquet(path)
    L = small_trace.shape.n_moe_layers
    assert len(df) == small_trace.n_forwards * L
    assert {"forward", "kind", "layer", "counts", "choices", "tokens_run"} <= set(df.columns)
    row = df.iloc[0]
    assert sum(row["counts"]) == row["tokens_run"] * small_trace.shape.top_k
    meta = json.loads(pq.read_schema(path).metadata[META_KEY])
    assert meta["format"] == "tide-trace" and meta["version"] == 2 and meta["decoding"]["kv_cache"] is True


def test_structure_of_a_kv_trace(small_trace):
    fw = small_trace.forwards
    assert (fw["choice_tokens"] == fw["tokens_run"]).all()  # every token's choices with the KV cache
    assert set(fw["kind"]) == {"prefill", "step", "commit"}
    # prompt 40 + 96 tokens fill 5 whole blocks of 32: 120 masks per request are denoised
    assert small_trace.tokens_generated == 2 * 96  # what each request asked for, not the last block's 24 extra
    assert int(fw["tokens_committed"].sum()) == 2 * 120
    assert fw.groupby("request")["tokens_committed"].sum().tolist() == [120, 120]
    assert (fw.loc[fw["kind"] != "prefill", "tokens_run"] == 32).all()
    hist = small_trace.choice_counts()
    assert np.array_equal(hist, small_trace.counts)


def test_no_kv_trace_keeps_the_current_block_only(small_trace_nokv):
    fw = small_trace_nokv.forwards
    assert set(fw["kind"]) == {"step"}
    assert (fw["choice_tokens"] <= 32).all() and (fw["tokens_run"] == fw["context"]).all()
    assert (fw["tokens_run"] > fw["choice_tokens"]).all()


def test_write_is_atomic(tmp_path, small_trace, monkeypatch):
    target = tmp_path / "t.parquet"

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(RuntimeError):
        small_trace.write(target)
    assert list(tmp_path.iterdir()) == []


def _rewrite(src, dst, edit):
    table = pq.read_table(src)
    table = edit(table)
    pq.write_table(table, dst)
    return dst


def _set(table, name, arr):
    i = table.column_names.index(name)
    return table.set_column(i, pa.field(name, arr.type), arr)


def _counts_edit(fn):
    def edit(table):
        col = table.column("counts").combine_chunks()
        E = col.type.list_size
        vals = col.flatten().to_numpy().copy().reshape(-1, E)
        fn(vals)
        return _set(table, "counts", pa.FixedSizeListArray.from_arrays(pa.array(vals.reshape(-1)), E))
    return edit


def _choices_edit(table):
    col = table.column("choices").combine_chunks()
    vals = col.flatten().to_numpy().copy()
    vals[3] = 999
    return _set(table, "choices", pa.LargeListArray.from_arrays(col.offsets, pa.array(vals)))


def _meta_edit(fn):
    def edit(table):
        meta = json.loads(table.schema.metadata[META_KEY])
        fn(meta)
        return table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    return edit


def _move_count(vals):
    vals[0, 0] += 1


def _negative(vals):
    i = int(np.argmax(vals[0] > 0))
    vals[0, i] = -1
    vals[0, (i + 1) % len(vals[0])] += 2


BAD = {
    "missing column": (lambda t: t.drop_columns(["tokens_run"]), "column 'tokens_run' missing"),
    "mistyped column": (lambda t: _set(t, "block", pa.array([str(x) for x in t.column("block").to_pylist()])),
                        "column 'block' has type string"),
    "mistyped counts": (lambda t: _set(t, "counts", pa.array([str(x) for x in range(t.num_rows)])),
                        "column 'counts' has type string"),
    "expert id out of range": (_choices_edit, "expert ids out of range"),
    "negative counts": (_counts_edit(_negative), "negative expert counts"),
    "totals differ from tokens x top-k": (_counts_edit(_move_count), "expected tokens_run x top_k"),
    "unknown kind": (lambda t: _set(t, "kind", pa.array(["warmup"] * t.num_rows)), "unknown forward kind"),
    "no metadata": (lambda t: t.replace_schema_metadata({}), "not a TIDE trace"),
    "future version": (_meta_edit(lambda m: m.update(version=99)), "version 99 is not supported"),
    "rows out of order": (lambda t: t.take(np.arange(t.num_rows)[::-1].copy()), "ordered by forward"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_reader_rejects_malformed_traces(tmp_path, small_trace, case):
    edit, fragment = BAD[case]
    good = small_trace.write(tmp_path / "good.parquet")
    bad = _rewrite(good, tmp_path / "bad.parquet", edit)
    with pytest.raises(TideError) as exc:
        read_trace(bad)
    assert fragment in str(exc.value) and str(bad) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_version_1_trace_still_loads(tmp_path, small_trace):
    """Version 1: one request per forward, no batch size in the metadata."""
    v1 = _rewrite(small_trace.write(tmp_path / "t.parquet"), tmp_path / "v1.parquet",
                  _meta_edit(lambda m: (m.update(version=1), m.pop("batch_size"))))
    back = read_trace(v1)
    assert back.batch_size == 1 and not back.batched and back.n_batched == small_trace.n_forwards
    assert np.array_equal(back.counts, small_trace.counts)
    # a version-1 file cannot claim batched forwards
    two = _rewrite(v1, tmp_path / "v1b.parquet", lambda t: _set(t, "forward", pa.array(
        np.minimum(t.column("forward").to_numpy(), 1).astype(np.int32))))
    with pytest.raises(TideError, match="ordered by forward"):
        read_trace(two)


def test_a_batched_trace_round_trips(tmp_path, small_trace):
    """Requests composed at batch 2: one row per member; the counters of a policy's run sit on
    each forward's first member; a forward's counts are its members' added."""
    from traces.costs.policy_run import replay_policy
    from traces.policies.spec import Policy
    b = compose_trace(small_trace, 2)
    assert b.batched and b.n_batched < b.n_forwards == small_trace.n_forwards
    pol = Policy.make("tide", b.shape.n_moe_layers, b.shape.experts, budget=8, tau=2)
    b.counters = replay_policy(b, pol).counters
    assert b.counters["gpu_tokens"].shape == (b.n_batched, b.shape.n_moe_layers)
    back = read_trace(b.write(tmp_path / "b.parquet"))
    assert back.batch_size == 2 and back.n_batched == b.n_batched
    assert np.array_equal(back.forward_counts(), b.forward_counts())
    assert all(np.array_equal(back.counters[k], b.counters[k]) for k in b.counters)
    assert np.array_equal(back.choices, b.choices)
    df = pd.read_parquet(tmp_path / "b.parquet")
    assert df["gpu_tokens"].isna().sum() == (b.n_forwards - b.n_batched) * b.shape.n_moe_layers


BATCHED_BAD = {
    "a request twice in a forward": (lambda t: _set(t, "request", pa.array(np.zeros(t.num_rows, np.int32))),
                                     "twice"),
    "more members than seats": (_meta_edit(lambda m: m.update(batch_size=1)), "more than the batch size 1"),
    "counters on every member": (lambda t: _set(t, "gpu_tokens", pa.array(np.ones(t.num_rows, np.int64))),
                                 "first member's rows"),
    "batch size not a number": (_meta_edit(lambda m: m.update(batch_size="8")), "batch_size"),
}


@pytest.mark.parametrize("case", sorted(BATCHED_BAD))
def test_reader_rejects_malformed_batched_traces(tmp_path, small_trace, case):
    from traces.costs.policy_run import replay_policy
    from traces.policies.spec import Policy
    b = compose_trace(small_trace, 2)
    b.counters = replay_policy(b, Policy.make("all", b.shape.n_moe_layers, b.shape.experts)).counters
    edit, fragment = BATCHED_BAD[case]
    bad = _rewrite(b.write(tmp_path / "good.parquet"), tmp_path / "bad.parquet", edit)
    with pytest.raises(TideError) as exc:
        read_trace(bad)
    assert fragment in str(exc.value) and str(bad) in str(exc.value) and "\n" not in str(exc.value)


def test_truncated_and_corrupted_files_fail_cleanly_on_the_command_line(tmp_path, small_trace):
    good = small_trace.write(tmp_path / "good.parquet")
    data = good.read_bytes()
    trunc = tmp_path / "truncated.parquet"
    trunc.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.parquet"
    mid = len(data) // 2
    corrupt.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:])
    missing = tmp_path / "nope.parquet"
    for path in (trunc, missing):
        assert_clean_error(run_module("traces.stats", str(path), "--json"), str(path))
    proc = run_module("traces.stats", str(corrupt), "--json", real=True)  # the one-line contract, for real
    assert_clean_error(proc, str(corrupt))


def test_a_malformed_trace_fails_cleanly_on_the_command_line(tmp_path, small_trace):
    good = small_trace.write(tmp_path / "good.parquet")
    bad = _rewrite(good, tmp_path / "bad.parquet", _counts_edit(_negative))
    assert_clean_error(run_module("traces.stats", str(bad), "--json"), "negative expert counts")


def test_counters_are_stored_when_a_policy_ran(tmp_path, small_trace):
    from traces.costs.policy_run import replay_policy
    from traces.policies.spec import Policy
    L, E = small_trace.shape.n_moe_layers, small_trace.shape.experts
    rep = replay_policy(small_trace, Policy.make("tide", L, E, budget=8, tau=2))
    t = small_trace
    t2 = type(t)(shape=t.shape, dtype=t.dtype, decoding=t.decoding, requests=t.requests, forwards=t.forwards,
                 counts=t.counts, choices=t.choices, counters=rep.counters, policy={"name": "tide", "tau": 2, "budget": 8})
    back = read_trace(t2.write(tmp_path / "c.parquet"))
    assert back.policy["name"] == "tide"
    for k, v in rep.counters.items():
        assert np.array_equal(back.counters[k], v)
    df = pd.read_parquet(tmp_path / "c.parquet")
    assert df["cpu_tokens"].sum() == rep.totals()["cpu_tokens"]
