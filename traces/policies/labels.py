"""How policies are named to a person and which ones every plan is compared with."""
from __future__ import annotations

from typing import Sequence

from traces.common.cli import span
from traces.formats.vocabulary import KINDS
from traces.policies.spec import Policy


def display_name(label: str) -> str:
    """How a person reads a policy's label: ``tide tau=1`` for the baseline ``tide_tau1``
    (its key in plans, tables' columns and code), every other label as it is."""
    return "tide tau=1" if label == "tide_tau1" else label


def kinds_label(kinds: Sequence[str]) -> str:
    """``tide x16, swap x3``: how many layers of each kind, most first."""
    n = {k: list(kinds).count(k) for k in KINDS if k in kinds}
    return ", ".join(f"{k} x{c}" for k, c in sorted(n.items(), key=lambda kv: -kv[1]))


def tau_label(kinds: Sequence[str], tau: Sequence[int] | None) -> str:
    """The taus of the tide layers (``1-4``), or ``-`` when there are none."""
    taus = [t for t, k in zip(tau, kinds) if k == "tide"] if tau is not None else []
    return span(taus) if taus else "-"


def every_kind(n_layers: int, experts: int, small: int, large: int, tau: int) -> Policy:
    """A plan of every kind in turn, layer by layer (swap at ``small``, tide at ``large`` and
    ``tau``, static at ``large``, cpu): how the benchmarks check mixed plans for real."""
    kinds = (["swap", "tide", "static", "cpu"] * n_layers)[:n_layers]
    budget = {"swap": small, "tide": large, "static": large, "cpu": 0}
    return Policy.make("plan", n_layers, experts, kind=kinds, budget=[budget[k] for k in kinds], tau=tau)


#: The policies every plan is compared with, by label, in this order.
BASELINES: tuple[str, ...] = ("cpu", "static", "tide_tau1", "swap")


def baselines(n_layers: int, experts: int, budget: int) -> dict[str, Policy]:
    """``cpu``, ``static``, ``tide`` tau=1 and ``swap`` (when ``budget >= 1``) at one uniform
    budget (the largest that fits, :meth:`traces.costs.memory.MemoryBudget.largest_uniform`)."""
    out = {"cpu": Policy.make("cpu", n_layers, experts), "static": Policy.make("static", n_layers, experts, budget=budget),
           "tide_tau1": Policy.make("tide", n_layers, experts, budget=budget, tau=1)}
    if budget >= 1:
        out["swap"] = Policy.make("swap", n_layers, experts, budget=budget)
    return out
