"""One hardware point of a sweep: what it is, its key, and its evaluation.

A :class:`Point` is a box (a bundled or file profile with what-if knobs), a model and a
workload (a synthetic trace), and the policies to price on it. :func:`evaluate` returns one
row per policy setting with the predicted seconds (the simulator's time, computed without
events by ``replay_policy(...).seconds()``, which a test holds equal to ``sim.replay``),
tokens/s, I/O bytes, CPU tokens and hit ratio; ``plan`` is the planner's per-layer optimum
(:mod:`sim.plan`). Speedups over each baseline are filled in per point. Points are pure
functions of their inputs, so a sweep can run them anywhere, in any order, and keep them
by :meth:`Point.key`.
"""
from __future__ import annotations

import functools
import importlib.metadata as md
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sim.planner import candidate_table, memory
from sim.plan_model import solve
from traces.cli import atomic_write, data_sha256, span
from traces.costs import CostModel
from traces.replay import replay_policy
from traces.errors import TideError
from traces.policies import BASELINES, Policy
from traces.profile import Profile
from traces.shapes import ModelShape
from traces.synth import synthesize
from traces.trace import Trace, read_trace
from traces.whatif import scale_profile

POLICY_SET = ("cpu", "static", "swap", "tide", "plan")


@dataclass(frozen=True)
class Point:
    study: str
    profile: str  # bundled name or JSON file
    model: str  # llada2-mini or llada2-flash
    gen_length: int = 256
    prompt_length: int = 64
    seed: int = 0
    pcie: float = 1.0
    cpu_cores: float = 1.0
    gpu_mem_gb: float | None = None  # None: the profile's GPU memory
    host_mem_gb: float | None = None
    policies: tuple[str, ...] = POLICY_SET
    taus: tuple[int, ...] = (1, 2, 4, 8)
    budgets: tuple[int | str, ...] = ("fit",)  # "fit": the largest uniform budget that fits
    budget_step: int = 8

    def key(self) -> str:
        """A hash of everything the result depends on (the profile's content, not its name)."""
        d = asdict(self)
        d["profile_sha256"] = data_sha256(Profile.load(self.profile).data)
        d["tide"] = _version()
        return data_sha256(d)[:20]

    def box(self) -> Profile:
        return scale_profile(Profile.load(self.profile), self.pcie, self.cpu_cores, self.gpu_mem_gb, self.host_mem_gb)


def _version() -> str:
    try:
        return md.version("tide")
    except md.PackageNotFoundError:
        return "dev"


@functools.lru_cache(maxsize=8)
def workload(model: str, gen_length: int, prompt_length: int, seed: int, cache: str | None = None) -> Trace:
    """The synthetic trace of a point, made once per process (and kept in ``cache`` if given)."""
    path = Path(cache) / f"{model}-g{gen_length}-p{prompt_length}-s{seed}.parquet" if cache else None
    if path is not None and path.is_file():
        return read_trace(path)
    trace = synthesize(ModelShape.named(model), gen_length, prompt_length, seed)
    if path is not None and path.parent.is_dir():
        trace.write(path)
    return trace



def evaluate(point: Point, cache: str | None = None) -> pd.DataFrame:
    """Every policy setting of ``point``: one row each (one row with a ``status`` if the
    model does not fit the box)."""
    profile = point.box()
    trace = workload(point.model, point.gen_length, point.prompt_length, point.seed, cache)
    shape, dtype = trace.shape, trace.dtype
    L, E = shape.n_moe_layers, shape.experts
    gpu_gb = point.gpu_mem_gb if point.gpu_mem_gb is not None else profile.capacity("gpu_mem_bytes") / 1e9
    base = {"study": point.study, "key": point.key(), "profile": point.profile, "box": profile.name,
            "pcie": point.pcie, "cpu_cores": point.cpu_cores, "gpu_mem_gb": gpu_gb,
            "host_mem_gb": profile.capacity("host_mem_bytes") / 1e9,
            "h2d_gbps": float(profile.data["h2d"]["pinned"]["gbps"][-1]),
            "cores": profile.capacity("cpu_cores"), "model": shape.name, "gen_length": point.gen_length,
            "tokens": trace.tokens_generated, "tide": _version(), "profile_sha256": data_sha256(profile.data)}
    try:
        mem = memory([trace], profile, gpu_gb)
    except TideError as exc:
        return pd.DataFrame([{**base, "policy": "-", "status": str(exc)}])
    cost = CostModel(profile, shape, dtype)
    b_fit = mem.largest_uniform()  # a uniform budget B fits iff B <= b_fit
    budgets = sorted({b_fit if b == "fit" else int(b) for b in point.budgets})
    rows = []

    def price(policy: Policy, tau: str, budget: str, **more) -> None:
        rep = replay_policy(trace, policy, cost=cost)
        t = rep.totals()
        s = rep.seconds()
        rows.append({**base, "policy": policy.label, "tau": tau, "budget": budget, "seconds": s,
                     "tokens_per_s": trace.tokens_generated / s, "bytes_h2d": t["bytes_h2d"],
                     "bytes_act": t["bytes_act"], "cpu_tokens": t["cpu_tokens"], "gpu_tokens": t["gpu_tokens"],
                     "migrations": t["migrations"], "hit_ratio": rep.hit_ratio(), "status": "ok", **more})

    def unfit(name: str, b: int) -> None:
        why = f"budget {b} does not fit ({b_fit} experts per layer fit)" if b > b_fit else "swap needs a budget of at least 1"
        rows.append({**base, "policy": name, "tau": "-", "budget": str(b), "status": why})

    for name in point.policies:
        if name == "cpu":
            price(Policy.make("cpu", L, E), "-", "0")
        elif name == "all":
            if b_fit == E:
                price(Policy.make("all", L, E), "-", str(E))
            else:
                unfit("all", E)
        elif name in ("static", "swap"):
            for b in budgets:
                if (1 if name == "swap" else 0) <= b <= b_fit:
                    price(Policy.make(name, L, E, budget=b), "-", str(b))
                else:
                    unfit(name, b)
        elif name == "tide":
            for b in budgets:
                if b > b_fit:
                    unfit(name, b)
                    continue
                for tau in point.taus:
                    price(Policy.make("tide", L, E, budget=b, tau=tau), str(tau), str(b))
        elif name == "plan":
            sol = solve(candidate_table([trace], profile, mem, point.budget_step, jobs=1, progress=False))
            price(sol.policy(E), span(sol.tau), span(sol.budget),
                  plan_tau=" ".join(map(str, sol.tau)), plan_budget=" ".join(map(str, sol.budget)),
                  solve_s=sol.solve_s)
        else:
            raise TideError(f"--policies: unknown policy {name!r} (expected all, cpu, static, swap, tide or plan)")
    cols = dict.fromkeys(k for r in rows for k in r)  # every row's columns (unfit rows have no seconds)
    df = pd.DataFrame(rows).reindex(columns=list(dict.fromkeys([*cols, "seconds", "tokens_per_s"])))
    ref = {}
    for b in BASELINES:  # baselines at the largest uniform budget that fits
        hit = df[(df["policy"] == b) & (df["budget"].isin(["0", str(b_fit)])) & (df["status"] == "ok")]
        ref[b] = float(hit["seconds"].iloc[0]) if len(hit) else np.nan
    for b in BASELINES:
        df[f"speedup_vs_{b}"] = ref[b] / df["seconds"]
    return df


def save(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
