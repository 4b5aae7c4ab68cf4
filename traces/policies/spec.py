"""What a placement policy is: a kind per MoE layer (:data:`KINDS`), its budget and tau, made
and checked in one place (:meth:`Policy.make`), read and written as JSON. The decisions
themselves are :mod:`traces.policies.kernels`."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from traces.common.errors import TideError
from traces.formats.plan_file import Plan
from traces.formats.shapes import ModelShape
from traces.formats.vocabulary import KINDS, POLICIES
from traces.policies.host import HostPolicy

CPU, STATIC, SWAP, TIDE = range(len(KINDS))
_KIND_OF = {"all": STATIC, "cpu": CPU, "static": STATIC, "swap": SWAP, "tide": TIDE}


def check_policy(name: object, where: str = "--policy", error: type = TideError) -> str:
    """A policy's name: one of :data:`POLICIES` (the one check every command and reader uses)."""
    if name not in POLICIES:
        msg = f"unknown policy {name!r} (expected one of {', '.join(POLICIES)})"
        raise error(where, msg) if error is not TideError else TideError(f"{where}: {msg}")
    return str(name)


class PolicyError(TideError):
    """A policy parameter that cannot be: ``param`` (``policy``, ``budget`` or ``tau``) names
    it, so each command reports its own flag (:meth:`for_flags`)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message

    def for_flags(self, flags: dict[str, str]) -> TideError:
        return TideError(f"{flags.get(self.param, self.param)}: {self.message}")


def _per_layer(v: int | Sequence[int], n_layers: int, param: str, what: str) -> np.ndarray:
    """One integer for every layer, or one per layer; anything else is a PolicyError naming ``param``."""
    a = np.asarray(v)
    if a.ndim > 1 or (a.ndim == 1 and len(a) != n_layers):
        raise PolicyError(param, f"expected one value or {n_layers} per-layer {what}, got {a.size}")
    if a.size and not (np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_):
        raise PolicyError(param, f"{what} must be integers, got {v!r}")
    return np.broadcast_to(a.astype(np.int64), (n_layers,)).copy()


@dataclass(frozen=True)
class Policy:
    """A placement policy: per MoE layer its kind (:data:`KINDS`), its budget and, for
    ``tide`` layers, its refresh interval. Uniform policies have one kind; ``plan`` mixes them."""

    name: str
    budget: np.ndarray  # [L] int: expert slots per MoE layer on the fast device
    tau: np.ndarray | None = None  # [L] int: tide and plan only (0 on a plan's layers that are not tide)
    kind: np.ndarray | None = None  # [L] int8 index into KINDS (set by make)
    resident: np.ndarray | None = None  # [L, E] bool: a static layer's residents fixed in advance (a plan's)
    host: "HostPolicy | None" = None  # the host tier (None: host memory holds every expert)

    def with_host(self, host: "HostPolicy | None") -> "Policy":
        """This placement with a host tier (checked against its layers)."""
        if host is not None and len(host.budget) != self.n_layers:
            raise PolicyError("host_budget", f"expected {self.n_layers} per-layer host budgets, got {len(host.budget)}")
        return replace(self, host=host)

    def drive_layers(self, experts: int) -> np.ndarray:
        """[L] bool: layers that keep some experts on the drive only."""
        return np.zeros(self.n_layers, bool) if self.host is None else self.host.on_drive(experts)

    @classmethod
    def make(cls, name: str, n_layers: int, experts: int, budget: int | Sequence[int] | None = None,
             tau: int | Sequence[int] | None = None, kind: str | Sequence[str] | None = None,
             resident: dict[int, Sequence[int]] | None = None) -> "Policy":
        """Validate and build; a bad value is a :class:`PolicyError` naming the parameter
        (``policy``, ``budget``, ``tau``, ``kind``, ``resident``), which each command maps to
        its own flag. ``kind`` (names, one or one per layer) is for ``plan`` only; a plan
        without kinds is all ``tide`` (the version-1 plans). ``resident`` (plans only: MoE
        layer index -> expert ids) fixes a static layer's resident experts in advance, in
        place of its setup counts' top ``B`` (so the runtime can load them straight onto the
        fast device)."""
        check_policy(name, "policy", PolicyError)
        if name == "plan":
            k = _kinds(kind if kind is not None else "tide", n_layers)
        elif kind is not None:
            raise PolicyError("kind", f"only a plan has per-layer kinds, not {name}")
        else:
            k = np.full(n_layers, _KIND_OF[name], dtype=np.int8)
        if name == "all":
            b = np.full(n_layers, experts)
        elif name == "cpu":
            b = np.zeros(n_layers, dtype=np.int64)
        else:
            if budget is None:
                raise PolicyError("budget", f"policy {name} needs a budget of GPU experts per layer")
            b = _per_layer(budget, n_layers, "budget", "budgets")
            if (b < 0).any() or (b > experts).any():
                raise PolicyError("budget", f"budgets must lie in 0..{experts}, got {b.min()}..{b.max()}")
            if ((k == SWAP) & (b < 1)).any():
                raise PolicyError("budget", "swap needs at least one GPU expert per layer")
            if ((k == CPU) & (b != 0)).any():
                raise PolicyError("budget", "a cpu layer has no GPU experts (budget 0)")
        t = None
        if name in ("tide", "plan"):
            if tau is None:
                if name == "plan" and (k == TIDE).any():
                    raise PolicyError("tau", "plan policy needs per-layer tau")
                tau = 1 if name == "tide" else 0
            t = _per_layer(tau, n_layers, "tau", "values of tau")
            if (t[k == TIDE] < 1).any():
                raise PolicyError("tau", f"tau must be at least 1, got {t[k == TIDE].min()}")
            t = np.where(k == TIDE, t, 0)
        fixed = None
        if resident:
            if name != "plan":
                raise PolicyError("resident", f"only a plan fixes residents in advance, not {name}")
            fixed = np.zeros((n_layers, experts), dtype=bool)
            for l, ids in resident.items():
                ids = np.asarray(list(ids))
                if not isinstance(l, (int, np.integer)) or not 0 <= l < n_layers or k[l] != STATIC:
                    raise PolicyError("resident", f"layer {l}: residents are fixed for static layers only")
                if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= experts):
                    raise PolicyError("resident", f"layer {l}: expert ids must be integers in 0..{experts - 1}")
                if len(set(ids.tolist())) != len(ids) or len(ids) != b[l]:
                    raise PolicyError("resident", f"layer {l}: expected {b[l]} distinct experts (its budget), got {len(ids)}")
                fixed[l, ids] = True
        return cls(name=name, budget=b.astype(np.int64), tau=t, kind=k, resident=fixed)

    def residents(self) -> dict[int, list[int]]:
        """The fixed residents by MoE layer index (empty: none fixed)."""
        if self.resident is None:
            return {}
        return {int(l): np.flatnonzero(self.resident[l]).tolist() for l in range(self.n_layers) if self.resident[l].any()}

    @property
    def n_layers(self) -> int:
        return len(self.budget)

    @property
    def swap_rows(self) -> np.ndarray:
        """[L] bool: the layers that run swap's waves."""
        return self.kind == SWAP

    @property
    def kinds(self) -> list[str]:
        """Each layer's kind, by name."""
        return [KINDS[k] for k in self.kind]

    @property
    def label(self) -> str:
        """The name tables and plans use: the policy, or for tide its tau (``tide_tau1``, the
        baseline, or ``tide tau=4``; ``tide tau=1-4`` when layers differ)."""
        if self.name != "tide":
            return self.name
        lo, hi = int(self.tau.min()), int(self.tau.max())
        return "tide_tau1" if hi == 1 else f"tide tau={lo}" if lo == hi else f"tide tau={lo}-{hi}"

    def to_json(self) -> dict:
        """As traces and results record it."""
        d = {"name": self.name, "budget": self.budget.tolist(), "tau": self.tau.tolist() if self.tau is not None else None}
        if self.name == "plan":
            d["kind"] = self.kinds
            if self.resident is not None:
                d["resident"] = {str(l): ids for l, ids in self.residents().items()}
        if self.host is not None:
            d["host"] = self.host.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict, n_layers: int, experts: int) -> "Policy":
        """What :meth:`to_json` wrote, checked as :meth:`make` checks."""
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise PolicyError("policy", f"a recorded policy is an object with a name, got {d!r}")
        res = d.get("resident")
        if res is not None and not (isinstance(res, dict) and all(str(k).isdigit() for k in res)):
            raise PolicyError("resident", f"a recorded policy's residents map layer indices to expert ids, got {res!r}")
        p = cls.make(d["name"], n_layers, experts, budget=d.get("budget"), tau=d.get("tau"), kind=d.get("kind"),
                     resident={int(k): v for k, v in res.items()} if res else None)
        return p.with_host(HostPolicy.from_json(d["host"], n_layers, experts)) if d.get("host") is not None else p

    @classmethod
    def from_plan(cls, plan: "Plan", shape: ModelShape) -> "Policy":
        """The per-layer policy a plan file holds, for this model (refused if it is another's)."""
        plan.check_model(shape)
        p = cls.make("plan", shape.n_moe_layers, shape.experts, budget=plan.budget, tau=plan.tau, kind=plan.kinds,
                     resident=plan.resident or None)
        if plan.host is None:
            return p
        return p.with_host(HostPolicy.make(plan.host["kind"], shape.n_moe_layers, shape.experts, plan.host["budget"],
                                           plan.host["tau"]))

    def refresh_mask(self, kind: str, step: int) -> np.ndarray:
        """Which layers refresh at this forward: tide layers at prefills, at a block's first
        step and every ``tau`` steps after it; never any other layer."""
        if self.tau is None:
            return np.zeros(self.n_layers, dtype=bool)
        return refresh_points(self.kind == TIDE, self.tau, kind, step)

def check_kinds(names: Sequence[str], flag: str) -> None:
    """Kind names from a flag or a caller: each among :data:`KINDS`, and at least one."""
    bad = [k for k in names if k not in KINDS]
    if bad or not len(names):
        raise TideError(f"{flag}: unknown kind {bad[0]!r} (expected {', '.join(KINDS)})" if bad
                        else f"{flag}: no kinds (expected some of {', '.join(KINDS)})")


def per_layer_names(kind: str | Sequence[str], n_layers: int, vocabulary: Sequence[str], param: str,
                    what: str) -> list[str]:
    """Names (one, or one per layer) from ``vocabulary``, one per layer; a PolicyError naming ``param``."""
    names = [kind] * n_layers if isinstance(kind, str) else list(kind)
    if len(names) != n_layers:
        raise PolicyError(param, f"expected one {what} or {n_layers} per-layer {what}s, got {len(names)}")
    bad = [k for k in names if k not in vocabulary]
    if bad:
        raise PolicyError(param, f"unknown {what} {bad[0]!r} (expected one of {', '.join(vocabulary)})")
    return names


def refresh_points(tide: np.ndarray, tau: np.ndarray, kind: str, step: int) -> np.ndarray:
    """Which of the ``tide`` layers re-decide at this forward: all at prefills and a block's
    first step, those whose ``tau`` divides the step after it, none at a commit (the rule
    both tiers follow: the GPU's placement and the host's held set)."""
    if kind == "commit":
        return np.zeros(len(tide), dtype=bool)
    if kind == "prefill" or step == 0:
        return tide.copy()
    return tide & (step % np.maximum(tau, 1) == 0)


def _kinds(kind: str | Sequence[str], n_layers: int) -> np.ndarray:
    """Kind names (one, or one per layer) as indices into :data:`KINDS`."""
    names = per_layer_names(kind, n_layers, KINDS, "kind", "kind")
    return np.array([KINDS.index(k) for k in names], dtype=np.int8)

