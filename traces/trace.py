"""Expert-activation traces: one generation run (or several requests run one after another).

On disk a trace is one Parquet file (format ``tide-trace``, version 1), one row per
forward pass and MoE layer, in forward then layer order:

=================  ==========================  ==============================================
column             type                        meaning
=================  ==========================  ==============================================
forward            int32                       index of the forward in the run, from 0
request            int32                       request (prompt) the forward belongs to
kind               string                      ``prefill``, ``step`` (denoising) or ``commit``
block              int32                       block index within the request's sequence
step               int32                       denoising step within the block (0 for others)
tokens_run         int32                       tokens the forward computes
tokens_committed   int32                       masked tokens accepted by this forward
context            int32                       tokens attended to (cached prefix + tokens run)
choice_start       int32                       position of the first token whose choices follow
choice_tokens      int32                       how many consecutive tokens' choices follow
layer              int16                       model layer index of this MoE layer
counts             fixed_size_list<int32>[E]   tokens routed to each expert (all tokens run)
choices            list<int16>                 top-k expert ids, ``choice_tokens x k``, token-major
gpu_tokens ...     int64 (optional)            counters when a policy ran (traces.counters)
=================  ==========================  ==============================================

With the KV cache the choices cover every token run; without it, only the current block's.
The file's key-value metadata ``tide.trace`` holds JSON: format, version, the model's
``config.json``, dtype, decoding settings (block length, steps, threshold, kv_cache), the
requests (prompt and generation lengths), provenance, and the policy if one ran.
``pandas.read_parquet`` reads the file as it is; :func:`read_trace` validates it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from traces.cli import atomic_write
from traces.counters import COUNTERS
from traces.errors import TideError
from traces.policies import FORWARD_KINDS
from traces.shapes import DTYPE_BYTES, ModelShape, dtype_bytes
from traces.values import get, need_bool, need_dict, need_float, need_int, need_list, need_str

FORMAT = "tide-trace"
VERSION = 1
META_KEY = b"tide.trace"

FORWARD_COLUMNS: tuple[str, ...] = ("request", "kind", "block", "step", "tokens_run", "tokens_committed",
                                    "context", "choice_start", "choice_tokens")
_INT32_COLUMNS = ("forward", "request", "block", "step", "tokens_run", "tokens_committed", "context",
                  "choice_start", "choice_tokens", "layer")


@dataclass(frozen=True)
class Decoding:
    """Decoding settings of the run (LLaDA2.0 block diffusion)."""

    block_length: int = 32
    steps: int = 32
    threshold: float = 0.95
    kv_cache: bool = True

    @classmethod
    def from_json(cls, d: Any, where: str = "decoding") -> "Decoding":
        """Every field present and of its type: a trace's schedule depends on all four."""
        d = need_dict(d, where)
        unknown = set(d) - {"block_length", "steps", "threshold", "kv_cache"}
        if unknown:
            raise TideError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        return cls(block_length=need_int(get(d, "block_length", where), f"{where}.block_length", lo=1),
                   steps=need_int(get(d, "steps", where), f"{where}.steps", lo=1),
                   threshold=need_float(get(d, "threshold", where), f"{where}.threshold", lo=0.0, hi=1.0),
                   kv_cache=need_bool(get(d, "kv_cache", where), f"{where}.kv_cache"))


def read_requests(v: Any, where: str = "requests") -> list[dict[str, int]]:
    """The requests of a run: distinct ids, a non-empty prompt and at least one token asked for each."""
    out = []
    for i, r in enumerate(need_list(v, where, nonempty=True)):
        w = f"{where}[{i}]"
        r = need_dict(r, w)
        out.append({"request": need_int(get(r, "request", w), f"{w}.request", lo=0),
                    "prompt_length": need_int(get(r, "prompt_length", w), f"{w}.prompt_length", lo=1),
                    "gen_length": need_int(get(r, "gen_length", w), f"{w}.gen_length", lo=1)})
    ids = [r["request"] for r in out]
    if len(set(ids)) != len(ids):
        raise TideError(f"{where}: request ids must be distinct, got {ids}")
    return out


@dataclass
class Trace:
    """A run's forwards, per-layer expert counts, per-token choices and optional counters.

    ``counts`` is ``[F, L, E]``; ``choices`` is flat, laid out forward, layer, token, k;
    ``choices_of(f)`` gives one forward's ``[n, L, k]``.
    """

    shape: ModelShape
    dtype: str
    decoding: Decoding
    requests: list[dict[str, int]]
    forwards: pd.DataFrame
    counts: np.ndarray
    choices: np.ndarray
    counters: dict[str, np.ndarray] | None = None
    policy: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.forwards = self.forwards.reset_index(drop=True)
        per = self.forwards["choice_tokens"].to_numpy(np.int64) * self.shape.n_moe_layers * self.shape.top_k
        self._choice_offsets = np.concatenate([[0], np.cumsum(per)])

    # ---- access ---------------------------------------------------------------------
    @property
    def n_forwards(self) -> int:
        return len(self.forwards)

    @property
    def act_bytes_per_token(self) -> int:
        """Activation bytes to the CPU and back for one token with a CPU assignment."""
        return 2 * self.shape.hidden * dtype_bytes(self.dtype)

    @property
    def tokens_generated(self) -> int:
        """Tokens the requests asked for and got: a request's last block may hold masked
        positions past ``gen_length`` that its forwards also commit; they are not output
        (``runtime.generate`` returns ``gen_length`` tokens), so they are not counted."""
        committed = self.forwards.groupby("request")["tokens_committed"].sum()
        return int(sum(min(r["gen_length"], int(committed.get(r["request"], 0))) for r in self.requests))

    def choices_of(self, f: int) -> np.ndarray:
        """``[n, L, k]`` expert ids of forward ``f``'s tokens with recorded choices."""
        a, b = self._choice_offsets[f], self._choice_offsets[f + 1]
        n = int(self.forwards.at[f, "choice_tokens"])
        return self.choices[a:b].reshape(self.shape.n_moe_layers, n, self.shape.top_k).transpose(1, 0, 2)

    def choice_counts(self) -> np.ndarray:
        """``[F, L, E]`` counts over the tokens with recorded choices (the current block's)."""
        F, L, E, k = self.n_forwards, self.shape.n_moe_layers, self.shape.experts, self.shape.top_k
        rows = np.repeat(np.arange(F * L), np.repeat(self.forwards["choice_tokens"].to_numpy(np.int64) * k, L))
        flat = np.bincount(rows * E + self.choices.astype(np.int64), minlength=F * L * E)
        return flat.reshape(F, L, E)

    def popularity(self) -> np.ndarray:
        """``[L, E]`` total tokens per MoE layer and expert over the whole run."""
        return self.counts.sum(axis=0, dtype=np.int64)

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "model": self.shape.arch_config(), "model_name": self.shape.name,
            "dtype": self.dtype, "decoding": asdict(self.decoding), "requests": self.requests,
            "source": self.source, "policy": self.policy,
        }

    # ---- disk -----------------------------------------------------------------------
    def to_table(self) -> pa.Table:
        F, L, k = self.n_forwards, self.shape.n_moe_layers, self.shape.top_k
        E = self.shape.experts
        rep = lambda col: np.repeat(self.forwards[col].to_numpy(), L)  # noqa: E731
        cols: dict[str, pa.Array] = {"forward": pa.array(np.repeat(np.arange(F, dtype=np.int32), L))}
        for c in FORWARD_COLUMNS:
            cols[c] = pa.array(rep(c).astype(str) if c == "kind" else rep(c).astype(np.int32))
        cols["layer"] = pa.array(np.tile(np.asarray(self.shape.moe_layers, np.int16), F))
        cols["counts"] = pa.FixedSizeListArray.from_arrays(pa.array(self.counts.reshape(-1).astype(np.int32)), E)
        lens = np.repeat(self.forwards["choice_tokens"].to_numpy(np.int64) * k, L)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        cols["choices"] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(self.choices.astype(np.int16)))
        if self.counters is not None:
            for c in COUNTERS:
                cols[c] = pa.array(self.counters[c].reshape(-1).astype(np.int64))
        table = pa.table(cols)
        return table.replace_schema_metadata({META_KEY: json.dumps(self.meta()).encode()})

    def write(self, path: str | Path) -> Path:
        """Write atomically: the file appears whole or not at all."""
        table = self.to_table()
        return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))

    def validate(self, where: str = "trace") -> None:
        _validate(self, where)


# ---- reading and validation -------------------------------------------------------------
def _fail(where: str, msg: str) -> TideError:
    return TideError(f"{where}: {msg}")


def _int_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _list_of_int(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and _int_type(t.value_type)


def read_trace(path: str | Path) -> Trace:
    """Read and validate a trace file; anything wrong is one TideError naming the file."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise _fail(where, "trace file not found")
    try:
        pf = pq.ParquetFile(path)
        table = pf.read()
    except (pa.ArrowException, OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(where, f"not a readable Parquet trace (truncated or corrupted?): {msg}") from None
    return trace_from_table(table, where)


def trace_from_table(table: pa.Table, where: str = "trace") -> Trace:
    meta_raw = (table.schema.metadata or {}).get(META_KEY)
    if meta_raw is None:
        raise _fail(where, "no tide.trace metadata: not a TIDE trace")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError:
        raise _fail(where, "tide.trace metadata is not valid JSON") from None
    meta = need_dict(meta, f"{where}: tide.trace metadata")
    if meta.get("format") != FORMAT:
        raise _fail(where, f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise _fail(where, f"trace format version {meta.get('version')!r} is not supported (this TIDE reads {VERSION})")
    for key in ("model", "dtype", "decoding", "requests"):
        if key not in meta:
            raise _fail(where, f"metadata lacks {key!r}")
    model_name = meta.get("model_name")
    if model_name is not None:
        need_str(model_name, f"{where}: metadata model_name")
    shape = ModelShape.from_config(need_dict(meta["model"], f"{where}: metadata model"),
                                   name=model_name, source=f"{where} metadata")
    need_str(meta["dtype"], f"{where}: metadata dtype", tuple(DTYPE_BYTES))
    decoding = Decoding.from_json(meta["decoding"], f"{where}: metadata decoding")
    requests = read_requests(meta["requests"], f"{where}: metadata requests")
    for key in ("source", "policy"):
        if meta.get(key) is not None:
            need_dict(meta[key], f"{where}: metadata {key}")

    names = set(table.column_names)
    for c in ("forward", "layer", "counts", "choices", *FORWARD_COLUMNS):
        if c not in names:
            raise _fail(where, f"column {c!r} missing")
    schema = table.schema
    for c in _INT32_COLUMNS:
        if not _int_type(schema.field(c).type):
            raise _fail(where, f"column {c!r} has type {schema.field(c).type}, expected an integer type")
    if not (pa.types.is_string(schema.field("kind").type) or pa.types.is_large_string(schema.field("kind").type)
            or pa.types.is_dictionary(schema.field("kind").type)):
        raise _fail(where, f"column 'kind' has type {schema.field('kind').type}, expected string")
    for c in ("counts", "choices"):
        if not _list_of_int(schema.field(c).type):
            raise _fail(where, f"column {c!r} has type {schema.field(c).type}, expected a list of integers")
    present = [c for c in COUNTERS if c in names]
    if present and len(present) != len(COUNTERS):
        missing = sorted(set(COUNTERS) - set(present))
        raise _fail(where, f"counter columns incomplete: {', '.join(missing)} missing")
    for c in present:
        if not _int_type(schema.field(c).type):
            raise _fail(where, f"column {c!r} has type {schema.field(c).type}, expected an integer type")

    L, E, k = shape.n_moe_layers, shape.experts, shape.top_k
    n_rows = table.num_rows
    if n_rows % L:
        raise _fail(where, f"{n_rows} rows is not a whole number of forwards x {L} MoE layers")
    F = n_rows // L
    if F == 0:
        raise _fail(where, "no forwards: a trace records at least one forward")
    col = lambda c: table.column(c).to_numpy()  # noqa: E731
    fwd = col("forward")
    if not np.array_equal(fwd, np.repeat(np.arange(F), L)):
        raise _fail(where, "rows are not ordered by forward 0..F-1, one per MoE layer")
    if not np.array_equal(col("layer"), np.tile(shape.moe_layers, F)):
        raise _fail(where, f"layer column does not list the MoE layers {shape.moe_layers[0]}..{shape.moe_layers[-1]} for every forward")
    forwards = {}
    for c in FORWARD_COLUMNS:
        v = table.column(c).to_pylist() if c == "kind" else col(c)
        v = np.asarray(v)
        per = v.reshape(F, L)
        if not (per == per[:, :1]).all():
            raise _fail(where, f"column {c!r} differs between the layers of one forward")
        forwards[c] = per[:, 0]
    fdf = pd.DataFrame(forwards)
    bad_kind = ~fdf["kind"].isin(FORWARD_KINDS)
    if bad_kind.any():
        raise _fail(where, f"unknown forward kind {fdf['kind'][bad_kind].iloc[0]!r} (expected {', '.join(FORWARD_KINDS)})")
    for c in ("block", "step", "tokens_run", "tokens_committed", "context", "choice_start", "choice_tokens"):
        if (fdf[c] < 0).any():
            raise _fail(where, f"negative {c} at forward {int(np.argmax(fdf[c] < 0))}")
    if (fdf["choice_tokens"] > fdf["tokens_run"]).any():
        raise _fail(where, "choice_tokens exceeds tokens_run")
    known = {r["request"] for r in requests}
    unknown = set(fdf["request"].unique().tolist()) - known
    if unknown:
        raise _fail(where, f"forwards name request {min(unknown)} not listed in the metadata")
    for c in FORWARD_COLUMNS:
        if c != "kind":
            fdf[c] = fdf[c].astype(np.int64)

    counts_col = table.column("counts").combine_chunks()
    sizes = pc_list_sizes(counts_col)
    if (sizes != E).any():
        raise _fail(where, f"counts lists must have {E} entries (one per expert), found {int(sizes[sizes != E][0])}")
    counts = counts_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if (counts < 0).any():
        raise _fail(where, "negative expert counts")
    counts = counts.reshape(F, L, E)
    totals = counts.sum(axis=2)
    expect = (fdf["tokens_run"].to_numpy() * k)[:, None]
    bad = np.argwhere(totals != expect)
    if len(bad):
        f, l = bad[0]
        raise _fail(where, f"forward {f} layer {shape.moe_layers[l]}: counts sum to {totals[f, l]}, expected tokens_run x top_k = {expect[f, 0]}")

    ch_col = table.column("choices").combine_chunks()
    ch_sizes = pc_list_sizes(ch_col)
    expect_sizes = np.repeat(fdf["choice_tokens"].to_numpy() * k, L)
    if not np.array_equal(ch_sizes, expect_sizes):
        r = int(np.argmax(ch_sizes != expect_sizes))
        raise _fail(where, f"forward {r // L}: choices hold {ch_sizes[r]} ids, expected choice_tokens x top_k = {expect_sizes[r]}")
    choices = ch_col.flatten().to_numpy(zero_copy_only=False)
    if len(choices) and (choices.min() < 0 or choices.max() >= E):
        raise _fail(where, f"expert ids out of range 0..{E - 1} in choices")
    choices = choices.astype(np.int16)

    counters = None
    if present:
        counters = {}
        for c in COUNTERS:
            v = col(c).astype(np.int64)
            if (v < 0).any():
                raise _fail(where, f"negative counter {c}")
            counters[c] = v.reshape(F, L)
    trace = Trace(shape=shape, dtype=meta["dtype"], decoding=decoding, requests=requests, forwards=fdf,
                  counts=counts.astype(np.int32), choices=choices, counters=counters, policy=meta.get("policy"),
                  source=meta.get("source") or {})
    _check_choices_match_counts(trace, where)
    return trace


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
        raise _fail(where, f"forward {f} layer {trace.shape.moe_layers[bad[0][1]]}: choices disagree with counts")


def _validate(trace: Trace, where: str) -> None:
    """Validate an in-memory trace by the same rules as the reader."""
    trace_from_table(trace.to_table(), where)


def load_popularity(path: str | Path, shape: ModelShape) -> np.ndarray:
    """A popularity trace's total counts per layer (``--popularity TRACE``), checked against ``shape``."""
    trace = read_trace(path)
    if trace.shape.moe_layers != shape.moe_layers or trace.shape.experts != shape.experts:
        raise TideError(f"{path}: popularity trace has MoE layers {trace.shape.moe_layers[0]}..{trace.shape.moe_layers[-1]} "
                        f"and {trace.shape.experts} experts; the model has {shape.moe_layers[0]}..{shape.moe_layers[-1]} "
                        f"and {shape.experts}")
    return trace.popularity()
