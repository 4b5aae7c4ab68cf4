"""Expert-activation traces: one generation run, its requests one after another or batched.

On disk a trace is one Parquet file (format ``tide-trace``, version 2), one row per
*member* of a forward pass and MoE layer: a forward of a batch-1 run has one member, a
batched forward one per request it runs. Rows go by forward, then member (seat order, the
order of the forward's tokens), then layer:

=================  ==========================  ==============================================
column             type                        meaning
=================  ==========================  ==============================================
forward            int32                       index of the (batched) forward in the run, from 0
request            int32                       request (prompt) whose tokens this member runs
kind               string                      ``prefill``, ``step`` (denoising) or ``commit``
block              int32                       block index within the request's sequence
step               int32                       denoising step within the block (0 for others)
tokens_run         int32                       tokens the member computes
tokens_committed   int32                       masked tokens it accepted in this forward
context            int32                       tokens it attends to (its cached prefix + tokens run)
choice_start       int32                       position of the first token whose choices follow
choice_tokens      int32                       how many consecutive tokens' choices follow
layer              int16                       model layer index of this MoE layer
counts             fixed_size_list<int32>[E]   its tokens routed to each expert (all tokens run)
choices            list<int16>                 top-k expert ids, ``choice_tokens x k``, token-major
gpu_tokens ...     int64 (optional)            counters when a policy ran (traces.policies.counters), per
                                               forward: on its first member's rows, null on others
=================  ==========================  ==============================================

A forward's routed counts are its members' added (routing is per token), so a batch-1
trace of several requests rebuilds the forwards the same prompts make at any batch size
(:mod:`traces.serving.admission`). With the KV cache the choices cover every token run; without
it, only the current block's. The file's key-value metadata ``tide.trace`` holds JSON:
format, version, the model's ``config.json``, dtype, decoding settings (block length,
steps, threshold, kv_cache), the requests (prompt and generation lengths), the batch size,
provenance, and the policy if one ran. Version 1 (one request per forward, counters on
every row, no batch size) still loads. ``pandas.read_parquet`` reads the file as it is;
:func:`read_trace` validates it.
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

from traces.common.errors import TideError
from traces.common.files import atomic_write
from traces.common.values import get, need_bool, need_dict, need_float, need_int, need_list
from traces.formats.shapes import ModelShape, dtype_bytes
from traces.formats.vocabulary import COUNTERS

FORMAT = "tide-trace"
VERSION = 2
READS = (1, 2)  # versions this TIDE reads
META_KEY = b"tide.trace"

FORWARD_COLUMNS: tuple[str, ...] = ("request", "kind", "block", "step", "tokens_run", "tokens_committed",
                                    "context", "choice_start", "choice_tokens")
INT32_COLUMNS = ("forward", "request", "block", "step", "tokens_run", "tokens_committed", "context",
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

    The rows of ``forwards`` are forward members (one per forward in a batch-1 run); its
    ``forward`` column names each one's batched forward. ``counts`` is ``[F, L, E]`` over
    those rows; ``choices`` is flat, laid out row, layer, token, k; ``choices_of(f)`` gives
    one row's ``[n, L, k]``. ``counters`` are per batched forward, ``[n_batched, L]`` each.
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
    batch_size: int = 1  # the run's batch size (seats per forward)

    def __post_init__(self) -> None:
        self.forwards = self.forwards.reset_index(drop=True)
        if "forward" not in self.forwards:  # one request per forward
            self.forwards.insert(0, "forward", np.arange(len(self.forwards), dtype=np.int64))
        fwd = self.forwards["forward"].to_numpy(np.int64)
        starts = np.flatnonzero(np.diff(fwd, prepend=-1)) if len(fwd) else np.zeros(0, np.int64)
        self._members = np.split(np.arange(len(fwd)), starts[1:]) if len(fwd) else []
        per = self.forwards["choice_tokens"].to_numpy(np.int64) * self.shape.n_moe_layers * self.shape.top_k
        self._choice_offsets = np.concatenate([[0], np.cumsum(per)])

    # ---- access ---------------------------------------------------------------------
    @property
    def n_forwards(self) -> int:
        """Rows of ``forwards``: forward members (forwards, in a batch-1 trace)."""
        return len(self.forwards)

    @property
    def n_batched(self) -> int:
        """Forwards the run made (each with one or more members)."""
        return len(self._members)

    @property
    def batched(self) -> bool:
        """Whether some forward ran more than one request."""
        return self.n_batched < self.n_forwards

    def schedule(self) -> list[np.ndarray]:
        """The recorded forwards: each one's rows of ``forwards`` (its members, in seat order)."""
        return self._members

    def require_one_request_per_forward(self, what: str) -> None:
        """Refuse a batched trace where a reader handles one request per forward only."""
        if self.batched:
            most = max(map(len, self._members))
            raise TideError(f"{what}: this trace's forwards run up to {most} requests each (recorded at batch size "
                            f"{self.batch_size}); the planner and the plan validation price one request per forward for now: "
                            "give a trace recorded at --batch-size 1 (runtime.generate --replay-trace T --batch-size N "
                            "replays its requests batched on a real box)")

    def forward_counts(self) -> np.ndarray:
        """``[n_batched, L, E]`` each recorded forward's routed counts (its members' added)."""
        if not self.batched:
            return self.counts
        return np.add.reduceat(self.counts, np.array([m[0] for m in self._members]), axis=0)

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
        n = int(b - a) // (self.shape.n_moe_layers * self.shape.top_k)  # read per forward by replays: no pandas lookup
        return self.choices[a:b].reshape(self.shape.n_moe_layers, n, self.shape.top_k).transpose(1, 0, 2)

    def row_choices(self, rows: np.ndarray) -> np.ndarray:
        """The flat choices of ``rows`` of ``forwards``, in that order (as ``choices`` lays them out)."""
        off = self._choice_offsets
        return np.concatenate([self.choices[off[r]:off[r + 1]] for r in rows]) if len(rows) else self.choices[:0]

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
            "source": self.source, "policy": self.policy, "batch_size": self.batch_size,
        }

    # ---- disk -----------------------------------------------------------------------
    def to_table(self) -> pa.Table:
        F, L, k = self.n_forwards, self.shape.n_moe_layers, self.shape.top_k
        E = self.shape.experts
        rep = lambda col: np.repeat(self.forwards[col].to_numpy(), L)  # noqa: E731
        cols: dict[str, pa.Array] = {"forward": pa.array(rep("forward").astype(np.int32))}
        for c in FORWARD_COLUMNS:
            cols[c] = pa.array(rep(c).astype(str) if c == "kind" else rep(c).astype(np.int32))
        cols["layer"] = pa.array(np.tile(np.asarray(self.shape.moe_layers, np.int16), F))
        cols["counts"] = pa.FixedSizeListArray.from_arrays(pa.array(self.counts.reshape(-1).astype(np.int32)), E)
        lens = np.repeat(self.forwards["choice_tokens"].to_numpy(np.int64) * k, L)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        cols["choices"] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(self.choices.astype(np.int16)))
        if self.counters is not None:  # per forward: on its first member's rows, null on the others'
            first = np.zeros(F, dtype=bool)
            first[[m[0] for m in self._members]] = True
            at = np.repeat(np.cumsum(first) - 1, L) * L + np.tile(np.arange(L), F)
            valid = np.repeat(first, L)
            for c in COUNTERS:
                v = self.counters[c].reshape(-1).astype(np.int64)[at]
                cols[c] = pa.array(v, mask=~valid if self.batched else None)
        table = pa.table(cols)
        return table.replace_schema_metadata({META_KEY: json.dumps(self.meta()).encode()})

    def write(self, path: str | Path) -> Path:
        """Write atomically: the file appears whole or not at all."""
        table = self.to_table()
        return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
