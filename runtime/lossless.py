"""The lossless rule: an offloaded run must generate what the model computes.

When the fast device is the CPU, hits and misses run the same kernel on the same weights,
so the tokens must be identical. On a GPU the misses run on the CPU, whose sums round
differently, so a token may flip where the model is undecided: the first difference (in
the order positions were committed) is allowed only at a near-tie, where the top two
logits of either run differ by less than ``tie`` (1%) of the largest |logit|. Everything
committed after it may then differ, because the context differs.
"""
from __future__ import annotations

from dataclasses import dataclass

from runtime.decoding import Result

NEAR_TIE = 0.01


@dataclass
class Agreement:
    ok: bool
    identical: bool
    detail: str  # empty when identical


def agree(ref: Result, got: Result, exact: bool, tie: float = NEAR_TIE) -> Agreement:
    """Compare a run with the reference run (``Generator(margins=True)`` results for the
    near-tie rule; with ``exact`` only the tokens matter)."""
    if ref.tokens == got.tokens:
        return Agreement(True, True, "")
    n = min(len(ref.tokens), len(got.tokens))
    differ = [p for p in range(n) if ref.tokens[p] != got.tokens[p]] or [n]
    if exact or ref.margin is None or got.margin is None:
        p = differ[0]
        return Agreement(False, False, f"tokens differ first at position {p} "
                                       f"({_at(ref.tokens, p)} vs {_at(got.tokens, p)})")
    first = min(differ, key=lambda p: (_at(ref.committed_at, p, 1 << 30), p))  # earliest committed
    if first >= n:
        return Agreement(False, False, f"lengths differ ({len(ref.tokens)} vs {len(got.tokens)} tokens)")
    margin = min(ref.margin[first], got.margin[first])
    if margin < tie:
        return Agreement(True, False, f"first difference at position {first} is a near-tie "
                                      f"(top-2 gap {margin:.2%} of the largest |logit|)")
    return Agreement(False, False, f"tokens differ at position {first} ({ref.tokens[first]} vs {got.tokens[first]}) "
                                   f"where the top-2 gap is {margin:.2%} of the largest |logit| (not a near-tie)")


def _at(values: list, p: int, default: object = "end") -> object:
    return values[p] if values is not None and p < len(values) else default
