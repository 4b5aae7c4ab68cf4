"""Reading a trace file (:mod:`traces.formats.trace_file`) and refusing what it cannot be.

Anything wrong is one :class:`TideError` naming the file and what is wrong: the header
(:func:`traces.formats.header.read_header`), the metadata, the columns' types, the rows'
order, counts and choices against the model's shape, counters, and the requests the
metadata lists against the forwards that run them (each listed request runs, and only
listed requests run). :func:`trace_from_table` reads in named steps, each the check of
one part.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from traces.common.checks import check_batch_size
from traces.common.errors import TideError
from traces.common.values import get, need_dict, need_str
from traces.formats.header import fail, read_header
from traces.formats.shapes import DTYPE_BYTES, ModelShape
from traces.formats.trace_file import (
    FORMAT,
    FORWARD_COLUMNS,
    INT32_COLUMNS,
    META_KEY,
    READS,
    Decoding,
    Trace,
    read_requests,
)
from traces.formats.vocabulary import COUNTERS, FORWARD_KINDS


@dataclass
class _Meta:
    """A trace's metadata, checked."""

    version: int
    shape: ModelShape
    dtype: str
    decoding: Decoding
    requests: list[dict[str, int]]
    batch_size: int
    raw: dict[str, Any]


def read_trace(path: str | Path) -> Trace:
    """Read and validate a trace file; anything wrong is one TideError naming the file."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise fail(where, "trace file not found")
    try:
        table = pq.ParquetFile(path).read()
    except (pa.ArrowException, OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise fail(where, f"not a readable Parquet trace (truncated or corrupted?): {msg}") from None
    return trace_from_table(table, where)


def trace_from_table(table: pa.Table, where: str = "trace") -> Trace:
    """A trace from its Arrow table (as read from a file, or as :meth:`Trace.to_table` makes
    it), checked part by part."""
    meta = _read_meta(table, where)
    counters_present = _check_columns(table, where)
    L = meta.shape.n_moe_layers
    fwd, first, fdf = _forward_rows(table, meta, where)
    _check_requests(fdf, meta.requests, where)
    counts = _read_counts(table, meta.shape, fdf, where)
    choices = _read_choices(table, meta.shape, fdf, where)
    counters = _read_counters(table, first, L, where) if counters_present else None
    fdf.insert(0, "forward", fwd)
    trace = Trace(shape=meta.shape, dtype=meta.dtype, decoding=meta.decoding, requests=meta.requests, forwards=fdf,
                  counts=counts.astype(np.int32), choices=choices, counters=counters, policy=meta.raw.get("policy"),
                  source=meta.raw.get("source") or {}, batch_size=meta.batch_size)
    _check_choices_match_counts(trace, where)
    return trace


def _read_meta(table: pa.Table, where: str) -> _Meta:
    """The ``tide.trace`` metadata: header, model, dtype, decoding, requests, batch size."""
    meta_raw = (table.schema.metadata or {}).get(META_KEY)
    if meta_raw is None:
        raise fail(where, "no tide.trace metadata: not a TIDE trace")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError:
        raise fail(where, "tide.trace metadata is not valid JSON") from None
    meta = need_dict(meta, f"{where}: tide.trace metadata")
    version = read_header(meta, where, FORMAT, READS, "trace format")
    for key in ("model", "dtype", "decoding", "requests"):
        if key not in meta:
            raise fail(where, f"metadata lacks {key!r}")
    model_name = meta.get("model_name")
    if model_name is not None:
        need_str(model_name, f"{where}: metadata model_name")
    shape = ModelShape.from_config(need_dict(meta["model"], f"{where}: metadata model"),
                                   name=model_name, source=f"{where} metadata")
    need_str(meta["dtype"], f"{where}: metadata dtype", tuple(DTYPE_BYTES))
    decoding = Decoding.from_json(meta["decoding"], f"{where}: metadata decoding")
    requests = read_requests(meta["requests"], f"{where}: metadata requests")
    batch_size = 1
    if version >= 2 or meta.get("batch_size") is not None:
        batch_size = check_batch_size(get(meta, "batch_size", f"{where}: metadata"), f"{where}: metadata batch_size")
    for key in ("source", "policy"):
        if meta.get(key) is not None:
            need_dict(meta[key], f"{where}: metadata {key}")
    return _Meta(version, shape, meta["dtype"], decoding, requests, batch_size, meta)


def _int_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _list_of_int(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and _int_type(t.value_type)


def _check_columns(table: pa.Table, where: str) -> bool:
    """Every column there with its type; the counters all or none. Whether counters are there."""
    names = set(table.column_names)
    for c in ("forward", "layer", "counts", "choices", *FORWARD_COLUMNS):
        if c not in names:
            raise fail(where, f"column {c!r} missing")
    schema = table.schema
    for c in INT32_COLUMNS:
        if not _int_type(schema.field(c).type):
            raise fail(where, f"column {c!r} has type {schema.field(c).type}, expected an integer type")
    kind = schema.field("kind").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind)):
        raise fail(where, f"column 'kind' has type {kind}, expected string")
    for c in ("counts", "choices"):
        if not _list_of_int(schema.field(c).type):
            raise fail(where, f"column {c!r} has type {schema.field(c).type}, expected a list of integers")
    present = [c for c in COUNTERS if c in names]
    if present and len(present) != len(COUNTERS):
        missing = sorted(set(COUNTERS) - set(present))
        raise fail(where, f"counter columns incomplete: {', '.join(missing)} missing")
    for c in present:
        if not _int_type(schema.field(c).type):
            raise fail(where, f"column {c!r} has type {schema.field(c).type}, expected an integer type")
    return bool(present)


def _forward_rows(table: pa.Table, meta: _Meta, where: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """The rows' order (by forward member, one row per MoE layer), each member's forward
    index, whether it is its forward's first member, and its per-forward columns."""
    shape, L = meta.shape, meta.shape.n_moe_layers
    n_rows = table.num_rows
    if n_rows % L:
        raise fail(where, f"{n_rows} rows is not a whole number of forwards x {L} MoE layers")
    F = n_rows // L
    if F == 0:
        raise fail(where, "no forwards: a trace records at least one forward")
    fwd = table.column("forward").to_numpy().reshape(F, L)
    if not (fwd == fwd[:, :1]).all():
        raise fail(where, "rows are not grouped by forward member, one per MoE layer")
    fwd = fwd[:, 0].astype(np.int64)
    if meta.version == 1 and not np.array_equal(fwd, np.arange(F)):
        raise fail(where, "rows are not ordered by forward 0..F-1, one per MoE layer")
    if fwd[0] != 0 or not np.isin(np.diff(fwd), (0, 1)).all():
        raise fail(where, "rows are not ordered by forward: the forward column must count 0, 1, 2, ... "
                          "with each forward's members in consecutive rows")
    first = np.diff(fwd, prepend=-1) == 1  # each forward's first member
    seats = np.diff(np.append(np.flatnonzero(first), F))
    if seats.max() > meta.batch_size:
        f = int(np.argmax(seats > meta.batch_size))
        raise fail(where, f"forward {f} has {seats[f]} members, more than the batch size {meta.batch_size}")
    if not np.array_equal(table.column("layer").to_numpy(), np.tile(shape.moe_layers, F)):
        raise fail(where, f"layer column does not list the MoE layers {shape.moe_layers[0]}..{shape.moe_layers[-1]} "
                          "for every forward")
    forwards = {}
    for c in FORWARD_COLUMNS:
        v = np.asarray(table.column(c).to_pylist() if c == "kind" else table.column(c).to_numpy())
        per = v.reshape(F, L)
        if not (per == per[:, :1]).all():
            raise fail(where, f"column {c!r} differs between the layers of one forward")
        forwards[c] = per[:, 0]
    fdf = pd.DataFrame(forwards)
    bad_kind = ~fdf["kind"].isin(FORWARD_KINDS)
    if bad_kind.any():
        raise fail(where, f"unknown forward kind {fdf['kind'][bad_kind].iloc[0]!r} (expected {', '.join(FORWARD_KINDS)})")
    for c in ("block", "step", "tokens_run", "tokens_committed", "context", "choice_start", "choice_tokens"):
        if (fdf[c] < 0).any():
            raise fail(where, f"negative {c} at forward {int(np.argmax(fdf[c] < 0))}")
    if (fdf["choice_tokens"] > fdf["tokens_run"]).any():
        raise fail(where, "choice_tokens exceeds tokens_run")
    twice = pd.DataFrame({"f": fwd, "r": fdf["request"].to_numpy()}).duplicated()
    if twice.any():
        i = int(np.argmax(twice.to_numpy()))
        raise fail(where, f"forward {fwd[i]} runs request {fdf.at[i, 'request']} twice")
    for c in FORWARD_COLUMNS:
        if c != "kind":
            fdf[c] = fdf[c].astype(np.int64)
    return fwd, first, fdf


def _check_requests(fdf: pd.DataFrame, requests: list[dict[str, int]], where: str) -> None:
    """The metadata's requests and the forwards agree: forwards run only listed requests, and
    every listed request runs (a request with no forward has no answer to replay or price)."""
    known = {r["request"] for r in requests}
    ran = set(fdf["request"].unique().tolist())
    unknown = ran - known
    if unknown:
        raise fail(where, f"forwards name request {min(unknown)} not listed in the metadata")
    idle = known - ran
    if idle:
        raise fail(where, f"metadata lists request {min(idle)}, which no forward runs")


def _read_counts(table: pa.Table, shape: ModelShape, fdf: pd.DataFrame, where: str) -> np.ndarray:
    """``[F, L, E]`` routed counts: one per expert, not negative, ``tokens_run x top_k`` per layer."""
    L, E, k = shape.n_moe_layers, shape.experts, shape.top_k
    counts_col = table.column("counts").combine_chunks()
    sizes = pc_list_sizes(counts_col)
    if (sizes != E).any():
        raise fail(where, f"counts lists must have {E} entries (one per expert), found {int(sizes[sizes != E][0])}")
    counts = counts_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if (counts < 0).any():
        raise fail(where, "negative expert counts")
    counts = counts.reshape(len(fdf), L, E)
    totals = counts.sum(axis=2)
    expect = (fdf["tokens_run"].to_numpy() * k)[:, None]
    bad = np.argwhere(totals != expect)
    if len(bad):
        f, l = bad[0]
        raise fail(where, f"forward {f} layer {shape.moe_layers[l]}: counts sum to {totals[f, l]}, "
                          f"expected tokens_run x top_k = {expect[f, 0]}")
    return counts


def _read_choices(table: pa.Table, shape: ModelShape, fdf: pd.DataFrame, where: str) -> np.ndarray:
    """The top-k choices, ``choice_tokens x top_k`` ids in range per row."""
    L, E, k = shape.n_moe_layers, shape.experts, shape.top_k
    ch_col = table.column("choices").combine_chunks()
    ch_sizes = pc_list_sizes(ch_col)
    expect_sizes = np.repeat(fdf["choice_tokens"].to_numpy() * k, L)
    if not np.array_equal(ch_sizes, expect_sizes):
        r = int(np.argmax(ch_sizes != expect_sizes))
        raise fail(where, f"forward {r // L}: choices hold {ch_sizes[r]} ids, expected choice_tokens x top_k = "
                          f"{expect_sizes[r]}")
    choices = ch_col.flatten().to_numpy(zero_copy_only=False)
    if len(choices) and (choices.min() < 0 or choices.max() >= E):
        raise fail(where, f"expert ids out of range 0..{E - 1} in choices")
    return choices.astype(np.int16)


def _read_counters(table: pa.Table, first: np.ndarray, L: int, where: str) -> dict[str, np.ndarray]:
    """A policy's counters: on each forward's first member's rows only, not negative."""
    counters = {}
    valid = np.repeat(first, L)
    for c in COUNTERS:
        arr = table.column(c)
        if not np.array_equal(~arr.is_null().to_numpy(zero_copy_only=False), valid):
            raise fail(where, f"counter {c} must be set on each forward's first member's rows and null on the others'")
        v = arr.drop_null().to_numpy().astype(np.int64)
        if (v < 0).any():
            raise fail(where, f"negative counter {c}")
        counters[c] = v.reshape(-1, L)
    return counters


def pc_list_sizes(arr: pa.Array) -> np.ndarray:
    """Lengths of the lists in a (fixed-size or variable) list array."""
    if pa.types.is_fixed_size_list(arr.type):
        return np.full(len(arr), arr.type.list_size, dtype=np.int64)
    if arr.null_count:
        raise TideError("null lists in a trace column")
    off = arr.offsets.to_numpy()
    return np.diff(off).astype(np.int64)


def _check_choices_match_counts(trace: Trace, where: str) -> None:
    """Where the choices cover every token run (KV cache), their histogram must equal counts."""
    full = (trace.forwards["choice_tokens"] == trace.forwards["tokens_run"]).to_numpy()
    if not full.any():
        return
    cc = trace.choice_counts()
    bad = np.argwhere((cc[full] != trace.counts[full]).any(axis=2))
    if len(bad):
        f = np.flatnonzero(full)[bad[0][0]]
        raise fail(where, f"forward {f} layer {trace.shape.moe_layers[bad[0][1]]}: choices disagree with counts")


def load_popularity(path: str | Path, shape: ModelShape) -> np.ndarray:
    """A popularity trace's total counts per layer (``--popularity TRACE``), checked against ``shape``."""
    trace = read_trace(path)
    if trace.shape.moe_layers != shape.moe_layers or trace.shape.experts != shape.experts:
        raise TideError(f"{path}: popularity trace has MoE layers {trace.shape.moe_layers[0]}..{trace.shape.moe_layers[-1]} "
                        f"and {trace.shape.experts} experts; the model has {shape.moe_layers[0]}..{shape.moe_layers[-1]} "
                        f"and {shape.experts}")
    return trace.popularity()
