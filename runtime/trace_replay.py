"""Replaying a workload: the runtime executes a KV-cache trace's schedule with the trace's
per-token expert choices in place of the router's picks.

Random-weight routers send a block's identical mask tokens to a few experts; a trained
LLaDA2.0 spreads them over about 70 per layer. Replaying a (synthetic or captured) trace
runs realistic expert traffic through the real engine with random weights: the same
prompt length, the same forwards in order, the same number of tokens committed at each
step (most confident first), no early stop at eos, and each layer's experts chosen as the
trace says, weighted as the router would weight them (their unbiased scores, normalised,
times the scaling factor).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from runtime.model import LLaDA2
from traces.common.errors import TideError
from traces.formats.trace_file import Trace


def check_replayable(trace: Trace, model: LLaDA2, where: str = "--replay-trace") -> None:
    s, t = model.cfg.shape, trace.shape
    if (t.moe_layers, t.experts, t.top_k) != (s.moe_layers, s.experts, s.top_k):
        raise TideError(f"{where}: trace has MoE layers {t.moe_layers[0]}..{t.moe_layers[-1]}, {t.experts} experts, "
                        f"top-{t.top_k}; the checkpoint has {s.moe_layers[0]}..{s.moe_layers[-1]}, {s.experts}, top-{s.top_k}")
    if not trace.decoding.kv_cache:
        raise TideError(f"{where}: trace was recorded without the KV cache; replay needs a KV-cache trace")
    fw = trace.forwards
    if not (fw["choice_tokens"] == fw["tokens_run"]).all():
        raise TideError(f"{where}: trace lacks the choices of some tokens it ran")
    bl = trace.decoding.block_length
    for r in trace.requests:
        P, G = r["prompt_length"], r["gen_length"]
        rows = fw[fw["request"] == r["request"]]
        expect = {"prefill": (P // bl) * bl, "step": bl, "commit": bl}
        bad = rows[rows["tokens_run"] != rows["kind"].map(expect)]
        if len(bad):
            f = bad.index[0]
            raise TideError(f"{where}: forward {f} ({bad.at[f, 'kind']}) runs {bad.at[f, 'tokens_run']} tokens; "
                            f"the block layout of prompt {P} and block {bl} runs {expect[bad.at[f, 'kind']]}")
        if ((rows["block"] + 1) * bl > math.ceil((P + G) / bl) * bl).any():
            raise TideError(f"{where}: request {r['request']} has a block past its prompt and generation length")


class ChoiceReplay:
    """Feeds one forward's recorded choices (a batched forward's: each request's, in order)
    to every MoE block's ``override`` hook."""

    def __init__(self, trace: Trace, model: LLaDA2):
        self.trace, self.model = trace, model
        self._pos = {l: i for i, l in enumerate(trace.shape.moe_layers)}
        self._cur: torch.Tensor | None = None

    def __enter__(self) -> "ChoiceReplay":
        """While inside, every MoE layer routes as the trace's current forward did."""
        for blk in self.model.moe_blocks:
            blk.override = self._choices
        return self

    def __exit__(self, *exc: object) -> None:
        for blk in self.model.moe_blocks:
            blk.override = None

    def set_forward(self, f: int) -> None:
        self.set_forwards([f])

    def set_forwards(self, forwards: list[int]) -> None:
        """A batched forward: its requests' recorded forwards, their tokens' choices in order."""
        ch = [self.trace.choices_of(f) for f in forwards]
        self._cur = torch.as_tensor((ch[0] if len(ch) == 1 else np.concatenate(ch)).astype("int64"), device=self.model.device)

    def _choices(self, layer: int) -> torch.Tensor:
        if self._cur is None:
            raise RuntimeError("ChoiceReplay: no forward set")
        return self._cur[:, self._pos[layer], :]


def replay_prompt(length: int, vocab: int, avoid: tuple[int, ...]) -> list[int]:
    """Deterministic prompt ids of a given length that are neither mask nor eos."""
    ids = []
    t = 1
    while len(ids) < length:
        if t % vocab not in avoid:
            ids.append(t % vocab)
        t += 1
    return ids
