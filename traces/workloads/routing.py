"""LLaDA2.0's group-limited top-k choice, in numpy (the synthetic workloads route with it).

The experts are split into ``n_group`` groups; each group scores the sum of its two best
experts; the best ``topk_group`` groups stay; the ``top_k`` best experts among them are
chosen, best first.
"""
from __future__ import annotations

import numpy as np


def group_limited_topk(scores: np.ndarray, top_k: int, n_group: int, topk_group: int) -> np.ndarray:
    """Expert ids ``[..., top_k]`` (best first) chosen from ``scores [..., E]``."""
    *lead, E = scores.shape
    s = scores.reshape(-1, E)
    rows = np.arange(len(s))[:, None]
    if n_group > 1 and topk_group < n_group:
        per = E // n_group
        g = s.reshape(len(s), n_group, per)
        two = min(2, per)
        group_score = np.partition(g, per - two, axis=2)[:, :, per - two:].sum(axis=2)
        keep = np.sort(np.argpartition(-group_score, topk_group - 1, axis=1)[:, :topk_group], axis=1)
        ids = (keep[:, :, None] * per + np.arange(per)).reshape(len(s), -1)  # candidate experts
        cand = s[rows, ids]
    else:
        ids = np.broadcast_to(np.arange(E), s.shape)
        cand = s
    top = np.argpartition(-cand, top_k - 1, axis=1)[:, :top_k]
    vals = cand[rows, top]
    top = np.take_along_axis(top, np.argsort(-vals, axis=1, kind="stable"), axis=1)
    return ids[rows, top].reshape(*lead, top_k)
