"""Trace capture: what the runtime did, in the trace format of ``traces.formats.trace_file``.

The recorder hangs an observer on every MoE block; each forward's router choices are
kept (all tokens with the KV cache, the current block's without it) and turned into
counts and choices, per member of a batched forward, when the forward ends.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from runtime.model import LLaDA2
from traces.formats.trace_file import Decoding, Trace


class TraceRecorder:
    def __init__(self, model: LLaDA2, decoding: Decoding, dtype: str):
        self.model, self.decoding, self.dtype = model, decoding, dtype
        self.shape = model.cfg.shape
        self.rows: list[dict[str, Any]] = []
        self.counts: list[np.ndarray] = []
        self.choices: list[np.ndarray] = []
        self.counters: list[dict[str, np.ndarray]] = []
        self.requests: list[dict[str, int]] = []
        self._idx: dict[int, torch.Tensor] = {}
        self._rows: list[dict[str, Any]] | None = None
        self._forward = 0
        self.batch_size = 1
        self._layer_pos = {l: i for i, l in enumerate(self.shape.moe_layers)}

    def attach(self) -> "TraceRecorder":
        for blk in self.model.moe_blocks:
            blk.observer = self._observe
        return self

    def detach(self) -> None:
        for blk in self.model.moe_blocks:
            blk.observer = None

    def __enter__(self) -> "TraceRecorder":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _observe(self, layer: int, idx: torch.Tensor) -> None:
        if self._rows is not None:
            self._idx[layer] = idx

    def begin(self, members: list[dict[str, Any]]) -> None:
        """Start a forward: one dict per member in seat order (request, kind, block, step,
        tokens_run, context, choice_start, choice_tokens), their tokens in that order."""
        self._rows = [dict(m, forward=self._forward, tokens_committed=0) for m in members]
        self._idx = {}

    def end(self, committed: list[int],
            counters: dict[str, np.ndarray] | Callable[[], dict[str, np.ndarray]] | None = None) -> None:
        """Finish the forward: each member's committed tokens; the engine's counters (a dict,
        or a callable giving it: the engine counts later)."""
        rows = self._rows
        assert rows is not None, "end() without begin()"
        E = self.shape.experts
        idx = np.stack([self._idx[l].cpu().numpy() for l in self.shape.moe_layers])  # [L, T, k] of the whole batch
        at = 0
        for row, n in zip(rows, committed):
            row["tokens_committed"] = n
            mine = idx[:, at:at + row["tokens_run"], :]
            at += row["tokens_run"]
            self.rows.append(row)
            self.counts.append(np.stack([np.bincount(m.reshape(-1), minlength=E) for m in mine]).astype(np.int32))
            self.choices.append(mine[:, mine.shape[1] - row["choice_tokens"]:, :].reshape(-1).astype(np.int16))
        assert at == idx.shape[1], "members' tokens_run do not add up to the forward's tokens"
        if counters is not None:
            self.counters.append(counters)
        self._rows = None
        self._forward += 1

    def add_request(self, request: int, prompt_length: int, gen_length: int) -> None:
        self.requests.append({"request": request, "prompt_length": prompt_length, "gen_length": gen_length})

    def trace(self, source: dict[str, Any] | None = None, policy: dict[str, Any] | None = None) -> Trace:
        counters = None
        if self.counters:
            per = [c() if callable(c) else c for c in self.counters]
            counters = {k: np.stack([c[k] for c in per]) for k in per[0]}
        return Trace(shape=self.shape, dtype=self.dtype, decoding=self.decoding, requests=self.requests,
                     forwards=pd.DataFrame(self.rows), counts=np.stack(self.counts),
                     choices=np.concatenate(self.choices), counters=counters, policy=policy, source=source or {},
                     batch_size=self.batch_size)
