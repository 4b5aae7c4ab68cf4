"""Trace capture: what the runtime did, in the trace format of ``traces.trace``.

The recorder hangs an observer on every MoE block; each forward's router choices are
kept (all tokens with the KV cache, the current block's without it) and turned into
counts and choices when the forward ends.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from runtime.model import LLaDA2
from traces.trace import Decoding, Trace


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
        self._row: dict[str, Any] | None = None
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
        if self._row is not None:
            self._idx[layer] = idx

    def begin(self, request: int, kind: str, block: int, step: int, tokens_run: int, context: int,
              choice_start: int, choice_tokens: int) -> None:
        self._row = dict(request=request, kind=kind, block=block, step=step, tokens_run=tokens_run,
                         tokens_committed=0, context=context, choice_start=choice_start, choice_tokens=choice_tokens)
        self._idx = {}

    def end(self, tokens_committed: int = 0,
            counters: dict[str, np.ndarray] | Callable[[], dict[str, np.ndarray]] | None = None) -> None:
        row = self._row
        assert row is not None, "end() without begin()"
        row["tokens_committed"] = tokens_committed
        L, E = self.shape.n_moe_layers, self.shape.experts
        idx = np.stack([self._idx[l].cpu().numpy() for l in self.shape.moe_layers])  # [L, T, k]
        counts = np.stack([np.bincount(idx[i].reshape(-1), minlength=E) for i in range(L)])
        n = row["choice_tokens"]
        self.rows.append(row)
        self.counts.append(counts.astype(np.int32))
        self.choices.append(idx[:, idx.shape[1] - n:, :].reshape(-1).astype(np.int16))
        if counters is not None:
            self.counters.append(counters)  # a dict, or a callable giving it (the engine counts later)
        self._row = None

    def add_request(self, request: int, prompt_length: int, gen_length: int) -> None:
        self.requests.append({"request": request, "prompt_length": prompt_length, "gen_length": gen_length})

    def trace(self, source: dict[str, Any] | None = None, policy: dict[str, Any] | None = None) -> Trace:
        counters = None
        if self.counters:
            per = [c() if callable(c) else c for c in self.counters]
            counters = {k: np.stack([c[k] for c in per]) for k in per[0]}
        return Trace(shape=self.shape, dtype=self.dtype, decoding=self.decoding, requests=self.requests,
                     forwards=pd.DataFrame(self.rows), counts=np.stack(self.counts),
                     choices=np.concatenate(self.choices), counters=counters, policy=policy, source=source or {})
